"""``TritonPagedAttention`` ("triton"): the CUDA backend's own paged attention."""

from __future__ import annotations

import torch
from genserve.attention.base import AttentionImpl, AttentionMetadata, AttentionSpec

from genserve_cuda._triton import triton_unavailable_reason
from genserve_cuda.attention.cudnn_fresh import CudnnFreshAttention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonPagedAttention(AttentionImpl):
    """Decode-only batches go to the split-K decode kernel, everything else to the prefill one,
    which reads a batch of fresh prompts from this step's K/V rather than through the cache
    (long ones go to cuDNN's fused attention where it is faster: ``cudnn_fresh``).

    Graph-safe: no host syncs, and every launch shape comes from host-side metadata, so the
    CUDA-graph runner can capture decode steps. Padding rows (slot -1, seq_len 0) give zeros.
    """

    name = "triton"
    graph_safe = True

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self._slopes: dict[torch.device, torch.Tensor] = {}
        self._cudnn = CudnnFreshAttention(spec)

    @classmethod
    def supports(cls, spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        reason = triton_unavailable_reason(device)
        if reason:
            return reason
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (fp16, bf16, fp32)"
        if spec.head_dim > 256:
            return f"head_dim {spec.head_dim} > 256"
        if spec.num_heads % spec.num_kv_heads:
            return "num_heads is not a multiple of num_kv_heads"
        return None

    def _alibi(self, device: torch.device) -> torch.Tensor | None:
        if self.spec.alibi_slopes is None:
            return None
        # Built once per device, before any graph capture (a host->device copy can't be captured).
        if device not in self._slopes:
            self._slopes[device] = torch.tensor(self.spec.alibi_slopes, dtype=torch.float32, device=device)
        return self._slopes[device]

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        from genserve_cuda.kernels.decode_attention import paged_decode_attention
        from genserve_cuda.kernels.kv_cache import write_kv_cache
        from genserve_cuda.kernels.prefill_attention import (
            fresh_prefill_attention,
            paged_prefill_attention,
        )

        s = self.spec
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        common = dict(sliding_window=s.sliding_window, alibi_slopes=self._alibi(q.device),
                      logit_softcap=s.logit_softcap)
        # Decode rows are the last position, so causality holds trivially there.
        if meta.is_decode_only:
            return paged_decode_attention(
                q, kv_cache, meta.block_tables, meta.seq_lens, s.scale, meta.max_seqlen_k,
                num_splits=meta.extra.get("decode_num_splits"), **common)
        if meta.is_fresh:
            if self._cudnn.wants(meta.query_lens_cpu, q.dtype):
                out = self._cudnn(q, k, v, meta.query_lens_cpu)
                if out is not None:
                    return out
            return fresh_prefill_attention(q, k, v, meta.seq_lens, meta.cu_seqlens_q, meta.max_seqlen_q,
                                           s.scale, causal=s.causal, **common)
        return paged_prefill_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.max_seqlen_q,
            s.scale, causal=s.causal, **common)
