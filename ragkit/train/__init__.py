"""The one trainer (a transformers.Trainer subclass) and its configuration."""
