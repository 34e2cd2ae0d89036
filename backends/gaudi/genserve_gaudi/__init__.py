"""genserve's Intel Gaudi backend (device "hpu").

Importing this package is cheap and safe on any machine: habana_frameworks is imported only
once the backend is chosen. The padding, attention and graph plumbing are plain PyTorch and
are tested on CPU with the Habana calls swapped for pure-torch stand-ins.
"""

__version__ = "0.1.0"
