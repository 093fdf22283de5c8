"""Shared helpers for the SFT scripts: tokenization and losses, grading, inference, data, training, logging."""
