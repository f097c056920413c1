"""Self-RAG (Asai et al., 2023): reflection tokens, critique scoring, short-form and long-form decoding."""
