"""Rotary position embedding, with every scaling type transformers knows.

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` (linear, dynamic,
yarn, longrope, llama3), so scaled models match the reference exactly.

``longrope`` (Phi-3-128k, Phi-3.5) switches from its short to its long factors once a sequence
outgrows ``original_max_position_embeddings``. ``LongRopeRotaryEmbedding`` keeps both tables
stacked in one ``cos``/``sin`` buffer and picks each token's row with ``cache_rows``, per
sequence, so a batch may mix short and long sequences (see that class).
"""

from __future__ import annotations

import torch

from genserve.layers.custom_op import CustomOp


def rope_parameters(config) -> dict:
    """The rope settings of a config, in transformers 5's ``rope_parameters`` shape."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    if params["rope_type"] == "su":  # Phi-3's first name for longrope
        params["rope_type"] = "longrope"
    return params


def compute_inv_freq(config, rotary_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling; ``seq_len`` matters to length-dependent types
    (longrope: the long factors when it exceeds ``original_max_position_embeddings``)."""
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        base = params["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)


def _tables(max_position: int, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos``/``sin`` of shape [max_position, rotary_dim/2], as transformers computes them."""
    t = torch.arange(max_position, dtype=torch.float32)
    # transformers' scaled-rope functions return CPU tensors; build on the default device.
    freqs = torch.outer(t, inv_freq.float().to(t.device))
    return freqs.cos() * scaling, freqs.sin() * scaling


class RotaryEmbedding(CustomOp):
    """Applies RoPE to ``q`` and ``k`` of shape ``[T, heads, head_dim]`` at ``positions``.

    ``rotary_dim < head_dim`` rotates only the leading dimensions (GPT-NeoX, Phi).
    ``interleaved=True`` rotates adjacent pairs (GPT-J style) instead of halves.
    A backend may bind a fused kernel at construction (op ``rotary_embedding``).
    """

    op_name = "rotary_embedding"
    reference_methods = ("forward_native", "_rotate")
    # The known sequence length at which this embedding's rotation of earlier keys goes stale
    # (longrope); None: never. Models copy it to ``CausalLM.recompute_at_length``.
    recompute_at_length: int | None = None
    cos: torch.Tensor  # buffers, [P, rotary_dim/2] fp32
    sin: torch.Tensor

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, inv_freq: torch.Tensor,
                 scaling: float = 1.0, interleaved: bool = False):
        super().__init__()
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim, interleaved
        cos, sin = _tables(max_position, inv_freq, scaling)
        self.register_buffer("cos", cos, persistent=False)  # [P, rotary_dim/2]
        self.register_buffer("sin", sin, persistent=False)
        self.bind_forward()

    @classmethod
    def from_config(cls, config, head_dim: int, rotary_dim: int | None = None, interleaved=False):
        rotary_dim = rotary_dim or head_dim
        inv_freq, scaling = compute_inv_freq(config, rotary_dim)
        max_pos = getattr(config, "max_position_embeddings", 4096)
        params = rope_parameters(config)
        if cls is RotaryEmbedding and params["rope_type"] == "longrope":
            threshold = params.get("original_max_position_embeddings") \
                or getattr(config, "original_max_position_embeddings", None) or max_pos
            if max_pos > threshold:  # else no sequence ever reaches the long factors
                long_inv, _ = compute_inv_freq(config, rotary_dim, seq_len=threshold + 1)
                return LongRopeRotaryEmbedding(head_dim, rotary_dim, max_pos, inv_freq, long_inv,
                                               threshold, scaling, interleaved)
        return cls(head_dim, rotary_dim, max_pos, inv_freq, scaling, interleaved)

    def cache_rows(self, positions: torch.Tensor, meta) -> torch.Tensor:
        """The ``cos``/``sin`` rows for a step's tokens, to pass to ``forward`` in place of
        ``positions``. One table: the positions themselves. ``meta`` is the step's
        ``AttentionMetadata``."""
        return positions

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            out = rot * cos2 + torch.cat((-x2, x1), -1) * sin2
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].to(q.dtype)[:, None]  # [T, 1, rotary_dim/2]
        sin = self.sin[positions].to(q.dtype)[:, None]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """longrope: short factors while a sequence fits ``threshold`` tokens, long ones beyond.

    ``cos``/``sin`` stack both tables, ``[short; long]`` (``2 * max_position`` rows), so
    ``forward`` and the CUDA backend's fused kernel read them unchanged: ``cache_rows`` moves
    the tokens of each long sequence down by ``max_position`` rows. A sequence is long when its
    known length (every token the engine has for it at this step, prompt + generated,
    ``meta.known_lens``) exceeds the threshold: what transformers decides in the forward that
    sees the whole sequence, so every prefill chunk of a long prompt uses the long factors. The
    choice costs a few device ops per step, no host sync, and is graph-safe (decode-only steps
    read one length per row, or compare positions where a backend leaves ``known_lens`` out: a
    decode row's known length is its position + 1; others find each token's sequence by
    ``searchsorted`` over ``cu_seqlens_q``).

    Keys already in the KV cache keep the rotation they were written with, so a sequence that
    crosses the threshold while decoding is recomputed from scratch, as transformers' Phi-3
    ``generate`` does: ``recompute_at_length`` (threshold + 1) tells the engine when (the
    scheduler preempts it; prefix caching is off for such models, as block hashes do not cover
    the choice). See docs/models.md.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, short_inv_freq: torch.Tensor,
                 long_inv_freq: torch.Tensor, threshold: int, scaling: float = 1.0,
                 interleaved: bool = False):
        super().__init__(head_dim, rotary_dim, max_position, short_inv_freq, scaling, interleaved)
        self.threshold, self.long_offset = threshold, max_position
        self.recompute_at_length = threshold + 1  # the known length at which decoding turns long
        long_cos, long_sin = _tables(max_position, long_inv_freq, scaling)
        self.cos = torch.cat((self.cos, long_cos))  # [2P, rotary_dim/2]
        self.sin = torch.cat((self.sin, long_sin))

    def cache_rows(self, positions: torch.Tensor, meta) -> torch.Tensor:
        if meta is None:
            return positions
        if meta.is_decode_only:  # one row per sequence
            if meta.known_lens is not None and meta.known_lens.shape[0] == positions.shape[0]:
                long = meta.known_lens > self.threshold  # (1-token prefill chunks included)
            else:  # a decode row's known length is its position + 1 (CUDA graphs, padded rows)
                long = positions >= self.threshold
        else:
            rows = torch.arange(positions.shape[0], dtype=meta.cu_seqlens_q.dtype, device=positions.device)
            seq = torch.searchsorted(meta.cu_seqlens_q[1:].contiguous(), rows, right=True)
            # Rows past the last sequence (a backend's padding) borrow the last one's choice.
            seq = seq.clamp_(max=max(meta.seq_lens.shape[0] - 1, 0))
            lens = meta.seq_lens if meta.known_lens is None else meta.known_lens
            long = lens[seq] > self.threshold
        return positions + long * self.long_offset
