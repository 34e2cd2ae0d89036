"""genserve's NVIDIA backend.

Importing this package is cheap and safe on any machine: triton and flash-attn are imported
only inside the kernel modules, which load once the backend (or a kernel) is actually used.
"""

__version__ = "0.1.0"
