"""Entry point of genserve-ipex: registers the backend, its paged-attention kernel and its
weight-only-quantized linear kernel (``ipex_woq``).

Importing this module must stay cheap and work on machines without IPEX or an Intel GPU.
"""

from __future__ import annotations

from genserve.hookspecs import hookimpl
from genserve_ipex.attention import IpexPagedAttention
from genserve_ipex.backend import IpexBackend
from genserve_ipex.woq import IpexWoqKernel


@hookimpl
def genserve_register_backends(register):
    register(IpexBackend.name, IpexBackend)


@hookimpl
def genserve_register_attention(register):
    register(IpexPagedAttention.name, IpexPagedAttention)


@hookimpl
def genserve_register_linear_kernels(register):
    register(IpexWoqKernel.name, IpexWoqKernel)
