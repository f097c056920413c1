"""RETRO (Borgeaud et al., 2022): the model, the chunk/neighbour pipeline, training sequences, chunk-boundary
generation, LM scores, training and its inference entry."""
