"""cai: Constitutional-AI feedback generation, AI preference labels and reward models."""

__version__ = "0.1.0"
