"""Mixed-precision linear kernels of genserve-cuda (``MPLinearKernel`` implementations)."""
