"""Global document graph: an embedding bank over the whole corpus and a kNN index on it."""
