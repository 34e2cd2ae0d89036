"""``genserve.LLM``: offline batched generation in vLLM's ``LLM`` shape, no server.

    from genserve import LLM, SamplingParams
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32")
    outputs = llm.generate(["Hello, my name is", "The capital of France is"],
                           SamplingParams(max_new_tokens=16))
    print(outputs[0].outputs[0].text)

The keywords are ``genserve serve``'s flags (``max_batch_total_tokens=4096`` for
``--max-batch-total-tokens 4096``), parsed through the same table (``genserve.args.FLAGS``)
with the same defaults and environment variables, so the two never drift. Flags that only
configure the HTTP server are refused. ``generate`` submits every prompt at once and runs the
engine's step loop (``genserve.engine.offline``) until all finish; see docs/offline.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from typing import Any

from genserve.args import FLAGS, Flag, defaults
from genserve.engine.constraints import Constraint
from genserve.engine.offline import GenerationOutput, OfflineRequest, OutputCollector, iter_steps
from genserve.engine.sampling_params import SamplingParams
from genserve.multimodal.images import ImageLimits
from genserve.multimodal.processor import MultiModalProcessor

# A prompt: text (tokenized with the model's special tokens, as TGI's /generate does), token
# ids, or vLLM's dict forms {"prompt": text} / {"prompt_token_ids": ids}; on a vision-language
# model, {"prompt": text, "multi_modal_data": {"image": image or [images]}} with PIL images and
# the model's image token (``LLM.image_token``) in the text once per image.
PromptType = str | Sequence[int] | dict

_HTTP = "configures the HTTP server, which LLM does not run"
_LIMIT = "limits HTTP requests; LLM takes SamplingParams as given"
_URL_IMAGES = "applies to the images the server reads from URLs; LLM takes PIL images"
# serve flags LLM refuses, with the reason. Every other flag in genserve.args.FLAGS is an
# engine flag that build_engine reads, and LLM accepts it.
NOT_OFFLINE_FLAGS: dict[str, str] = {
    "hostname": _HTTP, "port": _HTTP, "api_key": _HTTP, "cors_allow_origin": _HTTP,
    "payload_limit": _HTTP, "json_output": _HTTP, "otlp_endpoint": _HTTP, "otlp_service_name": _HTTP,
    "usage_stats": _HTTP, "served_model_name": _HTTP, "validation_workers": _HTTP,
    "max_concurrent_requests": _LIMIT, "max_best_of": _LIMIT, "max_stop_sequences": _LIMIT,
    "max_top_n_tokens": _LIMIT, "max_client_batch_size": _LIMIT, "enable_prefill_logprobs": _LIMIT,
    "disable_grammar_support": _LIMIT, "max_image_bytes": _URL_IMAGES, "image_fetch_timeout": _URL_IMAGES,
}
U64_MAX = 2**64 - 1


def engine_args(model: str | os.PathLike | None = None, **kwargs: Any) -> argparse.Namespace:
    """The flags ``genserve serve --model-id MODEL --each-keyword value`` would parse.

    ``model``: hub id, local directory or .gguf file; None for the embedded SmolLM2. A keyword
    is a flag's name with underscores (``max_input_tokens``, or its alias ``max_input_length``).
    Raises ``TypeError`` for an unknown keyword, a server-only flag or a value of the wrong
    type, ``ValueError`` for a value outside the flag's choices (or None for a flag that has
    a value by default).
    """
    by_name: dict[str, Flag] = {f.dest: f for f in FLAGS}
    for f in FLAGS:
        by_name.update({a.lstrip("-").replace("-", "_"): f for a in f.aliases if a.startswith("--")})
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        flag = by_name.get(key)
        if flag is None:
            close = difflib.get_close_matches(key, [k for k in by_name if k not in NOT_OFFLINE_FLAGS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"LLM() got an unexpected keyword argument {key!r}{hint} "
                            "(its keywords are `genserve serve`'s engine flags: docs/flags.md)")
        if flag.dest == "model_id":
            raise TypeError("pass the model as LLM's first argument, not as model_id=")
        if flag.dest in NOT_OFFLINE_FLAGS:
            raise TypeError(f"LLM() does not take {key!r}: {flag.name} {NOT_OFFLINE_FLAGS[flag.dest]}")
        if flag.dest in values:
            raise TypeError(f"{key!r} repeats {flag.name}, given already")
        values[flag.dest] = _flag_value(flag, key, value)
    return defaults(model_id=os.fspath(model) if model is not None else None, **values)


def _flag_value(flag: Flag, key: str, value: Any) -> Any:
    if value is None:
        if flag.default is not None:
            raise ValueError(f"{key!r} cannot be None (its default is {flag.default!r})")
        return None
    want = flag.type
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise TypeError(f"{key!r} must be {want.__name__ if want else 'str'}, not {type(value).__name__}")
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"{key!r} must be one of {', '.join(map(repr, flag.choices))}; got {value!r}")
    return value


def build_loaded_engine(args: argparse.Namespace):
    """The one place LLM builds its engine: flags -> ``LoadedEngine`` (``.engine``, ``.tokenizer``),
    through the composition root (one process, or sharded under --num-shard)."""
    from genserve.executor import create_engine

    return create_engine(args)


class LLM:
    """An engine for offline batched generation (vLLM's ``LLM``).

    ``LLM(model, **flags)`` builds the engine exactly as ``genserve serve`` does (same flags,
    defaults and environment variables; see ``engine_args`` for the errors) and warms it up.
    ``generate`` runs a batch of prompts to completion. Not thread-safe: one ``generate`` at a
    time. ``shutdown()`` (or ``with LLM(...) as llm:``) stops the other ranks of a sharded engine.
    """

    def __init__(self, model: str | os.PathLike | None = None, **kwargs: Any):
        from genserve.engine.warmup import warm_up
        from genserve.lora.spec import parse_lora_adapters

        self.args = engine_args(model, **kwargs)
        self.loaded = build_loaded_engine(self.args)
        self.engine = self.loaded.engine
        self.vocab_size = self.engine.runner.vocab_size
        self.adapters = frozenset(parse_lora_adapters(self.args.lora_adapters))
        # Vision-language models: the server's processor adapter and image limits
        # (--max-images, --max-image-pixels); None for a text-only model.
        self.multimodal = MultiModalProcessor.for_engine(self.loaded, self.args)
        self.image_limits = ImageLimits.from_args(self.args)
        warm_up(self.engine, self.vocab_size)

    @property
    def image_token(self) -> str | None:
        """The text that marks an image's place in a prompt (e.g. ``"<image>"``); None for a
        text-only model."""
        return None if self.multimodal is None else self.multimodal.image_token

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer (None for a model without tokenizer files)."""
        return self.loaded.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationOutput]:
        """Generate for every prompt; one ``GenerationOutput`` per prompt, in input order.

        ``prompts``: a string, or a list of strings / token-id lists / vLLM's dicts
        (``{"prompt": text}``, ``{"prompt_token_ids": ids}``); strings are tokenized with the
        tokenizer's special tokens. ``sampling_params``: one for all prompts, one per prompt,
        or None for ``SamplingParams()`` (greedy, 20 new tokens). All prompts are checked before
        any runs: ``TypeError`` for a wrong type, ``ValueError`` for an empty or too long prompt,
        a token id outside the vocabulary, an unloaded LoRA adapter or an invalid sampling
        setting (e.g. ``temperature`` without ``do_sample=True``). ``use_tqdm`` shows a progress
        bar of finished prompts (needs tqdm). A request the engine fails (e.g. it can never fit
        the KV cache) comes back with ``finish_reason`` "error" and ``error`` set.
        """
        items = _prompt_list(prompts)
        params = _params_list(sampling_params, len(items))
        requests = [self._request(p, sp) for p, sp in zip(items, params)]
        shared = [r.params.constraint for r in requests if r.params.constraint is not None]
        if len({id(c) for c in shared}) != len(shared):
            raise ValueError("a grammar constraint holds one request's state: give each prompt its own")
        collector = OutputCollector(requests)
        bar = _progress_bar(len(requests)) if use_tqdm else None
        try:
            for outputs in iter_steps(self.engine, requests):
                finished = collector.add(outputs)
                if bar is not None and finished:
                    bar.update(finished)
        finally:
            if bar is not None:
                bar.close()
        return collector.results()

    def _request(self, prompt: PromptType, params: SamplingParams) -> OfflineRequest:
        text, images, multimodal = None, None, None
        if isinstance(prompt, dict):
            given = set(prompt) - {"multi_modal_data"}
            unknown = given - {"prompt", "prompt_token_ids"}
            if unknown or len(given) != 1:
                raise ValueError("a prompt dict has exactly one of 'prompt', 'prompt_token_ids' (and "
                                 f"'multi_modal_data' with 'prompt'); got {sorted(prompt)}")
            if "multi_modal_data" in prompt:
                if "prompt" not in prompt:
                    raise ValueError("'multi_modal_data' goes with a text 'prompt' holding the image tokens")
                images = self._images(prompt["multi_modal_data"])
            prompt = prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]
        if isinstance(prompt, str):
            tokenizer = self.loaded.tokenizer
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as token ids")
            if not prompt:
                raise ValueError("a prompt cannot be empty")
            text = prompt
            if self.multimodal is not None:  # as the server: the processor, with or without images
                ids, multimodal = self.multimodal.process(prompt, images or [], add_special_tokens=True)
            else:
                ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise TypeError("a token-id prompt is a list of ints")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"token ids must be >= 0 and < {self.vocab_size}")
            if self.multimodal is not None and self.multimodal.image_token_id in ids:
                raise ValueError("token ids hold the image token but no image: give a text prompt with "
                                 "'multi_modal_data'")
        cfg = self.engine.config
        if not ids:
            raise ValueError("a prompt cannot be empty")
        if len(ids) > cfg.max_input_tokens:
            raise ValueError(f"a prompt has {len(ids)} tokens; max_input_tokens is {cfg.max_input_tokens}")
        if len(ids) + params.max_new_tokens > cfg.max_total_tokens:
            raise ValueError(f"prompt tokens + max_new_tokens must be <= max_total_tokens "
                             f"({cfg.max_total_tokens}); given {len(ids)} + {params.max_new_tokens}")
        _check_params(params, self.adapters)
        # A copy per request: one SamplingParams given for many prompts is not shared.
        return OfflineRequest(ids, dataclasses.replace(params, multimodal=multimodal), prompt=text)

    def _images(self, data) -> list:
        """The PIL images of a prompt's ``multi_modal_data`` (``{"image": image or [images]}``),
        RGB, within --max-images and --max-image-pixels. Raises ``ValueError``/``TypeError``."""
        if self.multimodal is None:
            raise ValueError("image inputs are not supported by this model (it is text-only)")
        if not isinstance(data, dict) or set(data) != {"image"}:
            raise ValueError(f"multi_modal_data takes one key, 'image'; got {data!r:.80}")
        images = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
        from PIL import Image

        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("multi_modal_data['image'] is a PIL image or a list of them")
        limits = self.image_limits
        if len(images) > limits.max_images:
            raise ValueError(f"too many images: {len(images)} (limit {limits.max_images} per request; max_images=...)")
        for im in images:
            if im.width * im.height > limits.max_pixels:
                raise ValueError(f"image has too many pixels: {im.width}x{im.height} (limit {limits.max_pixels}; "
                                 "max_image_pixels=...)")
        return [im.convert("RGB") for im in images]

    def shutdown(self) -> None:
        """Stop the worker ranks of a sharded engine; nothing to do for one process."""
        self.engine.runner.peers.shutdown()  # a no-op without other ranks

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a string, or a non-empty list of strings, token-id lists or prompt dicts")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        raise TypeError("for one token-id prompt pass a list of lists: [[1, 2, 3]]")
    for p in prompts:
        if not isinstance(p, (str, dict, Sequence)):
            raise TypeError(f"a prompt is a string, a token-id list or a dict, not {type(p).__name__}")
    return list(prompts)


def _params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling_params for {n} prompts: give one, or one per prompt")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, not {type(p).__name__}")
    return params


def _check_params(p: SamplingParams, adapters: frozenset[str]) -> None:
    """TGI's parameter rules (server/validation.py) stated on SamplingParams, plus: settings
    greedy decoding would ignore are refused rather than dropped."""
    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be a positive integer")
    if p.do_sample:
        if not (math.isfinite(p.temperature) and p.temperature > 0):
            raise ValueError("temperature must be > 0 (for greedy decoding leave do_sample=False)")
        if not 0.0 < p.top_p <= 1.0 or not 0.0 < p.typical_p <= 1.0:
            raise ValueError("top_p and typical_p must be > 0 and <= 1")
        if p.top_k < 0:
            raise ValueError("top_k must be >= 0 (0: off)")
    else:
        ignored = [name for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("typical_p", 1.0))
                   if getattr(p, name) != off]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} only apply with do_sample=True (greedy decoding ignores them)")
    if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
        raise ValueError("repetition_penalty must be > 0")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(p, name) <= 2.0:
            raise ValueError(f"{name} must be >= -2 and <= 2")
    if p.top_n_tokens < 0:
        raise ValueError("top_n_tokens must be >= 0")
    if any(not s for s in p.stop):
        raise ValueError("stop sequences cannot be empty")
    if p.seed is not None and not 0 <= p.seed <= U64_MAX:
        raise ValueError(f"seed must be >= 0 and <= {U64_MAX}")
    if p.adapter_id is not None and p.adapter_id not in adapters:
        loaded = ", ".join(sorted(adapters)) or "none"
        raise ValueError(f"LoRA adapter {p.adapter_id!r} is not loaded (lora_adapters=...); loaded: {loaded}")
    if p.constraint is not None and not isinstance(p.constraint, Constraint):
        raise TypeError(f"constraint must be a genserve.engine.constraints.Constraint, not {type(p.constraint).__name__}")


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("use_tqdm=True needs tqdm (pip install tqdm)") from exc
    return tqdm(total=total, desc="Processed prompts", unit="prompt")
