"""A hardware backend is one object with a small interface (like vLLM's ``Platform``).

Adding hardware never edits the core: a distribution registers a ``Backend`` subclass
through ``genserve_register_backends`` and imports its heavy libraries only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from genserve.backends.options import BackendOptions
from genserve.layers.custom_op import LayerOps

if TYPE_CHECKING:
    from genserve.engine.config import EngineConfig
    from genserve.engine.model_runner import ModelRunner
    from genserve.models.base import CausalLM


class Backend:
    """One kind of hardware. The engine asks it, in this order: ``layer_ops`` (while building
    the model), ``after_weights_loaded``, ``create_model_runner``, ``memory_budget``; the
    launcher asks ``device_count`` and ``distributed_backend`` for tensor parallelism."""

    name: ClassVar[str] = "?"
    # Higher wins under --backend auto.
    priority: ClassVar[int] = 0
    # Attention implementations in order of preference (registry names).
    attention_preference: tuple[str, ...] = ("torch",)
    # Mixed-precision linear kernels (registry names) in order of preference; the reference
    # dequantizing kernel comes last everywhere, so every format runs on every backend.
    linear_kernel_preference: tuple[str, ...] = ("torch_wna16",)
    # LoRA methods (``genserve_register_lora`` names) in order of preference; "torch", the
    # reference, runs everywhere.
    lora_preference: tuple[str, ...] = ("torch",)
    # torch.distributed backend of the tensor-parallel process group.
    distributed_backend: ClassVar[str] = "gloo"

    # The options this backend reads; a subclass of BackendOptions declares the backend's own
    # flags (``backends/options.py``), which ``genserve serve --help`` lists under its name.
    options_cls: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, options: BackendOptions | None = None):
        """``options``: from the flags (``options_cls.from_args(args)``); None: the defaults.
        Raises TypeError for options of another backend's kind."""
        if options is None:
            options = self.options_cls()
        if not isinstance(options, self.options_cls):
            raise TypeError(f"backend {self.name!r} takes {self.options_cls.__name__}, "
                            f"not {type(options).__name__}")
        self.options = options
        if not options.custom_kernels:
            # --disable-custom-kernels, for every backend: the reference attention and linear
            # kernels only. Instance attributes, so the class keeps advertising its preference.
            self.attention_preference = ("torch",)
            self.linear_kernel_preference = ("torch_wna16",)
            self.lora_preference = ("torch",)

    @classmethod
    def is_available(cls) -> bool:
        """Cheap check: libraries importable and a device present."""
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why ``is_available`` said no, for the error --backend gives."""
        return f"backend {cls.name!r} found no device"

    @classmethod
    def device_count(cls) -> int | None:
        """Devices this process sees (``--sharded`` uses them all); None where ranks are
        processes rather than devices (CPU), so ``--num-shard`` must say how many."""
        return None

    @property
    def device(self) -> torch.device:
        """Where this rank's weights, KV cache and activations live."""
        raise NotImplementedError

    @property
    def default_dtype(self) -> torch.dtype:
        """Weights' dtype when ``--dtype`` is not given."""
        return torch.float32

    def memory_budget(self) -> int:
        """Bytes the KV cache may use once the weights are loaded."""
        raise NotImplementedError

    def set_device(self, rank: int) -> None:
        """Bind this process to device ``rank`` (tensor-parallel workers)."""

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing, benches)."""

    def layer_ops(self) -> LayerOps:
        """The layer implementations for one model about to be built (``ModelContext.layer_ops``;
        see ``genserve.layers.custom_op``). Default: the PyTorch reference everywhere."""
        return LayerOps()

    def after_weights_loaded(self, model: CausalLM) -> None:
        """Called once the weights are loaded and processed, before the runner is created and
        the KV cache sized (e.g. to note the weights' size where the device cannot report its
        free memory). Layers chose their implementations at construction: never swap them here."""

    def create_model_runner(self, model: CausalLM, config: EngineConfig, *, lora=None,
                            peers=None) -> ModelRunner:
        """The object that turns scheduled batches into sampled tokens on this device, for the
        engine's frozen ``config``; ``lora`` and ``peers`` go to ``ModelRunner.__init__``."""
        from genserve.engine.model_runner import ModelRunner

        return ModelRunner(model, config, self, lora=lora, peers=peers)

    def describe(self) -> dict:
        """Name, device and dtype (backends add device facts), for logs and bench reports."""
        return {"name": self.name, "device": str(self.device), "dtype": str(self.default_dtype)}
