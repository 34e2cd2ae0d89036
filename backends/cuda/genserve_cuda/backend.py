"""``CudaBackend``: NVIDIA GPUs through PyTorch's CUDA build."""

from __future__ import annotations

import logging

import torch

from genserve.backends.base import Backend
from genserve.backends.options import BackendOptions
from genserve.layers.custom_op import LayerOps

logger = logging.getLogger(__name__)

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Kept out of the KV-cache budget for activations, logits, the CUDA-graph pool and the
# allocator's fragmentation: the larger of a fixed floor and a share of the card.
ACTIVATION_RESERVE_BYTES = 1 << 30
ACTIVATION_RESERVE_SHARE = 0.05


def is_rocm_build() -> bool:
    return getattr(torch.version, "hip", None) is not None


class CudaBackend(Backend):
    name = "cuda"
    priority = 100
    attention_preference = ("flash_attn", "triton", "torch")
    # The Triton W4A16 GEMM first; layers whose shape it can't take fall back to the reference.
    # FP8 layers consider only the FP8 kernels in this list (the W8A8 cuBLASLt one, then the
    # dequantizing reference ``fp8.py`` falls back to), so its place after the WNA16 ones only
    # keeps WNA16 layers from asking it.
    linear_kernel_preference = ("triton_w4a16", "torch_wna16", "cuda_fp8_scaled_mm")
    distributed_backend = "nccl"
    # Batched Triton shrink/expand over rows of different adapters; the reference elsewhere.
    lora_preference = ("triton_sgmv", "torch")

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        self._index = 0  # tensor-parallel ranks move to their own device in set_device

    @classmethod
    def is_available(cls) -> bool:
        return not is_rocm_build() and torch.cuda.is_available()

    @classmethod
    def device_count(cls) -> int | None:
        return torch.cuda.device_count() if torch.cuda.is_available() else None

    @classmethod
    def unavailable_reason(cls) -> str:
        if is_rocm_build():
            return "backend 'cuda' needs a CUDA build of PyTorch, this one is ROCm (use --backend rocm)"
        if not torch.backends.cuda.is_built():
            return (f"backend 'cuda' needs a CUDA build of PyTorch; torch {torch.__version__} "
                    "was built without CUDA")
        return "backend 'cuda' found no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self._index)

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def set_device(self, rank: int) -> None:
        self._index = rank
        torch.cuda.set_device(rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory_budget(self) -> int:
        """Free memory now (weights already loaded) times the fraction, minus a reserve."""
        free, total = torch.cuda.mem_get_info(self.device)
        fraction = self.options.memory_fraction
        reserve = max(ACTIVATION_RESERVE_BYTES, int(total * ACTIVATION_RESERVE_SHARE))
        budget = max(0, int(free * fraction) - reserve)
        logger.info("cuda memory: %.1f GiB free of %.1f GiB, fraction %.2f, KV-cache budget %.1f GiB",
                    free / 2**30, total / 2**30, fraction, budget / 2**30)
        return budget

    def graph_sizes(self) -> tuple[int, ...]:
        """Decode batch sizes to capture (--cuda-graphs; () disables); not given means the
        default sizes."""
        sizes = self.options.graph_sizes
        return DEFAULT_GRAPH_SIZES if sizes is None else sizes

    def layer_ops(self) -> LayerOps:
        """Fused Triton layers and the one-row GEMV dispatch (``layer_ops.py``), unless
        --disable-custom-kernels: then the PyTorch reference."""
        if not self.options.custom_kernels:
            return LayerOps()
        from genserve_cuda.layer_ops import CudaLayerOps

        return CudaLayerOps()

    def create_model_runner(self, model, config, *, lora=None, peers=None):
        from genserve_cuda.graphs import CudaModelRunner

        return CudaModelRunner(model, config, self, lora=lora, peers=peers)

    def describe(self) -> dict:
        info = super().describe()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(self._index)
            info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1))
        return info
