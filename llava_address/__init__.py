"""LLaVA stage of address-llava: LLaVA-1.5 with the AddressCLIP vision tower, LoRA/QLoRA, merge, chat."""

__version__ = "0.1.0"
