"""``FlashAttnPaged`` ("flash_attn"): FlashAttention-2's paged kernels, when installed.

FlashAttention-2 reads a paged cache only when the page size is a multiple of 256; the
engine's block size is usually 16, so for such caches this class hands the call to
``TritonPagedAttention`` (logged once) rather than failing a layer the backend already chose.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from genserve.attention.base import AttentionImpl, AttentionMetadata, AttentionSpec
from genserve_cuda.attention.triton_paged import TritonPagedAttention
from genserve_cuda.backend import is_rocm_build

logger = logging.getLogger(__name__)

FA_PAGE_MULTIPLE = 256


class FlashAttnPaged(AttentionImpl):
    name = "flash_attn"
    graph_safe = True

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self._fallback: TritonPagedAttention | None = None
        self._slopes: torch.Tensor | None = None

    @classmethod
    def supports(cls, spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed (pip install 'genserve-cuda[flash-attn]')"
        if device.type != "cuda" or is_rocm_build():
            return "flash_attn is wired for NVIDIA CUDA devices only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn needs fp16 or bf16, not {dtype}"
        if spec.head_dim % 8 or spec.head_dim > 256:
            return f"flash_attn needs head_dim a multiple of 8 and <= 256, not {spec.head_dim}"
        if not spec.causal:
            return "only causal attention is wired for flash_attn"
        # Paged KV needs the fallback kernel too, for block sizes FA2 can't page.
        return TritonPagedAttention.supports(spec, dtype, device)

    def _delegate(self) -> TritonPagedAttention:
        if self._fallback is None:
            logger.warning("flash_attn pages only in multiples of %d tokens; this KV cache's block "
                           "size is smaller, so the triton kernels serve this layer", FA_PAGE_MULTIPLE)
            self._fallback = TritonPagedAttention(self.spec)
        return self._fallback

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        if kv_cache.shape[2] % FA_PAGE_MULTIPLE:
            return self._delegate().forward(q, k, v, kv_cache, meta)
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        from genserve_cuda.kernels.kv_cache import write_kv_cache

        s = self.spec
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        if s.alibi_slopes is not None and self._slopes is None:
            self._slopes = torch.tensor(s.alibi_slopes, dtype=torch.float32, device=q.device)
        common = dict(
            softmax_scale=s.scale, causal=True,  # bottom-right aligned: our query-row convention
            window_size=(s.sliding_window - 1, 0) if s.sliding_window else (-1, -1),
            softcap=s.logit_softcap or 0.0, alibi_slopes=self._slopes,
        )
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if meta.is_decode_only:
            out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                          block_table=meta.block_tables, **common)
            return out.squeeze(1)
        cu_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_seqlens_q, cu_k, meta.max_seqlen_q,
                                      meta.max_seqlen_k, block_table=meta.block_tables, **common)
