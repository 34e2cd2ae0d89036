"""Triton kernels. Each module imports triton at its top, so import them only on a GPU path.

- ``kv_cache``: write new keys/values into the paged cache at their slots.
- ``decode_attention``: paged decode attention (GQA-packed, split-K + reduce).
- ``prefill_attention``: paged attention for prefill / chunked-prefill / mixed batches.
- ``rms_norm``, ``rotary``, ``activation``: fused elementwise layers with the core's contracts.
"""
