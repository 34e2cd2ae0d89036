"""Triton kernels. Each module imports triton at its top, so import them only on a GPU path.

- ``kv_cache``: write new keys/values into the paged cache at their slots.
- ``decode_attention``: paged decode attention (GQA-packed, split-K + reduce).
- ``prefill_attention``: paged attention for prefill / chunked-prefill / mixed batches.
- ``rms_norm``, ``rotary``, ``activation``: fused elementwise layers with the core's contracts.
- ``gemv``: one-row linear layers (16-bit weights, and float8 weights with per-row scales).
- ``w4a16``: 4/8-bit integer weights with 16-bit activations (GPTQ/AWQ/compressed-tensors/Marlin).
- ``fp8_quant``: dynamic per-token float8 quantization of activations (W8A8's input side).
- ``fused_moe``: routed experts as grouped GEMMs over pairs sorted by expert (graph-safe).
"""
