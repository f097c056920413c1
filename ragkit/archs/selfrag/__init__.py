"""Self-RAG (Asai et al., 2023): reflection tokens, critique scoring, short- and long-form decoding, the critic,
generator and critic training, and its inference entry."""
