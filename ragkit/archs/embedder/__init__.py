"""Contrastive fine-tuning of the embedder (MNRL / cached MNRL, hard negatives mined from an index)."""
