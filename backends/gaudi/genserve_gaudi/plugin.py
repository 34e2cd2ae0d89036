"""Entry point of genserve-gaudi: registers the backend and its HPU attention.

Importing this module must stay cheap and work on machines without the Gaudi software.
"""

from __future__ import annotations

from genserve.hookspecs import hookimpl
from genserve_gaudi.attention import HpuPagedAttention
from genserve_gaudi.backend import GaudiBackend


@hookimpl
def genserve_register_backends(register):
    register(GaudiBackend.name, GaudiBackend)


@hookimpl
def genserve_register_attention(register):
    register(HpuPagedAttention.name, HpuPagedAttention)
