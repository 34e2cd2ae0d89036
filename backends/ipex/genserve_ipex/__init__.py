"""genserve's Intel backend (XPU GPUs and CPUs through intel_extension_for_pytorch).

Importing this package is cheap and safe on any machine: intel_extension_for_pytorch and the
oneCCL bindings are imported only once the backend or its attention kernel is used.
"""

__version__ = "0.1.0"
