"""Closed-book and retrieve-then-read answering with any generator (`--arch none` / `--arch rag` with a plain LM)."""
