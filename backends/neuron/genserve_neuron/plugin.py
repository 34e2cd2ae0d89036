"""Entry point of genserve-neuron: registers the backend and its static-shape attention.

Importing this module must stay cheap and work on machines without the Neuron SDK.
"""

from __future__ import annotations

from genserve.hookspecs import hookimpl
from genserve_neuron.attention import StaticPagedAttention
from genserve_neuron.backend import NeuronBackend


@hookimpl
def genserve_register_backends(register):
    register(NeuronBackend.name, NeuronBackend)


@hookimpl
def genserve_register_attention(register):
    register(StaticPagedAttention.name, StaticPagedAttention)
