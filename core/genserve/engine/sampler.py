"""Turning a batch of logits into tokens, on the device, with per-row parameters.

Everything is batched: penalties, temperature, top-k/top-p/typical-p, grammar masks and the
watermark are tensor operations over ``[B, V]``. Random draws come from a counter-based hash of
(seed, step, token id), so a seeded request samples the same tokens whatever its batch mates
are, and no per-request generator or host sync is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from genserve.engine.sampling_params import SamplingParams
from genserve.device import upload

if TYPE_CHECKING:
    from genserve.engine.sequence import Sequence

_MASK62 = (1 << 62) - 1
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # dividing by less overflows


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64 finaliser) using only wrapping int64 ops."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb as int64
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) in float64 for each (row, token), a pure function of (seed, step, token)."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    key = _mix(_mix(seeds) + steps)  # [B]
    bits = _mix(key[:, None] + token[None, :] * 7146287779082805273) & _MASK62
    return (bits.double() + 0.5) / float(1 << 62)


def float_row(p: SamplingParams) -> list[float]:
    """A request's float32 sampler columns: temperature, top_p, typical_p, repetition,
    frequency and presence penalties (neutral values where it does not sample)."""
    return [p.temperature if p.do_sample else 1.0, p.top_p if p.do_sample else 1.0,
            p.typical_p if p.do_sample else 1.0, p.repetition_penalty,
            p.frequency_penalty, p.presence_penalty]


def long_row(p: SamplingParams, seed: int, step: int, prev_token: int) -> list[int]:
    """A request's int64 sampler columns: top_k, do_sample, seed, step, watermark, previous token."""
    return [p.top_k if p.do_sample else 0, int(p.do_sample), seed & ((1 << 63) - 1), step,
            int(p.watermark), prev_token]


def check_rows(p: SamplingParams, seed: int) -> None:
    """Build one request's sampler rows on the host, as ``SamplingBatch.build`` will every step,
    so a value the sampler cannot take fails that request when it is added instead of failing
    every request of the step it would join.

    Raises ``ValueError`` for a value that does not fit its column (an integer outside int64,
    e.g. ``top_k`` = 2**63) or that float32 turns into something else: a non-finite number, or
    a divisor (temperature, repetition penalty) that becomes zero or infinite.
    """
    try:
        floats = torch.tensor([float_row(p)], dtype=torch.float32)
        torch.tensor([long_row(p, seed, 0, 0)], dtype=torch.long)
    except (RuntimeError, TypeError, OverflowError, ValueError) as exc:  # "Overflow when unpacking long long"
        raise ValueError(f"sampling parameters out of the engine's range: {exc}") from None
    names = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty",
             "presence_penalty")
    for name, value, original in zip(names, floats[0].tolist(), float_row(p)):
        if not math.isfinite(value):
            raise ValueError(f"`{name}` = {original!r} is not a finite float32")
        if name in ("temperature", "repetition_penalty") and value < FLOAT32_TINY:
            raise ValueError(f"`{name}` = {original!r} is below float32's smallest normal number")


@dataclass
class SamplingBatch:
    """Per-row parameters as device tensors, built once per step by the model runner."""

    temperature: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    typical_p: torch.Tensor  # [B] float
    repetition_penalty: torch.Tensor  # [B]
    frequency_penalty: torch.Tensor  # [B]
    presence_penalty: torch.Tensor  # [B]
    do_sample: torch.Tensor  # [B] bool
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the token being drawn
    # [B, L] token ids (prompt + output, padded with -1) for repetition penalty; None if unused.
    history: torch.Tensor | None = None
    # [B, L] output-token ids padded with -1 for frequency/presence penalties; None if unused.
    output_history: torch.Tensor | None = None
    watermark: torch.Tensor | None = None  # [B] bool
    prev_tokens: torch.Tensor | None = None  # [B] last token (watermark context)
    allowed: torch.Tensor | None = None  # [B, V] bool grammar mask, None if no constraint
    any_sorting: bool = False
    any_sampling: bool = False
    max_top_n: int = 0
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int],
              histories: list[list[int]], outputs: list[list[int]], device,
              watermark_gamma=0.5, watermark_delta=2.0) -> "SamplingBatch":
        def rows_on_device(rows, dtype):
            # One asynchronous copy per dtype; the per-row fields are column views.
            return upload(torch.tensor(rows, dtype=dtype), device)

        def padded(rows):
            width = max(1, max(len(r) for r in rows))
            return rows_on_device([r + [-1] * (width - len(r)) for r in rows], torch.long)

        need_rep = any(p.repetition_penalty != 1.0 for p in params)
        need_freq = _needs_outputs(params)
        need_wm = any(p.watermark for p in params)
        floats = rows_on_device([float_row(p) for p in params], torch.float32)
        longs = rows_on_device([long_row(p, seed, step, h[-1] if h else 0)
                                for p, seed, step, h in zip(params, seeds, steps, histories)], torch.long)
        return cls(
            temperature=floats[:, 0], top_p=floats[:, 1], typical_p=floats[:, 2],
            repetition_penalty=floats[:, 3], frequency_penalty=floats[:, 4],
            presence_penalty=floats[:, 5],
            top_k=longs[:, 0], do_sample=longs[:, 1] != 0, seeds=longs[:, 2], steps=longs[:, 3],
            history=padded(histories) if need_rep else None,
            output_history=padded(outputs) if need_freq else None,
            watermark=longs[:, 4] != 0 if need_wm else None,
            prev_tokens=longs[:, 5] if need_wm else None,
            any_sorting=any(p.needs_sorting for p in params),
            any_sampling=any(p.do_sample for p in params),
            max_top_n=max((p.top_n_tokens for p in params), default=0),
            watermark_gamma=watermark_gamma,
            watermark_delta=watermark_delta,
        )

    @classmethod
    def for_sequences(cls, seqs: list[Sequence], drafts: list[list[int]], steps: list[int], device,
                      watermark_gamma=0.5, watermark_delta=2.0) -> SamplingBatch:
        """``build`` for engine sequences: row i samples for ``seqs[i]`` as output index
        ``steps[i]``, with ``drafts[i]`` (tokens proposed before that row) appended to its
        histories. A history is copied only when a request's penalties or watermark read it:
        the copy is O(context) per row and step."""
        params = [s.params for s in seqs]
        none: list[list[int]] = [[] for _ in seqs]
        return cls.build(
            params, [s.seed for s in seqs], steps,
            [s.all_ids + d for s, d in zip(seqs, drafts)] if _needs_history(params) else none,
            [s.output_ids + d for s, d in zip(seqs, drafts)] if _needs_outputs(params) else none,
            device, watermark_gamma, watermark_delta)


def _needs_history(params: list[SamplingParams]) -> bool:
    """The whole token history feeds the repetition penalty and the watermark (its last token)."""
    return any(p.repetition_penalty != 1.0 or p.watermark for p in params)


def _needs_outputs(params: list[SamplingParams]) -> bool:
    """The output history feeds the frequency and presence penalties."""
    return any(p.frequency_penalty or p.presence_penalty for p in params)


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] long
    logprobs: torch.Tensor  # [B] float: log-probability of each chosen token
    top_ids: torch.Tensor | None = None  # [B, n]
    top_logprobs: torch.Tensor | None = None  # [B, n]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.history is not None:
        # Repetition penalty (CTRL / transformers): divide positive logits of seen tokens,
        # multiply negative ones.
        hist = b.history.clamp(min=0)
        seen = torch.gather(logits, 1, hist)
        pen = b.repetition_penalty[:, None]
        seen = torch.where(seen > 0, seen / pen, seen * pen)
        seen = torch.where(b.history >= 0, seen, torch.gather(logits, 1, hist))
        logits = logits.scatter(1, hist, seen)
    if b.output_history is not None:
        counts = torch.zeros_like(logits)
        valid = (b.output_history >= 0).to(logits.dtype)
        counts.scatter_add_(1, b.output_history.clamp(min=0), valid)
        logits = logits - b.frequency_penalty[:, None] * counts
        logits = logits - b.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_watermark(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Kirchenbauer et al.: add delta to a gamma-fraction 'green list' seeded by the previous token."""
    if b.watermark is None or b.prev_tokens is None:  # both set, or neither (SamplingBatch.build)
        return logits
    vocab = logits.shape[-1]
    u = uniform_noise(b.prev_tokens * 15485863, torch.zeros_like(b.prev_tokens), vocab)
    green = (u < b.watermark_gamma) & b.watermark[:, None]
    return logits + green.to(logits.dtype) * b.watermark_delta


def filter_sorted(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Top-k, top-p and typical-p in one sort; filtered entries become -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None]
    remove = (b.top_k[:, None] > 0) & (rank >= b.top_k[:, None])
    probs = sorted_logits.softmax(-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cum = probs.cumsum(-1)
    remove |= (cum - probs) >= b.top_p[:, None]
    # typical-p: keep tokens closest to the entropy until their mass reaches typical_p.
    logp = sorted_logits.log_softmax(-1)
    ent = -(probs * logp.nan_to_num(0.0)).sum(-1, keepdim=True)
    shifted = (-logp - ent).abs()
    typ_order = shifted.argsort(-1)
    typ_probs = probs.gather(1, typ_order)
    typ_remove_sorted = (typ_probs.cumsum(-1) - typ_probs) >= b.typical_p[:, None]
    typ_remove = torch.zeros_like(remove).scatter(1, typ_order, typ_remove_sorted)
    remove |= typ_remove & (b.typical_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter(1, order, sorted_logits)


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    logits = logits.float()
    logits = apply_penalties(logits, b)
    logits = apply_watermark(logits, b)
    if b.allowed is not None:
        logits = logits.masked_fill(~b.allowed, float("-inf"))
    if b.any_sampling:  # greedy rows have temperature 1
        logits = logits / b.temperature[:, None]
    logprobs_all = logits.log_softmax(-1)
    greedy = logits.argmax(-1)
    if b.any_sampling:
        filtered = filter_sorted(logits, b) if b.any_sorting else logits
        # Gumbel-max: argmax(logits + Gumbel noise) samples softmax(logits) exactly.
        u = uniform_noise(b.seeds, b.steps, logits.shape[-1])
        gumbel = -torch.log(-torch.log(u)).to(filtered.dtype)
        sampled = (filtered + gumbel).argmax(-1)
        tokens = torch.where(b.do_sample, sampled, greedy)
    else:
        tokens = greedy
    out = SamplerOutput(tokens=tokens, logprobs=logprobs_all.gather(1, tokens[:, None])[:, 0])
    if b.max_top_n:
        out.top_logprobs, out.top_ids = logprobs_all.topk(b.max_top_n, dim=-1)
    return out
