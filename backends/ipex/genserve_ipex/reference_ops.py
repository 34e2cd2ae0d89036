"""Pure-PyTorch stand-ins for the ``ipex.llm.modules.PagedAttention`` calls that
``ipex_paged`` makes, written from IPEX's documented semantics, for tests on machines without
IPEX. They are slow (a Python loop per sequence) and never used for serving.

``TorchPagedAttentionOps(layout)`` mimics one device's kernels: ``"NHD"`` the XPU ones
(caches ``[num_blocks, block_size, heads, dim]``), ``"HND"`` the CPU ones
(``[num_blocks, heads, block_size, dim]``).
"""

from __future__ import annotations

import torch

from genserve_ipex.layout import HND, NHD


class TorchPagedAttentionOps:
    def __init__(self, layout: str):
        assert layout in (NHD, HND)
        self.layout = layout
        self.calls: list[str] = []  # names of the calls made, for tests

    # -- writes: slot s goes to block s // block_size, offset s % block_size --------------
    def _store(self, src: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        block_size = cache.shape[1] if self.layout == NHD else cache.shape[2]
        slots = slots.long()
        blocks, offsets = slots // block_size, slots % block_size
        if self.layout == NHD:
            cache[blocks, offsets] = src.to(cache.dtype)
        else:
            cache[blocks, :, offsets] = src.to(cache.dtype)

    def reshape_and_cache(self, key, value, key_cache, value_cache, slot_mapping,
                          k_scale=1.0, v_scale=1.0):
        self.calls.append("reshape_and_cache")
        self._store(key, key_cache, slot_mapping)
        self._store(value, value_cache, slot_mapping)

    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping,
                                kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0):
        self.calls.append("reshape_and_cache_flash")
        self._store(key, key_cache, slot_mapping)
        self._store(value, value_cache, slot_mapping)

    # -- attention ----------------------------------------------------------------------
    def _context(self, cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` tokens' rows [n, heads, dim] of one sequence."""
        block_size = cache.shape[1] if self.layout == NHD else cache.shape[2]
        blocks = cache[table[: -(-n // block_size)].long()]
        if self.layout == HND:
            blocks = blocks.transpose(1, 2)
        return blocks.reshape(-1, *blocks.shape[2:])[:n]

    def flash_attn_varlen_func(self, output, query, key_cache, value_cache, cu_seqlens_q,
                               cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, scale, is_causal,
                               block_tables, alibi_slopes=None, window_size_left=-1,
                               window_size_right=-1, softcap=None, k_scale=1.0, v_scale=1.0,
                               kv_cache_dtype="auto"):
        """Causal attention of each sequence's query rows (its last tokens) over its cache."""
        self.calls.append("flash_attn_varlen_func")
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
        heads = query.shape[1]
        for i in range(len(cq) - 1):
            q = query[cq[i]:cq[i + 1]].float()  # [Lq, H, D]
            n_k = ck[i + 1] - ck[i]
            k = self._context(key_cache, block_tables[i], n_k).float()
            v = self._context(value_cache, block_tables[i], n_k).float()
            group = heads // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            # Bottom-right alignment: query row j is position n_k - Lq + j.
            q_pos = torch.arange(n_k - q.shape[0], n_k, device=q.device)[:, None]
            k_pos = torch.arange(n_k, device=q.device)[None, :]
            visible = k_pos <= q_pos if is_causal else torch.ones_like(k_pos - q_pos, dtype=torch.bool)
            if window_size_left >= 0:
                visible &= k_pos >= q_pos - window_size_left
            if alibi_slopes is not None:
                scores = scores + alibi_slopes.float()[:, None, None] * (k_pos - q_pos)[None]
            scores = scores.masked_fill(~visible[None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            output[cq[i]:cq[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(output.dtype)
        return output
