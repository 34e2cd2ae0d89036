"""Hardware backends: the interface, the built-in CPU backend and the selection logic."""
