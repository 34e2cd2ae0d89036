"""The extension points of genserve.

Every hook receives a ``register`` callable and calls it once per thing it adds, so one
plugin can add any number of backends, architectures, quantizers, linear kernels, attention
kernels or LoRA methods while the core owns the registries (the pattern of simonw/llm and
pytest). ``register`` has one shape for every hook::

    register(name: str, obj, *, override: bool = False) -> None

``name`` is the key the registry is looked up by (case-insensitive); ``obj`` is, for every
hook here, a class. A name that is already taken is a conflict and the plugin fails to load
as a whole: nothing it registered, in any hook, stays. An installed plugin may replace a
*built-in* entry only by saying so, ``register("torch", MyTorchAttention, override=True)``;
the replacement is logged as a warning and listed by ``genserve plugins``. Two installed
plugins never replace each other; ``GENSERVE_PLUGINS`` picks which of them load.

A plugin module implements any subset of these hooks with ``@genserve.hookspecs.hookimpl``
and is found through the ``genserve`` entry-point group::

    [project.entry-points.genserve]
    my_models = "genserve_my_models.plugin"

Hooks are called through pluggy, so ``tryfirst``/``trylast`` and wrappers work as usual;
since registries are keyed maps, the call order matters only to wrappers.

Each hook here fills one registry of ``genserve.plugins.Plugins``, named after the hook
(``genserve_register_backends`` fills ``Plugins.backends``): declaring a hook with
``@_registry_hook`` is all it takes to add a registry.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import pluggy

hookspec = pluggy.HookspecMarker("genserve")
hookimpl = pluggy.HookimplMarker("genserve")

HOOK_PREFIX = "genserve_register_"

#: registry name (the hook's name without ``genserve_register_``) -> what one entry is called
#: in messages. Filled by ``@_registry_hook`` below, in the order the hooks are declared.
REGISTRIES: dict[str, str] = {}

F = TypeVar("F", bound=Callable[..., object])


def _registry_hook(entry: str) -> Callable[[F], F]:
    """Declare a hook spec and the registry it fills; ``entry`` names one entry in messages."""

    def declare(fn: F) -> F:
        REGISTRIES[fn.__name__.removeprefix(HOOK_PREFIX)] = entry
        return hookspec(fn)

    return declare


@_registry_hook("backend")
def genserve_register_backends(register):
    """Register hardware backends: ``register("cuda", CudaBackend)``.

    The key is the class's ``name`` (what ``--backend`` takes); the class follows
    ``genserve.backends.base.Backend``: it has a ``priority`` and answers ``is_available()``
    cheaply, importing its heavy libraries only once it is chosen. Called once at startup,
    in every process.
    """


@_registry_hook("architecture")
def genserve_register_architectures(register):
    """Register model architectures: ``register("llama", LlamaForCausalLM)``.

    The key is a Hugging Face ``config.model_type``; the class follows
    ``genserve.models.base.CausalLM``. Several keys may map to one class.
    """


@_registry_hook("quantizer")
def genserve_register_quantizers(register):
    """Register weight quantization methods: ``register("gptq", GPTQConfig)``.

    The key is the name taken by ``--quantize`` and found in a checkpoint's
    ``quantization_config.quant_method``; the class follows
    ``genserve.layers.quantization.QuantizationConfig`` (built once per model, asked per layer
    for a ``QuantMethod``).
    """


@_registry_hook("linear kernel")
def genserve_register_linear_kernels(register):
    """Register mixed-precision linear kernels: ``register("triton_w4a16", TritonW4A16Kernel)``.

    The class follows ``genserve.layers.quantization.kernels.MPLinearKernel``. Weight formats
    (GPTQ, AWQ, ...) unpack into one canonical form and the backend's
    ``linear_kernel_preference`` picks, per layer, the first kernel that can implement it.
    """


@_registry_hook("attention implementation")
def genserve_register_attention(register):
    """Register attention implementations: ``register("triton", TritonPagedAttention)``.

    The class follows ``genserve.attention.base.AttentionImpl``. A backend names the
    implementations it prefers, in order; the first registered and usable one wins.
    """


@_registry_hook("LoRA method")
def genserve_register_lora(register):
    """Register LoRA methods: ``register("torch", TorchLoRA)``.

    The class follows ``genserve.layers.lora.LoRAMethod``: it applies the adapters of a
    batch (one adapter per request) to a linear layer's output.
    """


@_registry_hook("speculative proposer")
def genserve_register_spec_proposers(register):
    """Register speculative-decoding proposers: ``register("ngram", NgramProposer)``.

    The key is what ``--speculative-method`` takes; the class follows
    ``genserve.spec_decode.base.Proposer``: built once per engine from a ``ProposerContext``,
    it offers up to k tokens per decoding sequence each step, which the target verifies
    (docs/speculative.md).
    """
