"""Data: sources -> records, scanning, decoding, preprocessing and augmentation."""
