"""Stage 3 of address-llava: the address dataset becomes multi-turn LLaVA address Q&A."""
