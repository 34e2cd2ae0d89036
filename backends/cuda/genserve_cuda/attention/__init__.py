"""Attention implementations of the CUDA backend (registered by ``genserve_cuda.plugin``).

These modules import no triton or flash-attn at import time: the plugin registers the
classes on any machine, and the kernels load on the first forward.
"""
