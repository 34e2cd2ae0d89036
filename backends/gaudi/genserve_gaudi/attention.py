"""``hpu_paged``: paged attention for Gaudi.

Decode batches (one query row per sequence) take a static-shape path: keys/values are
gathered over the whole ``[B, W]`` block table and lengths enter only through an additive
mask, so the graph depends on ``(B, W)`` alone and can be captured as an HPU graph (see
``genserve_gaudi.runner``). New keys/values are stored with ``index_put_`` on the cache tensor
itself, the way vllm-hpu-extension stores them: HPU graphs cannot capture in-place updates of
views. The product is Habana's ``FusedSDPA`` on an HPU (its documented equivalent,
``torch.nn.functional.scaled_dot_product_attention``, elsewhere).

Other batches (prefill, chunked prefill, mixed) run the core's padded-SDPA ``torch``
attention in lazy mode: correct, but each new prefill shape compiles a new graph.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from genserve.attention.base import AttentionMetadata, AttentionSpec
from genserve.attention.torch_ref import TorchAttention


def write_kv_index_put(k, v, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values at their slots with one in-place op on the cache tensor itself."""
    bs = kv_cache.shape[2]
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    which = torch.cat([torch.zeros_like(blocks), torch.ones_like(blocks)])
    kv_cache.index_put_((which, blocks.repeat(2), offsets.repeat(2)),
                        torch.cat([k, v]).to(kv_cache.dtype))


def torch_sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def load_fused_sdpa():
    """``FusedSDPA.apply`` with SDPA's argument order, or torch's SDPA on a stack without it."""
    try:
        fused = importlib.import_module("habana_frameworks.torch.hpex.kernels").FusedSDPA
    except (ImportError, AttributeError):
        return torch_sdpa

    def fused_sdpa(q, k, v, mask, scale):
        # FusedSDPA.apply(query, key, value, attn_mask, dropout_p, is_causal, scale, ...)
        return fused.apply(q, k, v, mask, 0.0, False, scale)

    return fused_sdpa


class HpuPagedAttention(TorchAttention):
    name = "hpu_paged"

    def __init__(self, spec: AttentionSpec, sdpa=None):
        super().__init__(spec)
        self._sdpa = sdpa  # None: FusedSDPA on hpu, torch's SDPA elsewhere (chosen on first use)

    @classmethod
    def supports(cls, spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type not in ("hpu", "cpu"):  # cpu: the same code with torch's SDPA (tests)
            return f"hpu_paged runs on hpu, not {device.type}"
        return None

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        if not meta.is_decode_only:
            return super().forward(q, k, v, kv_cache, meta)
        write_kv_index_put(k, v, kv_cache, meta.slot_mapping)
        return self.decode(q, kv_cache, meta)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence over its block table; shapes depend on (B, W) only."""
        spec = self.spec
        B, W = meta.block_tables.shape
        bs, Hkv, D = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
        H, L, group = spec.num_heads, W * bs, spec.num_heads // spec.num_kv_heads
        kv = kv_cache[:, meta.block_tables.long()].reshape(2, B, L, Hkv, D).transpose(2, 3)
        # GQA without copying keys: a KV head's query heads are its "query rows".
        qg = q.view(B, Hkv, group, D)
        bias = self._bias(meta.seq_lens, L, q.device)  # [B, 1 or Hkv, 1 or group, L]
        if spec.logit_softcap is not None:  # no fused kernel takes softcap: spell it out
            scores = torch.matmul(qg.float(), kv[0].float().transpose(-1, -2)) * spec.scale
            scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap) + bias
            out = torch.matmul(torch.softmax(scores, -1), kv[1].float()).to(q.dtype)
        else:
            sdpa = self._sdpa
            if sdpa is None:
                sdpa = self._sdpa = load_fused_sdpa() if q.device.type == "hpu" else torch_sdpa
            out = sdpa(qg, kv[0].to(q.dtype), kv[1].to(q.dtype), bias.to(q.dtype), spec.scale)
        return out.reshape(B, H, D)

    def _bias(self, seq_lens: torch.Tensor, L: int, device) -> torch.Tensor:
        spec = self.spec
        sl = seq_lens.long()[:, None]
        k_pos = torch.arange(L, device=device)[None]
        rel = k_pos - (sl - 1)  # <= 0 for keys up to the query's own position
        allowed = k_pos < sl
        if spec.sliding_window is not None:
            allowed = allowed & (rel > -spec.sliding_window)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None, None]  # [B, 1, 1, L]
        if spec.alibi_slopes is not None:
            slopes = torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=device)
            bias = bias + slopes.view(1, spec.num_kv_heads, -1, 1) * rel[:, None, None].float()
        return bias
