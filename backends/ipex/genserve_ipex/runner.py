"""``IpexModelRunner``: the core runner, with the KV cache laid out as IPEX's kernels read it."""

from __future__ import annotations

from genserve.engine.model_runner import ModelRunner
from genserve_ipex.attention import IpexPagedAttention
from genserve_ipex.layout import NHD, allocate_kv_cache, layout_for_device


class IpexModelRunner(ModelRunner):
    @property
    def cache_layout(self) -> str:
        """NHD (our contract's storage) unless ipex_paged runs on a CPU, which reads HND."""
        if issubclass(self.model.ctx.attention_cls, IpexPagedAttention):
            return layout_for_device(self.device)
        return NHD  # the torch attention writes through .view(): it needs contiguous storage

    def allocate_kv_cache(self, num_blocks: int) -> None:
        spec = self.model.kv_cache_spec()
        shape = (2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        layout = self.cache_layout
        self.kv_caches = [allocate_kv_cache(shape, layout, self.kv_dtype, self.device)
                          for _ in range(spec.num_layers)]
