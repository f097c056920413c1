"""RAG (Lewis et al., 2020): the trainable model, RAG-Sequence / RAG-Token losses and decoding, training (with the
end-to-end index refresh) and its inference entry."""
