"""``ipex_paged``: paged attention through ``ipex.llm.modules.PagedAttention``.

One kernel serves prefill, chunked prefill, prefix-cache hits and decode:
``flash_attn_varlen_func`` reads keys/values from the paged cache through the block tables,
with ``cu_seqlens_q`` over the flat batch and ``cu_seqlens_kv`` over each sequence's whole
context; the causal mask is aligned to the end of each sequence, which is our contract (a
sequence's query rows are its *last* tokens). New keys/values are written first with
``reshape_and_cache_flash`` (XPU, NHD cache) or ``reshape_and_cache`` (CPU, HND cache): see
``genserve_ipex.layout`` for how those layouts map onto ours.

The call pattern is the one TGI and vLLM use with IPEX 2.6+ (k_scale/v_scale keywords).
The CPU path runs on IPEX 2.8 (torch 2.8) in ``tests/test_ipex_cpu.py``: output and cache
writes equal the core's reference attention (GQA, MHA, sliding window, softcap; fp32 and bf16;
block sizes 4 and 16). The XPU path has not run (no Intel GPU here); without IPEX the tests run
this exact code with the IPEX namespace swapped for ``genserve_ipex.reference_ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genserve.attention.base import AttentionImpl, AttentionMetadata, AttentionSpec
from genserve_ipex.layout import HND, NHD, ipex_views, layout_for_device
from genserve_ipex.vendor import import_ipex

XPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


def load_paged_attention_ops():
    """The ``ipex.llm.modules.PagedAttention`` namespace (imports IPEX on first use)."""
    return import_ipex().llm.modules.PagedAttention


def cu_seqlens_k(meta: AttentionMetadata) -> torch.Tensor:
    """Cumulative context lengths [B+1] int32; built once per step, shared by every layer."""
    cu = meta.extra.get("ipex_cu_seqlens_k")
    if cu is None:
        cu = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        meta.extra["ipex_cu_seqlens_k"] = cu
    return cu


class IpexPagedAttention(AttentionImpl):
    name = "ipex_paged"

    def __init__(self, spec: AttentionSpec, ops=None, layout: str | None = None):
        super().__init__(spec)
        # Tests pass pure-torch ops and the layout of the device they stand in for; in serving
        # both are None: IPEX's PagedAttention (loaded on the first forward), layout by device.
        self._ops = ops
        self._layout = layout
        self._alibi: torch.Tensor | None = None

    @classmethod
    def supports(cls, spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type not in ("xpu", "cpu"):
            return f"IPEX paged attention runs on xpu and cpu devices, not {device.type}"
        if not spec.causal:
            return "IPEX paged attention is causal only"
        allowed = XPU_DTYPES if device.type == "xpu" else CPU_DTYPES
        if dtype not in allowed:
            return f"IPEX paged attention on {device.type} takes {', '.join(map(str, allowed))}, not {dtype}"
        return cls._unsupported(spec, layout_for_device(device))

    @staticmethod
    def _unsupported(spec: AttentionSpec, layout: str) -> str | None:
        # IPEX 2.8's CPU flash_attn_varlen_func (HND cache) raises "alibi_slopes is not
        # supported for flash_attn_varlen yet"; its window and softcap match the reference
        # (tests/test_ipex_cpu.py). The XPU kernels (NHD cache) document ALiBi.
        if layout == HND and spec.alibi_slopes is not None:
            return "IPEX's CPU paged attention (flash_attn_varlen_func) has no ALiBi"
        return None

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        spec = self.spec
        layout = self._layout or layout_for_device(q.device)
        why = self._unsupported(spec, layout)
        if why is not None:  # the build-time probe spec has no window/softcap: check here too
            raise NotImplementedError(f"{why}; use --attention torch")
        if kv_cache.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise NotImplementedError(f"ipex_paged does not support a {kv_cache.dtype} KV cache")
        ops = self._ops if self._ops is not None else load_paged_attention_ops()
        self._ops = ops

        key_cache, value_cache = ipex_views(kv_cache, layout)
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
        if layout == NHD:
            ops.reshape_and_cache_flash(k, v, key_cache, value_cache, meta.slot_mapping,
                                        k_scale=1.0, v_scale=1.0)
        else:
            ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping.int(),
                                  k_scale=1.0, v_scale=1.0)

        out = torch.empty_like(q)
        ops.flash_attn_varlen_func(
            out, q.contiguous(), key_cache, value_cache,
            meta.cu_seqlens_q, cu_seqlens_k(meta), meta.max_seqlen_q, meta.max_seqlen_k,
            spec.scale, True, meta.block_tables,
            alibi_slopes=self._alibi_slopes(q.device), k_scale=1.0, v_scale=1.0,
            **self._feature_kwargs(),
        )
        return out

    def _alibi_slopes(self, device) -> torch.Tensor | None:
        if self.spec.alibi_slopes is None:
            return None
        if self._alibi is None or self._alibi.device != device:
            self._alibi = torch.tensor(self.spec.alibi_slopes, dtype=torch.float32, device=device)
        return self._alibi

    def _feature_kwargs(self) -> dict:
        # Passed only when used, so IPEX releases without these keywords still run plain models.
        kw = {}
        if self.spec.sliding_window is not None:
            # flash-attn convention: keys in [i - left, i + right]; ours keeps `window` keys.
            kw.update(window_size_left=self.spec.sliding_window - 1, window_size_right=0)
        if self.spec.logit_softcap is not None:
            kw["softcap"] = self.spec.logit_softcap
        return kw
