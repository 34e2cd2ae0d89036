"""Entry point of genserve-rocm. The attention kernels come from genserve-cuda's plugin."""

from __future__ import annotations

from genserve.hookspecs import hookimpl
from genserve_rocm.backend import RocmBackend


@hookimpl
def genserve_register_backends(register):
    register(RocmBackend.name, RocmBackend)
