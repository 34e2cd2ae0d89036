"""Long fresh prompts through cuDNN's fused attention (torch's SDPA cuDNN backend).

On Hopper, cuDNN's kernel runs long causal prefills faster than our Triton kernel; for prompts
under ~2k tokens it is no faster, and at 512 it is slower, so only batches whose every prompt
is long use it (figures: backends/cuda/NOTES.md, "Prefill attention: tiles and cuDNN").
Plain causal attention only: no window, ALiBi or softcap.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from genserve.attention.base import AttentionSpec

logger = logging.getLogger(__name__)

MIN_PROMPT = 2048


class CudnnFreshAttention:
    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.enabled = _usable(spec)

    def wants(self, query_lens: list[int], dtype: torch.dtype) -> bool:
        return self.enabled and dtype in (torch.float16, torch.bfloat16) and min(query_lens) >= MIN_PROMPT

    def __call__(self, q, k, v, query_lens: list[int], out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Attention of each fresh prompt over itself; None (and off from then on) if cuDNN
        refuses the call, so the caller's kernel serves it instead."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out = torch.empty_like(q) if out is None else out
        at = 0
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                for n in query_lens:
                    # [n, heads, D] rows viewed as [1, heads, n, D]: strided views, no copies in.
                    qi, ki, vi = (t[at:at + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                    o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.spec.scale,
                                                       enable_gqa=self.spec.num_heads != self.spec.num_kv_heads)
                    out[at:at + n].copy_(o[0].transpose(0, 1))
                    at += n
        except RuntimeError as exc:
            logger.warning("cuDNN attention refused a prefill (%s); the Triton kernel takes over", exc)
            self.enabled = False
            return None
        return out


def _usable(spec: AttentionSpec) -> bool:
    if os.environ.get("GENSERVE_CUDNN_PREFILL", "1") == "0":
        return False
    if not (torch.cuda.is_available() and torch.version.cuda and torch.backends.cudnn.is_available()):
        return False
    if torch.cuda.get_device_capability()[0] < 9:  # its fast fused kernels are Hopper's
        return False
    plain = spec.causal and not (spec.sliding_window or spec.alibi_slopes or spec.logit_softcap)
    return plain and spec.head_dim % 8 == 0 and spec.head_dim <= 128
