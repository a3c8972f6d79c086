"""Dataset layer: discovery and validation, phantoms, splits, the uint8 cache, download."""
