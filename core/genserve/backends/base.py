"""A hardware backend is one object with a small interface (like vLLM's ``Platform``).

Adding hardware never edits the core: a distribution registers a ``Backend`` subclass
through ``genserve_register_backends`` and imports its heavy libraries only when chosen.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from genserve.backends.options import BackendOptions


class Backend:
    name: ClassVar[str] = "?"
    # Higher wins under --backend auto.
    priority: ClassVar[int] = 0
    # Attention implementations in order of preference (registry names).
    attention_preference: ClassVar[tuple[str, ...]] = ("torch",)
    # Mixed-precision linear kernels (registry names) in order of preference; the reference
    # dequantizing kernel comes last everywhere, so every format runs on every backend.
    linear_kernel_preference: ClassVar[tuple[str, ...]] = ("torch_wna16",)
    distributed_backend: ClassVar[str] = "gloo"
    # Quantizer names this backend runs; None means whatever the quantizer itself allows.
    supported_quantizers: ClassVar[tuple[str, ...] | None] = None
    supports_graphs: ClassVar[bool] = False

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

    @classmethod
    def is_available(cls) -> bool:
        """Cheap check: libraries importable and a device present."""
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"backend {cls.name!r} found no device"

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def memory_budget(self) -> int:
        """Bytes the KV cache may use once the weights are loaded."""
        raise NotImplementedError

    def set_device(self, rank: int) -> None:
        """Bind this process to device ``rank`` (tensor-parallel workers)."""

    def synchronize(self) -> None:
        pass

    def create_model_runner(self, model, config, *, lora=None, peers=None):
        """The object that turns scheduled batches into sampled tokens on this device, for the
        engine's frozen ``config``; ``lora`` and ``peers`` go to ``ModelRunner.__init__``."""
        from genserve.engine.model_runner import ModelRunner

        return ModelRunner(model, config, self, lora=lora, peers=peers)

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "dtype": str(self.default_dtype)}
