"""Stage 1 and 2 of address-llava: the image-address dataset builder and AddressCLIP training."""
