"""One rank's model: the architecture, quantizer and attention the registries choose for it,
constructed on the backend's device with its layer implementations, its weights loaded, and its
LoRA adapters attached."""

from __future__ import annotations

import logging
import os

import torch

from genserve.attention.base import AttentionImpl, AttentionSpec
from genserve.errors import ConfigError
from genserve.loader.model_weights import load_weights
from genserve.loader.source import ModelSource
from genserve.models.base import CausalLM, ModelContext, build_model as construct_model
from genserve.models.select import ArchitectureError, select_architecture
from genserve.plugins import Plugins

logger = logging.getLogger(__name__)


def choose_attention(plugins: Plugins, backend, forced: str | None, spec_probe: AttentionSpec,
                     dtype: torch.dtype) -> type[AttentionImpl]:
    """The first attention implementation (``forced``, else the backend's preference order)
    that serves ``spec_probe`` in ``dtype`` on the backend's device. Raises ``ConfigError``
    listing why each candidate cannot."""
    names = (forced,) if forced else backend.attention_preference
    reasons = []
    for name in names:
        if name not in plugins.attention:
            reasons.append(f"{name}: not installed")
            continue
        cls = plugins.attention.get(name)
        why = cls.supports(spec_probe, dtype, backend.device)
        if why is None:
            return cls
        reasons.append(f"{name}: {why}")
    raise ConfigError("no usable attention implementation (" + "; ".join(reasons) + ")")


def attention_probe(config) -> AttentionSpec:
    """The attention shape of a typical layer of ``config`` (the whole model's heads)."""
    config = getattr(config, "text_config", None) or config  # vision-language: the text model's
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return AttentionSpec(config.num_attention_heads, head_dim,
                         getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                         head_dim ** -0.5)


def architecture(plugins: Plugins, config, model_impl: str = "auto") -> type[CausalLM]:
    """The model class for ``config``: the registered one, or the transformers fallback
    (``genserve.models.select``, ``--model-impl``). Raises ConfigError."""
    try:
        return select_architecture(plugins.architectures, config, model_impl)
    except ArchitectureError as exc:
        raise ConfigError(str(exc)) from None


def quantizer(plugins: Plugins, backend, args, config, src: ModelSource, dtype: torch.dtype = torch.float32):
    """(--quantize name or None, ``QuantizationConfig`` or None) from the flag and the
    checkpoint (``layers/quantization/detect.py``), its linear kernels chosen in the backend's
    ``linear_kernel_preference``. ``--quantize gguf`` serves a GGUF checkpoint in its quantized
    form (``layers/quantization/gguf.py``); without it a GGUF file is dequantized at load (greedy
    parity with transformers, docs/quantization.md). Raises ``ConfigError`` for a mismatch or a
    refused setting."""
    from genserve.layers.quantization.base import LinearKernelChooser, QuantizationError
    from genserve.layers.quantization.detect import build_quantization

    kernels = LinearKernelChooser(backend.device, backend.linear_kernel_preference, plugins.linear_kernels)
    if src.is_gguf and args.quantize == "gguf":
        from genserve.layers.quantization.gguf import GGUFConfig
        from genserve.loader.gguf_weights import tensor_types

        assert src.gguf_file is not None  # is_gguf means a file was found
        return "gguf", GGUFConfig(kernels, tensor_types(src.path / src.gguf_file, config), dtype)
    try:
        return build_quantization(plugins.quantizers, args.quantize, config,
                                  None if src.is_gguf else src.path, kernels, backend.name)
    except QuantizationError as exc:
        raise ConfigError(str(exc)) from None


def build_model(plugins: Plugins, backend, args, src: ModelSource, config, dtype: torch.dtype):
    """(model, attention class, quantizer name): the model constructed on ``backend.device``,
    its weights loaded and processed, in eval mode (the backend told: ``after_weights_loaded``)."""
    model_cls = architecture(plugins, config, args.model_impl)
    quant_name, quant_config = quantizer(plugins, backend, args, config, src, dtype)
    forced = "torch" if not backend.options.custom_kernels else getattr(args, "attention", None)
    attn_cls = choose_attention(plugins, backend, forced, attention_probe(config), dtype)
    logger.info("backend %s, attention %s, dtype %s", backend.name, attn_cls.name, dtype)
    # Without a forced choice, layers the chosen kernel cannot serve fall back in backend order.
    fallbacks = () if forced else tuple(
        plugins.attention.get(n) for n in backend.attention_preference
        if n in plugins.attention and plugins.attention.get(n) is not attn_cls)
    ctx = ModelContext(dtype=dtype, device=backend.device, attention_cls=attn_cls, quant=quant_config,
                       attention_fallbacks=fallbacks, layer_ops=backend.layer_ops())
    try:
        model = construct_model(model_cls, config, ctx)
    except ValueError as exc:  # a model that refuses this configuration says why
        raise ConfigError(f"{model_cls.__name__}: {exc}") from None
    load_weights(model, src, config, args.load_format, dtype)
    model.process_weights_after_loading()
    model.eval()
    backend.after_weights_loaded(model)
    return model, attn_cls, quant_name


def load_lora(args, plugins: Plugins, model, backend, dtype: torch.dtype):
    """The LoRAManager for ``--lora-adapters`` (and ``--max-loras``, ``--max-lora-rank``,
    ``--enable-lora-runtime-updates``), its slots attached to ``model``. The method
    (``plugins.lora``) is the first of the backend's ``lora_preference`` registered, unless GENSERVE_LORA_METHOD names
    another. Raises ``ConfigError`` for an adapter that cannot be applied or bad limits."""
    from genserve.lora import LoRAError, load_lora_manager

    name = os.environ.get("GENSERVE_LORA_METHOD") or next(
        (n for n in backend.lora_preference if n in plugins.lora), "torch")
    method = plugins.lora.get(name)()
    try:
        return load_lora_manager(args.lora_adapters, model, method, backend.device, dtype,
                                 max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                                 runtime_updates=args.enable_lora_runtime_updates)
    except (LoRAError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
