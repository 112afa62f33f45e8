"""The user-facing applications: the `address-llava` command registry, the whole-pipeline demo, chat and the
web demo. The top floor: nothing in the project imports it."""
