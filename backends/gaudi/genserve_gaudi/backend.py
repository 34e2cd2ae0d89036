"""``GaudiBackend``: Intel Gaudi accelerators (device "hpu") through habana_frameworks."""

from __future__ import annotations

import logging
import os

import torch

from genserve.backends.base import Backend
from genserve.backends.options import BackendOptions
from genserve_gaudi.hpu import INSTALL_GAUDI, HpuApi, habana_installed

logger = logging.getLogger(__name__)

ACTIVATION_RESERVE_BYTES = 1 << 30
# vLLM's HPU worker keeps 10% of free memory for HPU graphs by default; so do we when on.
GRAPH_RESERVE_SHARE = 0.10
MAX_DEFAULT_GRAPH_BATCH = 64


class GaudiBackend(Backend):
    name = "gaudi"
    priority = 80
    attention_preference = ("hpu_paged", "torch")
    distributed_backend = "hccl"

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        self._api = None

    @classmethod
    def is_available(cls) -> bool:
        if not habana_installed():
            return False
        return HpuApi().is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if not habana_installed():
            return f"backend 'gaudi' needs habana_frameworks, which is not installed: {INSTALL_GAUDI}"
        return ("backend 'gaudi' found no Gaudi device (habana_frameworks.torch.hpu.is_available() "
                "is False; check the habanalabs driver and HABANA_VISIBLE_DEVICES)")

    @classmethod
    def device_count(cls) -> int:
        """Gaudis this process sees (--sharded)."""
        return HpuApi().device_count()

    @property
    def api(self):
        if self._api is None:
            self._api = HpuApi()
        return self._api

    @property
    def device(self) -> torch.device:
        return torch.device("hpu")

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16  # Gaudi's matrix engines are bf16/fp8; fp16 is slower there

    def set_device(self, rank: int) -> None:
        """A tensor-parallel worker, before it touches the device: Habana gives each process
        the Gaudi of its LOCAL_RANK (the rank-th of HABANA_VISIBLE_MODULES when set), so set
        it (the core's launcher spawns plain processes, which may inherit the parent's), and
        register the "hccl" collectives."""
        os.environ["LOCAL_RANK"] = str(rank)
        self.api.register_collectives()

    def synchronize(self) -> None:
        self.api.synchronize()

    def graph_sizes(self, max_batch_size: int) -> tuple[int, ...]:
        """Decode batch sizes to capture as HPU graphs; TGI's --cuda-graphs sets them (0: none)."""
        sizes = self.options.graph_sizes
        if sizes is not None:
            return sizes
        default, v = [], 1
        while v <= min(max_batch_size, MAX_DEFAULT_GRAPH_BATCH):
            default.append(v)
            v *= 2
        return tuple(default)

    def memory_budget(self) -> int:
        free, total = self.api.mem_get_info()
        fraction = self.options.memory_fraction or 1.0
        graphs = GRAPH_RESERVE_SHARE * free if self.graph_sizes(1) else 0
        budget = max(0, int(free * fraction - graphs) - ACTIVATION_RESERVE_BYTES)
        logger.info("hpu memory: %.1f GiB free of %.1f GiB, fraction %.2f, KV-cache budget %.1f GiB",
                    free / 2**30, total / 2**30, fraction, budget / 2**30)
        return budget

    def create_model_runner(self, model, config, *, lora=None, peers=None):
        from genserve_gaudi.runner import GaudiModelRunner

        return GaudiModelRunner(model, config, self, lora=lora, peers=peers)
