"""Stages 1 and 2 of address-llava. `core/` is the shared floor every stage imports; `data/` builds the
image-address dataset (stage 1); the modules here train, evaluate and export AddressCLIP (stage 2)."""
