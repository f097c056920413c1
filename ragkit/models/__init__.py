"""Model loading (registry) and the model wrappers ragkit uses."""
