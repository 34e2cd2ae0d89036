"""Composition root: from parsed flags to a running engine.

Registries decide everything by name (backend, architecture, quantizer, attention); this
module only wires the chosen pieces together and sizes the KV cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from genserve.backends.select import select_backend
from genserve.distributed.state import get_tp_group
from genserve.engine.config import EngineConfig
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.scheduler import SchedulerConfig
from genserve.loader import source as sources
from genserve.models.base import ModelContext
from genserve.plugins import Plugins, get_plugins

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class ConfigError(ValueError):
    """The flags and the model do not fit together; the message says how."""


@dataclass
class LoadedEngine:
    engine: LLMEngine
    tokenizer: object
    model_config: object
    source: sources.ModelSource
    backend: object
    attention: str
    quantize: str | None
    load_seconds: float


def load_config(src: sources.ModelSource, args):
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": bool(getattr(args, "trust_remote_code", False))}
    if src.is_gguf:
        kwargs["gguf_file"] = src.gguf_file
    config = AutoConfig.from_pretrained(str(src.path), **kwargs)
    if getattr(args, "rope_scaling", None):
        factor = args.rope_factor or 1.0
        config.rope_scaling = {"rope_type": args.rope_scaling, "factor": factor}
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update({"rope_type": args.rope_scaling, "factor": factor})
        config.rope_parameters = params
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(src: sources.ModelSource, args):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": bool(getattr(args, "trust_remote_code", False))}
    if src.is_gguf:
        kwargs["gguf_file"] = src.gguf_file
    elif not any((src.path / f).exists() for f in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: serving token ids only", src.path)
        return None
    tok = AutoTokenizer.from_pretrained(str(src.path), **kwargs)
    path = getattr(args, "tokenizer_config_path", None)
    if path:
        import json

        with open(path) as f:
            template = json.load(f).get("chat_template")
        if template:
            tok.chat_template = template
    return tok


def choose_attention(plugins: Plugins, backend, forced: str | None, spec_probe, dtype) -> type:
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


def eos_ids(tokenizer, config) -> set[int]:
    ids = set()
    for source in (getattr(config, "eos_token_id", None),
                   getattr(getattr(config, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def build_engine(args, plugins: Plugins | None = None) -> LoadedEngine:
    from genserve.distributed import launch

    if launch.sharding_requested(args):  # spawns the other ranks, then builds rank 0 through here
        return launch.build_sharded_engine(args, plugins)
    t0 = time.perf_counter()
    plugins = plugins or get_plugins()
    backend_cls = select_backend(plugins, args.backend)
    lora_spec = getattr(args, "lora_adapters", None)
    backend = backend_cls({
        "cuda_memory_fraction": args.cuda_memory_fraction,
        # Decode graphs are captured without adapters and would replay without them: with
        # --lora-adapters every step runs eagerly (docs/lora.md).
        "cuda_graphs": "0" if lora_spec else args.cuda_graphs,
        "disable_custom_kernels": args.disable_custom_kernels,
    })
    tp = get_tp_group()
    if tp.size > 1:
        backend.set_device(tp.rank)
    src = sources.resolve(args.model_id, args.revision, args.gguf_file)
    config = load_config(src, args)
    if config.model_type not in plugins.architectures:
        known = ", ".join(plugins.architectures) or "none"
        raise ConfigError(f"model type {config.model_type!r} is not supported by any installed "
                          f"plugin; supported: {known}")
    model_cls = plugins.architectures.get(config.model_type)
    dtype = DTYPES[args.dtype] if args.dtype else backend.default_dtype

    quant_name, quant_config = _quantization(plugins, args, config, src, backend)

    from genserve.attention.base import AttentionSpec

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    probe = AttentionSpec(config.num_attention_heads, head_dim,
                          getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                          head_dim ** -0.5)
    forced = "torch" if args.disable_custom_kernels else getattr(args, "attention", None)
    attn_cls = choose_attention(plugins, backend, forced, probe, dtype)
    logger.info("backend %s, attention %s, dtype %s", backend.name, attn_cls.name, dtype)

    # Without a forced choice, layers the chosen kernel cannot serve fall back in backend order.
    fallbacks = () if forced else tuple(
        plugins.attention.get(n) for n in backend.attention_preference
        if n in plugins.attention and plugins.attention.get(n) is not attn_cls)
    ctx = ModelContext(dtype=dtype, device=backend.device, attention_cls=attn_cls, quant=quant_config,
                       attention_fallbacks=fallbacks)
    with torch.device(backend.device):
        model = model_cls(config, ctx)
    _load_weights(model, src, config, args, dtype)
    model.process_weights_after_loading()
    model.eval()
    if hasattr(backend, "optimize_model"):
        model = backend.optimize_model(model) or model
    lora = _load_lora(lora_spec, plugins, model, backend, dtype) if lora_spec else None
    tokenizer = load_tokenizer(src, args)

    engine_config = _engine_config(args, config, dtype)
    decoder_start = None
    if getattr(model, "is_encoder_decoder", False):
        # Decoder K/V depend on the encoder input, which the prefix-cache block hashes do not cover.
        engine_config.enable_prefix_caching = False
        decoder_start = model.decoder_start_token_id
    if lora is not None:
        # Adapted k/v projections make a block's KV depend on the adapter, which the prefix-cache
        # block hashes do not cover: a hit could hand one adapter's KV to another request.
        engine_config.enable_prefix_caching = False
    if getattr(model, "recompute_at_length", None) is not None:
        # Its KV depends on the sequence's length (longrope's factor set), which block hashes do not cover.
        engine_config.enable_prefix_caching = False
    runner = backend.create_model_runner(model, engine_config)
    if args.disable_overlap_steps:
        runner.overlap_steps = False  # read by LLMEngine; an instance attribute beats the class's
    if lora is not None:
        runner.lora = lora  # ModelRunner puts lora.batch_for(...) in each step's ForwardBatch
    # Every rank must hold the same number of blocks: the scheduler on rank 0 hands them out.
    num_blocks = tp.min_over_ranks(_num_blocks(args, engine_config, runner, backend))
    runner.allocate_kv_cache(num_blocks)
    cache_tokens = num_blocks * engine_config.block_size
    _fit_limits(args, engine_config, config, cache_tokens)
    if hasattr(runner, "warmup"):
        runner.warmup()
    engine = LLMEngine(runner, tokenizer, engine_config, num_blocks, eos_ids(tokenizer, config),
                       decoder_start)
    return LoadedEngine(engine, tokenizer, config, src, backend, attn_cls.name, quant_name,
                        time.perf_counter() - t0)


def _quantization(plugins: Plugins, args, config, src, backend):
    """(--quantize name, QuantizationConfig) from the flag and the checkpoint (layers/quantization/detect.py)."""
    from genserve.layers.quantization.base import LinearKernelChooser, QuantizationError
    from genserve.layers.quantization.detect import build_quantization

    kernels = LinearKernelChooser(backend.device, backend.linear_kernel_preference, plugins.linear_kernels)
    try:
        return build_quantization(plugins.quantizers, args.quantize, config, None if src.is_gguf else src.path,
                                  kernels, backend.name, backend.supported_quantizers)
    except QuantizationError as exc:
        raise ConfigError(str(exc)) from None


def _load_lora(spec: str, plugins: Plugins, model, backend, dtype):
    """The LoRAManager for ``--lora-adapters``, its layers attached to ``model``. The method
    (``plugins.lora``) is "torch" unless GENSERVE_LORA_METHOD names another."""
    import os

    from genserve.lora import LoRAError, load_lora_manager

    method = plugins.lora.get(os.environ.get("GENSERVE_LORA_METHOD") or "torch")()
    try:
        return load_lora_manager(spec, model, method, backend.device, dtype)
    except LoRAError as exc:
        raise ConfigError(str(exc)) from exc


def _load_weights(model, src, config, args, dtype) -> None:
    if args.load_format == "dummy":
        _random_init(model)
        return
    if src.is_gguf:
        from genserve.loader.gguf_weights import iter_gguf

        weights = iter_gguf(src.path, src.gguf_file, config, dtype)
    else:
        from genserve.loader.safetensors_weights import iter_safetensors

        weights = iter_safetensors(src.path)
    loaded = model.load_weights(weights)
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ConfigError(f"checkpoint {src.model_id!r} has no weights for {len(missing)} parameters, "
                          f"e.g. {missing[:3]}")


@torch.no_grad()
def _random_init(model) -> None:
    """Small random weights (norm weights at 1) so dummy models produce finite, varied logits."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    filled = model.init_dummy_quantized(gen)  # packed integer weights: their quant method's job
    for name, p in model.named_parameters():
        if id(p) in filled:
            continue
        if "norm" in name or p.dim() == 1:
            p.fill_(1.0 if "norm" in name and "bias" not in name else 0.0)
        else:
            chunk = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen) \
                if p.numel() < 50_000_000 else None
            if chunk is None:  # big tensors: fill on the device
                p.normal_(0.0, 0.02)
            else:
                p.copy_(chunk)


def _engine_config(args, config, dtype) -> EngineConfig:
    kv_dtype = DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None
    max_pos = getattr(config, "max_position_embeddings", None) or 4096
    max_total = args.max_total_tokens or max_pos
    max_input = args.max_input_tokens or max_total - 1
    prefill = args.max_batch_prefill_tokens or max(max_input + 50, 512)
    return EngineConfig(
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        block_size=args.block_size,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        enable_prefix_caching=not args.disable_prefix_caching,
        scheduler=SchedulerConfig(
            max_batch_prefill_tokens=prefill,
            max_batch_size=args.max_batch_size or 256,
            waiting_served_ratio=args.waiting_served_ratio,
            max_waiting_tokens=args.max_waiting_tokens,
        ),
        watermark_gamma=args.watermark_gamma,
        watermark_delta=args.watermark_delta,
    )


def _num_blocks(args, ec: EngineConfig, runner, backend) -> int:
    if ec.max_batch_total_tokens:
        return -(-ec.max_batch_total_tokens // ec.block_size)
    per_block = runner.kv_bytes_per_block()
    blocks = backend.memory_budget() // per_block
    # Never more than the scheduler could ever use: every sequence at full length.
    cap = -(-ec.max_total_tokens // ec.block_size) * ec.scheduler.max_batch_size
    blocks = int(min(blocks, cap))
    if blocks < 1:
        raise ConfigError("not enough memory left for a single KV-cache block")
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", blocks, ec.block_size,
                blocks * per_block / 2**20)
    return blocks


def _fit_limits(args, ec: EngineConfig, config, cache_tokens: int) -> None:
    """TGI's defaults: limits follow the model and the cache unless given; given ones are checked."""
    max_pos = getattr(config, "max_position_embeddings", None) or ec.max_total_tokens
    if args.max_total_tokens is None:
        ec.max_total_tokens = min(max_pos, cache_tokens)
        if args.max_input_tokens is None:
            ec.max_input_tokens = ec.max_total_tokens - 1
    if ec.max_input_tokens >= ec.max_total_tokens:
        raise ConfigError(f"--max-input-tokens ({ec.max_input_tokens}) must be smaller than "
                          f"--max-total-tokens ({ec.max_total_tokens})")
    if ec.max_total_tokens > cache_tokens:
        raise ConfigError(f"--max-total-tokens ({ec.max_total_tokens}) is larger than the KV cache "
                          f"({cache_tokens} tokens); lower it or raise --max-batch-total-tokens")
