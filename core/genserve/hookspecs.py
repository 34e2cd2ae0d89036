"""The extension points of genserve.

Every hook receives a ``register`` callable and calls it once per thing it adds, so one
plugin can add any number of backends, architectures, quantizers, attention kernels or LoRA
methods while the core owns the registries (the pattern of simonw/llm and pytest).

A plugin module implements any subset of these hooks with ``@genserve.hookimpl`` and is
found through the ``genserve`` entry-point group::

    [project.entry-points.genserve]
    my_models = "genserve_my_models.plugin"
"""

import pluggy

hookspec = pluggy.HookspecMarker("genserve")
hookimpl = pluggy.HookimplMarker("genserve")


@hookspec
def genserve_register_backends(register):
    """Register hardware backends: ``register(BackendClass)``.

    The class follows ``genserve.backends.base.Backend``: it has a ``name`` and a
    ``priority`` and answers ``is_available()`` cheaply, importing its heavy libraries only
    once it is chosen. Called once at startup, in every process.
    """


@hookspec
def genserve_register_architectures(register):
    """Register model architectures: ``register("llama", LlamaForCausalLM)``.

    The key is a Hugging Face ``config.model_type``; the class follows
    ``genserve.models.base.CausalLM``. Several keys may map to one class.
    """


@hookspec
def genserve_register_quantizers(register):
    """Register weight quantization methods: ``register("gptq", GPTQConfig)``.

    The key is the name taken by ``--quantize`` and found in a checkpoint's
    ``quantization_config.quant_method``; the class follows
    ``genserve.layers.quantization.QuantizationConfig`` (built once per model, asked per layer
    for a ``QuantMethod``).
    """


@hookspec
def genserve_register_linear_kernels(register):
    """Register mixed-precision linear kernels: ``register("triton_w4a16", TritonW4A16Kernel)``.

    The class follows ``genserve.layers.quantization.kernels.MPLinearKernel``. Weight formats
    (GPTQ, AWQ, ...) unpack into one canonical form and the backend's
    ``linear_kernel_preference`` picks, per layer, the first kernel that can implement it.
    """


@hookspec
def genserve_register_attention(register):
    """Register attention implementations: ``register("triton", TritonPagedAttention)``.

    The class follows ``genserve.attention.base.AttentionImpl``. A backend names the
    implementations it prefers, in order; the first registered and usable one wins.
    """


@hookspec
def genserve_register_lora(register):
    """Register LoRA methods: ``register("torch", TorchLoRA)``.

    The class follows ``genserve.layers.lora.LoRAMethod``: it applies the adapters of a
    batch (one adapter per request) to a linear layer's output.
    """
