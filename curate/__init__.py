"""curate: turn noisy web image/alt-text pairs into clean, well-captioned training data."""

__version__ = "0.1.0"
