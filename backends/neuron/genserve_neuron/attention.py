"""``neuron_static``: paged attention whose every shape comes from tensor shapes.

XLA traces a graph per distinct sequence of ops and shapes; anything decided in Python from
tensor *values* (``.tolist()``, boolean-mask indexing, a max over lengths) changes the graph
from step to step and forces a recompilation, or a device-to-host sync. This implementation
reads only shapes: the batch is a bucket ``[B, Q]`` of right-aligned rows (see
``genserve_neuron.padding``; ``Q`` is ``max_seqlen_q``, which tensor-parallel workers receive
too), keys come from the whole ``[B, W]`` block table, and lengths enter only through masks. It is the same function as the core's reference attention, which
the tests check on CPU.
"""

from __future__ import annotations

import torch

from genserve.attention.base import AttentionImpl, AttentionMetadata, write_kv


class StaticPagedAttention(AttentionImpl):
    name = "neuron_static"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        B, W = meta.block_tables.shape
        Q = meta.max_seqlen_q
        if q.shape[0] != B * Q:  # rows add up to B * max_q only if every sequence has max_q
            raise ValueError("neuron_static attention needs every sequence padded to the same "
                             "number of query rows (genserve_neuron.runner.NeuronModelRunner)")
        spec = self.spec
        write_kv(k, v, kv_cache, meta.slot_mapping)
        bs, Hkv, D = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
        H, L = spec.num_heads, W * bs

        # Keys/values of every sequence over its whole block table: [B, Hkv, L, D].
        kv = kv_cache[:, meta.block_tables.long()].reshape(2, B, L, Hkv, D).transpose(2, 3)
        keys, values = kv[0], kv[1]
        # GQA without copying keys: the query heads of one KV head become extra query rows.
        group = H // Hkv
        qg = q.view(B, Q, Hkv, group, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, group * Q, D)

        scores = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * spec.scale
        if spec.logit_softcap is not None:
            scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
        scores = scores.view(B, Hkv, group, Q, L) + self._bias(meta.seq_lens, Q, L, q.device)
        probs = torch.softmax(scores, dim=-1).view(B, Hkv, group * Q, L)
        out = torch.matmul(probs, values.float())  # [B, Hkv, group*Q, D]
        out = out.view(B, Hkv, group, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H, D)
        return out.to(q.dtype)

    def _bias(self, seq_lens: torch.Tensor, Q: int, L: int, device) -> torch.Tensor:
        """Additive mask [B, Hkv or 1, group or 1, Q, L] from lengths only."""
        spec = self.spec
        sl = seq_lens.long()
        q_pos = sl[:, None] - Q + torch.arange(Q, device=device)[None]  # [B, Q]
        k_pos = torch.arange(L, device=device)
        rel = k_pos[None, None, :] - q_pos[:, :, None]  # [B, Q, L]
        allowed = k_pos[None, None, :] < sl[:, None, None]
        if spec.causal:
            allowed = allowed & (rel <= 0)
        if spec.sliding_window is not None:
            allowed = allowed & (rel > -spec.sliding_window)
        # Pad rows may see no key at all: let them see key 0 so softmax stays finite.
        allowed = allowed | (~allowed.any(-1, keepdim=True) & (k_pos == 0))
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None, None]  # [B, 1, 1, Q, L]
        if spec.alibi_slopes is not None:
            slopes = torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=device)
            slopes = slopes.view(1, spec.num_kv_heads, -1, 1, 1)  # query head h = kv*group + g
            bias = bias + slopes * rel[:, None, None].float()
        return bias
