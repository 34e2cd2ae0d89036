"""``NeuronBackend``: AWS Inferentia2 / Trainium NeuronCores through torch-neuronx's XLA device."""

from __future__ import annotations

import logging
import os

import torch

from genserve.backends.base import Backend
from genserve_neuron.buckets import Buckets, make_buckets
from genserve_neuron.options import NeuronOptions
from genserve_neuron.xla import INSTALL_NEURON, XlaApi, neuron_devices, neuronx_installed

logger = logging.getLogger(__name__)

# HBM of one NeuronCore-v2 (Inf2, Trn1: 32 GiB per device, 2 cores), used when the runtime
# does not report memory. --neuron-hbm-bytes overrides it (e.g. Trn2 logical cores).
DEFAULT_CORE_HBM = 16 << 30
RESERVE_SHARE = 0.10  # compiled graphs, activations, runtime scratch


def core_for_rank(visible: str | None, rank: int) -> int:
    """The NeuronCore of ``rank`` within NEURON_RT_VISIBLE_CORES ("4-7", "0,2,4" or unset)."""
    if not visible:
        return rank
    cores: list[int] = []
    for part in visible.split(","):
        lo, _, hi = part.strip().partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    if rank >= len(cores):
        raise ValueError(f"rank {rank} has no NeuronCore in NEURON_RT_VISIBLE_CORES={visible!r}")
    return cores[rank]


class NeuronBackend(Backend):
    name = "neuron"
    priority = 60
    attention_preference = ("neuron_static",)
    distributed_backend = "xla"

    options_cls = NeuronOptions

    def __init__(self, options: NeuronOptions | None = None):
        super().__init__(options)
        self._api = None
        self._device = None
        self.weight_bytes = 0

    @classmethod
    def is_available(cls) -> bool:
        return neuronx_installed() and bool(neuron_devices())

    @classmethod
    def unavailable_reason(cls) -> str:
        if not neuronx_installed():
            return f"backend 'neuron' needs torch-neuronx, which is not installed: {INSTALL_NEURON}"
        return ("backend 'neuron' found no Neuron device (/dev/neuron*): run on an Inf2, Trn1 "
                "or Trn2 instance with the Neuron driver loaded")

    @property
    def api(self):
        if self._api is None:
            self._api = XlaApi()
        return self._api

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = self.api.device()
        return self._device

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def mark_step(self) -> None:
        self.api.mark_step()

    def set_device(self, rank: int) -> None:
        """A tensor-parallel worker: pin it to one NeuronCore before the Neuron runtime starts
        (the rank-th core of NEURON_RT_VISIBLE_CORES, or core ``rank``) and register the
        "xla" collectives."""
        os.environ["NEURON_RT_VISIBLE_CORES"] = str(core_for_rank(
            os.environ.get("NEURON_RT_VISIBLE_CORES"), rank))
        self.api.register_collectives()

    def synchronize(self) -> None:
        self.api.wait_device_ops()

    def after_weights_loaded(self, model):
        # Neuron compiles the model's own ops. Remember the weights' size for the memory
        # budget when the runtime cannot report free memory.
        self.weight_bytes = sum(t.numel() * t.element_size()
                                for t in list(model.parameters()) + list(model.buffers()))

    def memory_budget(self) -> int:
        info = self.api.memory_info(self.device)
        if info is not None:
            free, total = info
        else:
            total = int(self.options.hbm_bytes or DEFAULT_CORE_HBM)
            free = total - self.weight_bytes
        fraction = self.options.memory_fraction or 1.0
        budget = max(0, int(free * fraction) - int(total * RESERVE_SHARE))
        logger.info("neuron memory: %.1f GiB free of %.1f GiB%s, KV-cache budget %.1f GiB",
                    free / 2**30, total / 2**30, "" if info else " (assumed)", budget / 2**30)
        return budget

    def buckets(self, config) -> Buckets:
        return make_buckets(self.options, config)

    def create_model_runner(self, model, config, *, lora=None, peers=None):
        from genserve_neuron.runner import NeuronModelRunner

        return NeuronModelRunner(model, config, self, lora=lora, peers=peers)
