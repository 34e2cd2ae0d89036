"""One rank's engine, from parsed flags: the assembly of the pieces the other modules choose.

Registries decide everything by name (backend, architecture, quantizer, attention):
``model_builder`` builds the model, ``kv_sizing`` counts the cache's blocks, and
``config_resolver`` settles every limit once into a frozen ``EngineConfig`` before the runner
is built. Whether to shard is decided above this module, by ``genserve.executor``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from genserve.backends.base import Backend
from genserve.backends.select import select_backend
from genserve.distributed.state import get_tp_group
from genserve.engine.config_resolver import ModelTraits, create_engine_config, resolve_cache, resolve_dtype
from genserve.engine.kv_sizing import kv_bytes_per_block, num_kv_blocks
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.model_builder import build_model, load_lora
from genserve.engine.peers import Peers
from genserve.errors import ConfigError
from genserve.loader import source as sources
from genserve.loader.hf_config import eos_ids, load_config, load_tokenizer
from genserve.plugins import Plugins, get_plugins
from genserve.spec_decode import build as spec_build
from genserve.spec_decode import medusa as medusa_heads
from genserve.spec_decode.base import Proposer, ProposerContext
from genserve.spec_decode.speculator import Speculator

logger = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    """A built engine and what it was built from."""

    engine: LLMEngine
    tokenizer: object  # a transformers tokenizer, or None (token ids only)
    model_config: object  # the model's Hugging Face config
    source: sources.ModelSource
    backend: Backend
    attention: str  # the attention implementation's registry name
    quantize: str | None  # the weight quantizer's registry name
    load_seconds: float


def create_backend(plugins: Plugins, args) -> Backend:
    """The --backend chosen (``select_backend``) with its typed options from the flags, bound
    to this rank's device."""
    backend_cls = select_backend(plugins, args.backend)
    backend = backend_cls(backend_cls.options_cls.from_args(args))
    tp = get_tp_group()
    if tp.size > 1:
        backend.set_device(tp.rank)
    return backend


def build_engine(args, plugins: Plugins | None = None, *, peers: Peers | None = None) -> LoadedEngine:
    """Build exactly one rank of a serving engine from the flags in ``args`` (a namespace of
    ``genserve.args``): the backend, the tokenizer and config, the model with its weights (and
    LoRA adapters), the KV cache (sized from free memory unless --max-batch-total-tokens
    gives it, the same on every tensor-parallel rank), the resolved frozen config, the runner
    (warmed up) and the ``LLMEngine``.

    Under tensor parallelism the process group is set up first (``genserve.executor``); this
    builds the current rank's shard, and ``peers`` are the other ranks rank 0's runner tells
    of its collective calls. For an engine from flags use ``genserve.executor.create_engine``,
    which also decides whether to shard.

    Units: every length limit (``max_total_tokens``, ``max_input_tokens``,
    ``max_batch_prefill_tokens``, ``max_batch_total_tokens``) counts tokens; the KV cache is
    sized in blocks of ``block_size`` tokens, from ``max_batch_total_tokens`` when given, else
    from ``backend.memory_budget()`` (bytes) over the bytes of one block. Limits not given
    follow TGI: ``max_total_tokens`` = min(the model's ``max_position_embeddings``, the cache's
    tokens), ``max_input_tokens`` = ``max_total_tokens - 1``.

    Returns a ``LoadedEngine``: the ``LLMEngine``, its tokenizer (None when the checkpoint has
    none: token ids only), the Hugging Face config, the resolved ``ModelSource``, the backend
    instance, the attention implementation's name, the quantizer's name (or None) and
    ``load_seconds``, the wall time of the build in seconds.

    Raises:
        BackendError: ``--backend`` names a backend that is not installed or not available.
        ModelNotFoundError: ``--model-id`` is neither a local path nor a reachable hub id, or
            the embedded default model is not installed.
        ConfigError: the flags and the model do not fit: an architecture or quantizer no plugin
            serves (or a quantizer the backend cannot run), no usable attention
            implementation, weights missing from the checkpoint, inconsistent limits,
            ``max_total_tokens`` larger than the KV cache, no memory for one block, a bad
            ``--lora-adapters`` or LoRA flags that do not fit together, or a call for more than one rank (use ``create_engine``).
        UnknownEntryError: ``--quantize`` names no installed quantizer.
        PluginLoadError: a plugin asked for in ``GENSERVE_PLUGINS`` failed to load.
    """
    if ((args.num_shard or 1) > 1 or args.sharded) and get_tp_group().size == 1:
        raise ConfigError("build_engine builds one rank; for --num-shard/--sharded build the engine "
                          "with genserve.executor.create_engine")
    t0 = time.perf_counter()
    plugins = plugins or get_plugins()
    backend = create_backend(plugins, args)
    src = sources.resolve(args.model_id, args.revision, args.gguf_file)
    src, medusa = medusa_heads.model_source(src)  # TGI: a Medusa folder names its base model
    hf_config = load_config(src, args)
    if medusa is not None:  # the heads' fields decide the speculative method (spec_build.resolve)
        hf_config.medusa_num_heads = medusa["medusa_num_heads"]
        hf_config.medusa_num_layers = medusa.get("medusa_num_layers")
    dtype = resolve_dtype(args, backend.default_dtype)
    model, attn_cls, quant_name = build_model(plugins, backend, args, src, hf_config, dtype)
    lora = load_lora(args, plugins, model, backend, dtype) if lora_wanted(args) else None
    tokenizer = load_tokenizer(src, args)

    traits = ModelTraits.of(model, hf_config)
    spec = spec_build.resolve(args, hf_config)
    proposer = None
    if spec is not None:
        if traits.is_encoder_decoder:
            raise ConfigError("--speculate: speculative decoding serves decoder-only models")
        ctx = ProposerContext(args, plugins, backend, dtype, model, hf_config, tokenizer, spec.num_tokens)
        proposer = spec_build.create_proposer(spec, ctx, plugins)
    num_blocks = kv_cache_blocks(args, traits, dtype, model, backend, proposer)
    config = create_engine_config(args, traits, dtype, num_blocks)
    if lora is not None:  # a step never needs more adapters than there are device slots
        config = replace(config, scheduler=replace(config.scheduler, max_loras=lora.max_loras))
    runner = backend.create_model_runner(model, config, lora=lora, peers=peers)
    speculator = None
    if spec is not None and proposer is not None:
        if not runner.supports_speculation:
            raise ConfigError(f"--speculate: backend {backend.name!r} does not run verify steps")
        speculator = Speculator(proposer, spec, traits.recompute_at_length, config.max_total_tokens)
        runner.keep_hidden_states = proposer.needs_hidden_states
    runner.allocate_kv_cache(num_blocks)
    if proposer is not None:
        proposer.bind(runner, num_blocks)
    runner.warmup()
    decoder_start = model.decoder_start_token_id if traits.is_encoder_decoder else None
    engine = LLMEngine(runner, tokenizer, config, num_blocks, eos_ids(tokenizer, hf_config), decoder_start,
                       speculator=speculator)
    return LoadedEngine(engine, tokenizer, hf_config, src, backend, attn_cls.name, quant_name,
                        time.perf_counter() - t0)


def lora_wanted(args) -> bool:
    """Whether the engine serves LoRA adapters: startup ones, or loads at run time. Raises
    ConfigError for LoRA flags that cannot work together."""
    if args.enable_lora_runtime_updates:
        if not args.lora_modules_dir:
            raise ConfigError("--enable-lora-runtime-updates needs --lora-modules-dir: the directories "
                              "run-time loads may read adapters from")
        if get_tp_group().size > 1:
            raise ConfigError("--enable-lora-runtime-updates is not supported with tensor parallelism "
                              "(--num-shard) yet: load the adapters at startup with --lora-adapters")
    elif args.lora_modules_dir:
        raise ConfigError("--lora-modules-dir is only read with --enable-lora-runtime-updates")
    wanted = bool(args.lora_adapters or args.enable_lora_runtime_updates)
    if not wanted and (args.max_loras is not None or args.max_lora_rank is not None):
        raise ConfigError("--max-loras and --max-lora-rank need LoRA adapters (--lora-adapters or "
                          "--enable-lora-runtime-updates)")
    return wanted


def kv_cache_blocks(args, traits: ModelTraits, dtype, model, backend: Backend,
                    proposer: Proposer | None = None) -> int:
    """KV-cache blocks for this rank's model on ``backend``; every rank gets the same count
    (the smallest any rank can hold), since the scheduler on rank 0 hands them out. A
    speculative proposer with its own KV (a draft model) adds its bytes to every block."""
    request = resolve_cache(args, traits, dtype)
    per_block = kv_bytes_per_block(model.kv_cache_spec(), request.block_size, request.kv_cache_dtype)
    if proposer is not None:
        per_block += proposer.kv_bytes_per_block(request.block_size, request.kv_cache_dtype)
    return get_tp_group().min_over_ranks(num_kv_blocks(request, per_block, backend.memory_budget))
