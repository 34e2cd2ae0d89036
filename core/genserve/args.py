"""TGI's launcher flags, each also read from its environment variable (``--max-total-tokens``
from ``MAX_TOTAL_TOKENS``), plus genserve's own."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def _bool_env(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse_sizes(raw) -> tuple[int, ...] | None:
    """A list of sizes as flags give it ("1,2,4", 4, [1, 2]) -> sorted unique positive ints;
    None stays None (not given); 0, "0", "" and [] give () (none)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [x for x in raw.split(",") if x.strip()]
    elif isinstance(raw, int):
        raw = [raw]
    return tuple(sorted({int(x) for x in raw if int(x) > 0}))


def size_list(text: str) -> str:
    """A flag's comma-separated list of sizes, checked when parsed ("4,1" -> "1,4"); a bad
    one is argparse's error ("invalid size_list value"), not a traceback at start-up."""
    return ",".join(map(str, parse_sizes(text) or ()))


@dataclass(frozen=True)
class Flag:
    name: str  # --like-this
    type: Callable[[str], object] | None = str  # a type, or a parser such as size_list
    default: object = None
    help: str = ""
    env: str | None = None  # defaults to NAME_IN_CAPITALS
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    extra_env: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env_names(self) -> tuple[str, ...]:
        return (self.env or self.dest.upper(),) + self.extra_env

    def env_default(self):
        """The value when the flag is not on the command line: its environment variable's, else
        the declared default."""
        value = next((os.environ[e] for e in self.env_names if e in os.environ), None)
        if value is None:
            return self.default
        return _bool_env(value) if self.type is bool else self.type(value)


FLAGS: list[Flag] = [
    # Model
    Flag("--model-id", str, None, "Hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"),
    Flag("--revision", str, None, "Hub revision"),
    Flag("--gguf-file", str, None, "GGUF file name inside --model-id"),
    Flag("--load-format", str, "auto", "auto, or dummy for random weights (benchmarks)", choices=("auto", "dummy")),
    Flag("--dtype", str, None, "float32, float16 or bfloat16 (default: the backend's)",
         choices=("float32", "float16", "bfloat16")),
    Flag("--quantize", str, None, "Weight quantization method (see `genserve plugins`)"),
    Flag("--kv-cache-dtype", str, None, "fp8_e4m3fn or fp8_e5m2", choices=("fp8_e4m3fn", "fp8_e5m2", "fp8")),
    Flag("--model-impl", str, "auto", "auto: genserve's module for the model type, else the transformers "
         "fallback; genserve or transformers to insist on one", env="GENSERVE_MODEL_IMPL",
         choices=("auto", "genserve", "transformers")),
    Flag("--trust-remote-code", bool, False, "Allow custom configuration code from the hub"),
    Flag("--tokenizer-config-path", str, None, "tokenizer_config.json with a chat_template"),
    Flag("--rope-scaling", str, None, "linear or dynamic", choices=("linear", "dynamic")),
    Flag("--rope-factor", float, None, "RoPE scaling factor"),
    # Hardware
    Flag("--backend", str, "auto", "auto, cpu, cuda, rocm, ipex, neuron or gaudi", env="GENSERVE_BACKEND"),
    Flag("--num-shard", int, None, "Tensor-parallel degree"),
    Flag("--sharded", bool, False, "Shard over all visible devices"),
    # Several machines (torchrun's names and env vars; docs/distributed.md): --num-shard stays
    # the total tensor-parallel degree, split evenly over the nodes.
    Flag("--nnodes", int, 1, "Machines one model spans (--num-shard is the total over all of them)"),
    Flag("--node-rank", int, 0, "This machine's index, 0..nnodes-1; node 0 serves HTTP, the others "
         "only run shards"),
    Flag("--master-addr", str, None, "Address of node 0, where the ranks meet (needed with --nnodes > 1)"),
    Flag("--master-port", int, 29500, "Port of node 0's rendezvous store"),
    Flag("--cuda-graphs", size_list, None, "Batch sizes to capture as CUDA graphs, e.g. 1,2,4,8; 0 disables"),
    Flag("--cuda-memory-fraction", float, 1.0, "Fraction of GPU memory genserve may use"),
    Flag("--disable-custom-kernels", bool, False, "Use the reference PyTorch kernels"),
    Flag("--attention", str, None, "Force an attention implementation by name", env="GENSERVE_ATTENTION"),
    # Limits and batching
    Flag("--max-concurrent-requests", int, 128, "Requests in flight before 429"),
    Flag("--max-best-of", int, 2, "Largest best_of"),
    Flag("--max-stop-sequences", int, 4, "Most stop sequences per request"),
    Flag("--max-top-n-tokens", int, 5, "Largest top_n_tokens"),
    Flag("--max-input-tokens", int, None, "Longest prompt in tokens", aliases=("--max-input-length",),
         extra_env=("MAX_INPUT_LENGTH",)),
    Flag("--max-total-tokens", int, None, "Prompt + new tokens per request"),
    Flag("--max-batch-prefill-tokens", int, None, "Tokens computed in one step (decode rows first, prompt chunks fill the rest)"),
    Flag("--max-batch-total-tokens", int, None, "KV-cache capacity in tokens (default: from free memory)"),
    Flag("--max-batch-size", int, None, "Most sequences in one step"),
    Flag("--waiting-served-ratio", float, 0.3, "Queued/running ratio that lets new requests in"),
    Flag("--max-waiting-tokens", int, 20, "Decode steps after which queued requests are let in"),
    Flag("--max-client-batch-size", int, 4, "Inputs per request where lists are allowed"),
    Flag("--validation-workers", int, 2, "Tokenizer workers"),
    Flag("--block-size", int, 16, "Tokens per KV-cache block", env="GENSERVE_BLOCK_SIZE"),
    Flag("--disable-prefix-caching", bool, False, "Do not reuse KV blocks of shared prompt prefixes",
         env="GENSERVE_DISABLE_PREFIX_CACHING"),
    Flag("--disable-overlap-steps", bool, False,
         "Wait for each step's tokens before launching the next (GPUs overlap them by default)",
         env="GENSERVE_DISABLE_OVERLAP_STEPS"),
    Flag("--speculate", int, None, "Speculative tokens proposed per sequence and step (n-gram proposals, "
         "or Medusa heads when the checkpoint has them: as many as it has heads by default; 4 with "
         "--speculative-model; 0: off)"),
    Flag("--speculative-model", str, None, "Draft model (path or hub id) sharing the tokenizer: proposes "
         "tokens; with --speculative-method eagle, an EAGLE-1 draft", env="GENSERVE_SPECULATIVE_MODEL"),
    Flag("--speculative-method", str, None, "Proposer by registered name (ngram, draft_model, medusa, eagle, "
         "or a plugin's); default: draft_model with --speculative-model, else medusa/ngram as TGI",
         env="GENSERVE_SPECULATIVE_METHOD"),
    Flag("--speculative-max-batch-size", int, None, "No speculation while more sequences decode "
         "than this (default 32)", env="GENSERVE_SPECULATIVE_MAX_BATCH_SIZE"),
    Flag("--enable-prefill-logprobs", bool, False,
         "Accepted for TGI compatibility and changes nothing: prompt logprobs (decoder_input_details) "
         "are always available, computed in chunks of bounded memory"),
    Flag("--disable-grammar-support", bool, False, "Refuse grammar parameters"),
    Flag("--watermark-gamma", float, 0.5, "Watermark green-list fraction"),
    Flag("--watermark-delta", float, 2.0, "Watermark logit bias"),
    Flag("--lora-adapters", str, None, "Comma-separated adapter ids or id=path"),
    # Images (vision-language models; docs/vision.md)
    Flag("--max-images", int, 4, "Most images in one request"),
    Flag("--max-image-bytes", int, 10_000_000, "Largest encoded image in bytes (data URL or download)"),
    Flag("--max-image-pixels", int, 16_777_216, "Largest decoded image in pixels (width x height)"),
    Flag("--image-fetch-timeout", float, 10.0, "Seconds one image download may take"),
    Flag("--max-loras", int, None, "LoRA adapters on the device at once (slots); more are kept on the host "
         "and swapped in, least recently used out (default: one per --lora-adapters entry, at most 16)"),
    Flag("--max-lora-rank", int, None, "Largest LoRA rank of any adapted module (default: the largest "
         "startup adapter's, at least 16 with --enable-lora-runtime-updates)"),
    Flag("--enable-lora-runtime-updates", bool, False, "Allow POST /v1/load_lora_adapter and "
         "/v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); needs --lora-modules-dir",
         extra_env=("VLLM_ALLOW_RUNTIME_LORA_UPDATING",)),
    Flag("--lora-modules-dir", str, None, "Comma-separated directories run-time LoRA loads may read "
         "from; any other path (symlinks resolved) is refused"),
    # Server
    Flag("--hostname", str, "0.0.0.0", "Address to listen on"),
    Flag("--port", int, 3000, "Port to listen on", aliases=("-p",)),
    Flag("--api-key", str, None, "Bearer token required on requests"),
    Flag("--cors-allow-origin", str, None, "Comma-separated allowed origins"),
    Flag("--payload-limit", int, 2_000_000, "Largest request body in bytes"),
    Flag("--json-output", bool, False, "Log as JSON lines"),
    Flag("--otlp-endpoint", str, None, "Export OpenTelemetry traces (TGI's spans) to this OTLP endpoint "
         "(gRPC; OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf for OTLP/HTTP); needs genserve[otel]"),
    Flag("--otlp-service-name", str, "text-generation-inference.router", "OpenTelemetry service name (service.name of the traces)"),
    Flag("--usage-stats", str, "on", "Accepted for TGI compatibility; genserve collects nothing"),
    Flag("--served-model-name", str, None, "Model name reported to OpenAI clients"),
]


def add_flags(parser, flags: Iterable[Flag] = FLAGS) -> None:
    """Add ``flags`` (TGI's and genserve's by default) to ``parser`` (or an argument group),
    each defaulting to its environment variable."""
    for flag in flags:
        names = (flag.name,) + flag.aliases
        help_text = f"{flag.help} [env: {flag.env_names[0]}]"
        if flag.type is bool:
            parser.add_argument(*names, dest=flag.dest, action="store_true", default=flag.env_default(),
                                help=help_text)
        else:
            parser.add_argument(*names, dest=flag.dest, type=flag.type or str, default=flag.env_default(),
                                choices=flag.choices, help=help_text)


def defaults(*, extra_flags: Iterable[Flag] = (), **overrides) -> argparse.Namespace:
    """All flags (and ``extra_flags``, e.g. a backend's own) at their defaults (env vars
    applied), with ``overrides``: for tests and scripts. An unknown name raises AttributeError."""
    parser = argparse.ArgumentParser()
    add_flags(parser, [*FLAGS, *extra_flags])
    ns = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(ns, key):
            raise AttributeError(f"unknown flag {key!r}")
        setattr(ns, key, value)
    return ns
