"""ragkit: a unified retrieval-augmented language-model toolkit."""

__version__ = "0.1.0"
