"""RETRO beyond the model: the chunk/neighbour pipeline, datasets, chunk-boundary generation, LM scores."""
