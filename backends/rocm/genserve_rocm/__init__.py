"""genserve's AMD backend; imports nothing heavy (see genserve_rocm.plugin)."""

__version__ = "0.1.0"
