"""Stage 1, address data: street networks, reverse geocoding with voting, sub-streets, the dataset build,
Pitts-IAL / SF-IAL import, EXIF GPS photo folders, the built-in demo city, captions. Imports only the core."""
