"""Architectures that ship with the core, registered like any plugin's."""

from genserve.hookspecs import hookimpl
from genserve.models.llama import LlamaForCausalLM


@hookimpl
def genserve_register_architectures(register):
    for model_type in ("llama", "mistral", "qwen2"):
        register(model_type, LlamaForCausalLM)
