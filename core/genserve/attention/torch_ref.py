"""Pure-PyTorch paged attention: the reference every fast kernel is tested against.

``TorchReferenceAttention`` loops over sequences and spells the maths out.
``TorchAttention`` (the CPU default) computes the same function with one padded
``scaled_dot_product_attention`` call per layer, which is what makes CPU decode fast.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from genserve.attention.base import AttentionImpl, AttentionMetadata, AttentionSpec, write_kv
from genserve.hookspecs import hookimpl


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """Keys and values of one sequence's first ``seq_len`` tokens: 2 x [seq_len, Hkv, D]."""
    block_size = kv_cache.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_cache[:, block_table[:n_blocks].long()]  # [2, n, bs, Hkv, D]
    kv = blocks.reshape(2, n_blocks * block_size, *kv_cache.shape[3:])[:, :seq_len]
    return kv[0], kv[1]


def attention_bias(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive bias [H or 1, Lq, Lk]: causal mask, sliding window and ALiBi."""
    rel = k_pos[None, :] - q_pos[:, None]  # [Lq, Lk], <= 0 for visible keys when causal
    allowed = torch.ones_like(rel, dtype=torch.bool)
    if spec.causal:
        allowed &= rel <= 0
    if spec.sliding_window is not None:
        allowed &= rel > -spec.sliding_window
    bias = torch.zeros(rel.shape, dtype=torch.float32, device=rel.device)
    bias = bias.masked_fill(~allowed, float("-inf"))[None]
    if spec.alibi_slopes is not None:
        slopes = torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=rel.device)
        bias = bias + slopes[:, None, None] * rel[None].float()
    return bias


def reference_attention(spec: AttentionSpec, q, k, v, bias) -> torch.Tensor:
    """Softmax attention in fp32. q [Lq, H, D], k/v [Lk, Hkv, D] -> [Lq, H, D]."""
    group = spec.num_heads // spec.num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * spec.scale
    if spec.logit_softcap is not None:
        scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    scores = scores + bias
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row gives zeros
    return torch.einsum("hqk,khd->qhd", probs, v)


class TorchReferenceAttention(AttentionImpl):
    """Sequence by sequence, in fp32: slow and obviously right."""

    name = "reference"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        return _reference_attention(self.spec, q, k, v, kv_cache, meta)


def _reference_attention(spec: AttentionSpec, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
    """``TorchReferenceAttention.forward``: write the new K/V, then each sequence in fp32."""
    write_kv(k, v, kv_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    starts = meta.cu_seqlens_q.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        kc, vc = gather_context(kv_cache, meta.block_tables[i], seq_len)
        q_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        bias = attention_bias(spec, q_pos, k_pos)
        out[s:e] = reference_attention(spec, q[s:e], kc, vc, bias).to(q.dtype)
    return out


class TorchAttention(AttentionImpl):
    """Padded batch through ``F.scaled_dot_product_attention``; same function as the reference.

    The padding layout and masks depend only on the batch, so they are built once per step
    (kept in ``meta.extra``) and shared by every layer.
    """

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        spec = self.spec
        if spec.logit_softcap is not None:  # SDPA has no softcap: use the reference maths
            return _reference_attention(self.spec, q, k, v, kv_cache, meta)
        lay = meta.extra.get("torch_layout")
        if lay is None:
            lay = meta.extra["torch_layout"] = _PaddedLayout(meta, kv_cache.shape[2], q.device)
        B, H, Hkv, D = lay.B, spec.num_heads, spec.num_kv_heads, spec.head_dim

        # Keys/values of every sequence, padded to max_k: [2, B, Hkv, max_k, D].
        kv = kv_cache[:, lay.tables].reshape(2, B, -1, Hkv, D)[:, :, :lay.max_k]
        kv = kv.transpose(2, 3).to(q.dtype)
        if meta.is_decode_only:
            qp = q.view(B, 1, H, D)
        else:  # right-aligned, so row j is position seq_len - q_len + j
            qp = q.new_zeros(B, lay.max_q, H, D)
            qp[lay.valid] = q[lay.src]
        key = ("torch_mask", spec.causal, spec.sliding_window, spec.alibi_slopes, q.dtype)
        if key not in meta.extra:
            meta.extra[key] = lay.mask(spec, q.dtype)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), kv[0], kv[1], attn_mask=meta.extra[key], scale=spec.scale,
            enable_gqa=H != Hkv,
        ).transpose(1, 2)  # [B, max_q, H, D]
        if meta.is_decode_only:
            return out.reshape(B, H, D)
        return out[lay.valid]  # row order (sequence, position) is the flat batch order


class _PaddedLayout:
    """Where each flat token row goes in a [B, max_q] query grid and which keys exist."""

    def __init__(self, meta: AttentionMetadata, block_size: int, device):
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        q_lens = meta.query_lens_cpu or (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
        self.B, self.max_k, self.max_q = len(seq_lens), max(seq_lens), max(q_lens)
        self.single_full = self.B == 1 and q_lens[0] == 1  # one decode row sees every key
        n_blocks = (self.max_k + block_size - 1) // block_size
        self.tables = meta.block_tables[:, :n_blocks].long()
        row = torch.arange(self.max_q, device=device)
        ql = torch.tensor(q_lens, device=device)
        self.valid = row[None] >= (self.max_q - ql)[:, None]  # [B, max_q]
        src = meta.cu_seqlens_q[:-1].long()[:, None] + row[None] - (self.max_q - ql)[:, None]
        self.src = src[self.valid]
        self.sl = torch.tensor(seq_lens, device=device)

    def mask(self, spec: AttentionSpec, dtype) -> torch.Tensor | None:
        """Additive mask [B, 1 or H, max_q, max_k]: padding, causal, window, ALiBi."""
        if self.single_full and spec.sliding_window is None and spec.alibi_slopes is None:
            return None
        device = self.sl.device
        q_pos = self.sl[:, None] - self.max_q + torch.arange(self.max_q, device=device)[None]
        k_pos = torch.arange(self.max_k, device=device)
        rel = k_pos[None, None, :] - q_pos[:, :, None]  # [B, max_q, max_k]
        allowed = (k_pos[None, None, :] < self.sl[:, None, None]).expand(rel.shape)
        if spec.causal:
            allowed = allowed & (rel <= 0)
        if spec.sliding_window is not None:
            allowed = allowed & (rel > -spec.sliding_window)
        # Padding query rows see no key at all; let them see key 0 so softmax stays finite.
        allowed = allowed.clone()
        allowed[..., 0] |= ~allowed.any(-1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask = mask.masked_fill(~allowed, float("-inf"))[:, None]
        if spec.alibi_slopes is not None:
            slopes = torch.tensor(spec.alibi_slopes, dtype=dtype, device=device)
            mask = mask + slopes[None, :, None, None] * rel[:, None].to(dtype)
        return mask


@hookimpl
def genserve_register_attention(register):
    register(TorchReferenceAttention.name, TorchReferenceAttention)
    register(TorchAttention.name, TorchAttention)
