"""Reading corpora and queries, and writing files atomically, with precise errors."""
