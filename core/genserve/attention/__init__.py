"""Attention over the paged KV cache: the interface and the pure-PyTorch reference."""
