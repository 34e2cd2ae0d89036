"""What the server holds: the engine (loaded in the background), limits, admission and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from genserve import __version__

# The same parser engine/build.py uses to load the adapters, so the ids requests may name
# (validation, OpenAI ``model``) are exactly the ids loaded.
from genserve.lora.spec import parse_lora_adapters
from genserve.server import errors
from genserve.server.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    max_client_batch_size: int
    disable_grammar: bool
    enable_prefill_logprobs: bool


def model_vocab_size(loaded) -> int:
    """Rows of the model's logits (the runner's, else the config's)."""
    runner = getattr(loaded.engine, "runner", None)
    return int(getattr(runner, "vocab_size", None) or loaded.model_config.vocab_size)


@dataclass
class Permit:
    """One admitted HTTP request; remembers its engine request ids for shutdown."""

    state: "ServerState"
    request_ids: set[str] = field(default_factory=set)
    shutting_down: bool = False
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state._permits.discard(self)
            self.state.in_flight -= 1

    def __hash__(self) -> int:
        return id(self)


class ServerState:
    def __init__(self, args, build=None):
        self.args = args
        self._build = build
        self.metrics = Metrics()
        self.loaded = None  # LoadedEngine
        self.engine = None  # AsyncEngine
        self.tokenizer = None
        self.vocab_size = 0
        self.limits: Limits | None = None
        self.grammar = None  # GrammarCompiler
        # Vision-language models: the model's processor (None: text-only) and the image limits.
        self.multimodal = None  # genserve.multimodal.processor.MultiModalProcessor
        self.image_limits = None  # genserve.multimodal.images.ImageLimits
        self.status = "loading"  # loading | ready | failed
        self.error: str | None = None
        self.draining = False
        self.in_flight = 0
        self._permits: set[Permit] = set()
        self.lora_adapters = parse_lora_adapters(args.lora_adapters)
        self.started = int(time.time())
        self.last_success = 0.0
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._health_lock = asyncio.Lock()
        self._parked = threading.Event()
        # TGI's validation workers: tokenization and grammar compilation run here, never on the
        # event loop (tokenizers and llguidance release the GIL while they work), and at most
        # --validation-workers at a time, so a burst of heavy requests queues instead of
        # filling the default executor.
        self.workers = ThreadPoolExecutor(max_workers=max(1, int(getattr(args, "validation_workers", 2) or 2)),
                                          thread_name_prefix="genserve-validation")

    # -- loading --------------------------------------------------------------------------
    def load(self) -> None:
        """Build the engine, run a warmup generation, start the engine thread (blocking)."""
        from genserve.engine.async_engine import AsyncEngine
        from genserve.engine.warmup import warm_up
        from genserve.executor import create_engine
        from genserve.multimodal.images import ImageLimits
        from genserve.multimodal.processor import MultiModalProcessor
        from genserve.server.grammar import GrammarCompiler

        loaded = (self._build or create_engine)(self.args)
        engine = loaded.engine
        vocab = model_vocab_size(loaded)
        warm_up(engine, vocab)
        # Loading leaves millions of long-lived objects; frozen, every later full collection
        # skips them instead of stalling the engine loop mid-step (vLLM and SGLang do this too).
        gc.collect()
        gc.freeze()
        cfg = engine.config
        a = self.args
        self.limits = Limits(a.max_concurrent_requests, a.max_best_of, a.max_stop_sequences,
                             a.max_top_n_tokens, cfg.max_input_tokens, cfg.max_total_tokens,
                             a.max_client_batch_size, a.disable_grammar_support,
                             a.enable_prefill_logprobs)
        self.grammar = GrammarCompiler(loaded.tokenizer, vocab, engine.eos_token_ids)
        self.multimodal = MultiModalProcessor.for_engine(loaded, a)
        self.image_limits = ImageLimits.from_args(a)
        if a.disable_grammar_support:
            logger.info("grammar support: off (--disable-grammar-support)")
        elif (reason := self.grammar.check()) is not None:  # /info and 422s say so too
            logger.warning("grammar support: off, %s", reason)
        else:
            logger.info("grammar support: on")
        self.loaded, self.tokenizer, self.vocab_size = loaded, loaded.tokenizer, vocab
        self.engine = AsyncEngine(engine)
        self.engine.step_listeners.append(self.metrics.on_step)
        self.engine.start()
        self.last_success = time.monotonic()
        self.status = "ready"
        logger.info("model %s ready in %.1fs (max_input_tokens %d, max_total_tokens %d)",
                    self.model_id, loaded.load_seconds,
                    cfg.max_input_tokens, cfg.max_total_tokens)

    @staticmethod
    def probe_ids(tokenizer, vocab_size: int) -> list[int]:
        """A few prompt tokens for warmup and health probes (always inside the model's vocabulary)."""
        ids = tokenizer("Hello", add_special_tokens=True)["input_ids"] if tokenizer is not None else []
        return [t for t in ids if 0 <= t < vocab_size] or [0]

    def load_in_background(self, on_failure) -> threading.Thread:
        def run():
            try:
                self.load()
            except BaseException as exc:  # reported as one line by the CLI
                self.status, self.error = "failed", f"{exc}" or type(exc).__name__
                logger.debug("load failed", exc_info=True)
                on_failure(exc)
                return
            # Stay alive until shutdown. With GNU OpenMP, the thread that ran the load owns an
            # OpenMP thread team; if it exits, the engine thread's parallel regions become ~10x
            # slower (measured: 32 tokens of SmolLM2 in 15 s instead of 1.4 s on 2 cores).
            self._parked.wait()

        thread = threading.Thread(target=run, name="genserve-load", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.workers.shutdown(wait=False, cancel_futures=True)
        self._parked.set()

    # -- admission ------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.status == "loading":
            raise errors.unavailable("the model is loading")
        if self.status == "failed":
            raise errors.unavailable(f"the model failed to load: {self.error}")
        if self.draining:
            raise errors.unavailable("the server is shutting down")

    def loaded_limits(self) -> Limits:
        """The limits, which loading the engine sets; before that there are none to read."""
        assert self.limits is not None, "the limits are set when the engine has loaded"
        return self.limits

    def admit(self) -> Permit:
        self.require_ready()
        if not self.engine.is_alive:
            raise errors.generation(f"the engine is not running: {self.engine.dead or 'stopped'}")
        if self.in_flight >= self.loaded_limits().max_concurrent_requests:
            self.metrics.request_failed("overloaded")
            raise errors.overloaded()
        self.in_flight += 1
        permit = Permit(self)
        self._permits.add(permit)
        return permit

    def abort_all(self) -> None:
        """Shutdown after the grace period: end every in-flight request with a clean error."""
        for permit in list(self._permits):
            permit.shutting_down = True
            for rid in list(permit.request_ids):
                self.engine.abort(rid)

    async def in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a validation worker thread, awaited without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, partial(fn, *args))

    # -- outcomes -------------------------------------------------------------------------
    def record_validated(self, valid) -> float:
        """Observe a validated request's prompt length and max_new_tokens; returns the time
        validation ended (``time.monotonic()``)."""
        self.metrics.input_length.observe(valid.input_length)
        self.metrics.max_new_tokens.observe(valid.max_new_tokens)
        return time.monotonic()

    def record_success(self, *, start: float, validated: float, arrival: float,
                       first_scheduled: float | None, generated: int,
                       spec_proposed: int = 0, spec_accepted: int = 0) -> float:
        """The one place a request's success is recorded (every route calls it): the
        ``tgi_request_*`` histograms, and ``last_success`` that spares /health its probe.
        Times are ``time.monotonic()``; ``spec_*``: speculative tokens proposed for the
        request and accepted (summed over its sequences). Returns the end time."""
        self.last_success = time.monotonic()
        self.metrics.request_succeeded(start=start, validated=validated, arrival=arrival,
                                       first_scheduled=first_scheduled, end=self.last_success,
                                       generated=generated, spec_proposed=spec_proposed,
                                       spec_accepted=spec_accepted)
        return self.last_success

    async def probe_health(self, fresh_s: float = 5.0, timeout_s: float = 30.0) -> bool:
        """Whether the engine answers: true when a request succeeded in the last ``fresh_s``
        seconds, else after a one-token generation (one probe at a time; concurrent callers
        share its outcome)."""
        from genserve.engine.sampling_params import SamplingParams
        from genserve.server.inference import new_request_id

        if time.monotonic() - self.last_success < fresh_s:
            return True
        async with self._health_lock:
            if time.monotonic() - self.last_success < fresh_s:
                return True
            ids = self.probe_ids(self.tokenizer, self.vocab_size)

            async def one_token() -> bool:
                async with aclosing(self.engine.generate(f"health-{new_request_id()}", ids,
                                                         SamplingParams(max_new_tokens=1))) as outs:
                    async for out in outs:
                        if out.finished:
                            return out.error is None and out.finish_reason.value != "aborted"
                return False

            try:
                ok = await asyncio.wait_for(one_token(), timeout_s)
            except Exception:
                return False
            if ok:
                self.last_success = time.monotonic()
            return ok

    # -- facts ----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        if self.loaded is not None:
            return self.loaded.source.model_id
        return self.args.model_id or "default"

    @property
    def model_name(self) -> str:
        return self.args.served_model_name or self.model_id

    @property
    def system_fingerprint(self) -> str:
        return f"{__version__}-{os.environ.get('DOCKER_LABEL') or 'native'}"

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.loaded.engine.detok.token_text(token_id)
        return text

    @property
    def grammar_supported(self) -> bool:
        """Grammar, tools and response_format requests can run (flag and tokenizer allow)."""
        return not self.loaded_limits().disable_grammar and self.grammar is not None and self.grammar.available

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (possibly part of a UTF-8 character), cached."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = self.loaded.engine.detok.token_bytes(token_id)
        return raw

    def is_special(self, token_id: int) -> bool:
        return token_id in self.loaded.engine.detok.special_ids

    def info(self) -> dict:
        le, cfg = self.loaded, self.loaded.engine.config
        limits = self.loaded_limits()
        path = str(le.source.path)
        sha = le.source.revision
        if "/snapshots/" in path:  # a hub cache snapshot is named by its commit
            sha = path.rsplit("/snapshots/", 1)[1].split("/")[0]
        kv_dtype = cfg.kv_cache_dtype
        blocks = le.engine.blocks.num_blocks
        return {
            "model_id": le.source.model_id,
            "model_sha": sha,
            "model_pipeline_tag": None,
            "model_dtype": str(cfg.dtype).replace("torch.", ""),
            "model_device_type": str(getattr(le.backend.device, "type", le.backend.device)),
            "max_concurrent_requests": limits.max_concurrent_requests,
            "max_best_of": limits.max_best_of,
            "max_stop_sequences": limits.max_stop_sequences,
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens,
            "validation_workers": self.args.validation_workers,
            "max_client_batch_size": limits.max_client_batch_size,
            "router": "genserve",
            "version": __version__,
            "sha": os.environ.get("GIT_SHA"),
            "docker_label": os.environ.get("DOCKER_LABEL"),
            "backend": le.backend.name,
            "attention": le.attention,
            "quantize": le.quantize,
            "kv_cache_dtype": str(kv_dtype).replace("torch.", "") if kv_dtype is not None else None,
            "block_size": cfg.block_size,
            "kv_blocks_total": blocks,
            "kv_cache_tokens": blocks * cfg.block_size,
            "lora_adapters": sorted(self.lora_adapters),
            "grammar_support": self.grammar_supported,
            "load_seconds": round(le.load_seconds, 3),
        }
