"""evomerge: evolutionary search over merge recipes of language models."""

__version__ = "0.1.0"
