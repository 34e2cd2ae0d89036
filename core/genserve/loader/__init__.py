"""Finding a model (local directory, hub id, GGUF file, embedded default) and loading its weights."""
