"""Layers whose implementation the backend picks when the model is built (vLLM's ``CustomOp``).

A ``CustomOp`` layer (RMSNorm, rotary embedding, SiLU-and-mul, the LM head) carries its
pure-PyTorch reference in ``forward_native``: the maths every other implementation must
reproduce. A backend offers faster ones through its ``LayerOps`` (``Backend.layer_ops()``), which
the engine hands the model in ``ModelContext.layer_ops``. ``genserve.models.base.build_model``
makes that table current while the model's layers are constructed, and each layer binds its
implementation then, once (``bind_forward``); nothing is rebound afterwards. Layers built
outside ``build_model`` (tests, tools) run the reference.

An implementation is a function ``impl(layer, *args)`` with ``forward_native``'s arguments and
result. It may still hand inputs its kernel does not take (CPU tensors, mixed dtypes) back to
``layer.forward_native``. A subclass that overrides any of its op's ``reference_methods``
changes the maths, so it keeps its own forward whatever the backend offers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

from torch import nn

from genserve.layers.quantization.base import QuantMethod, UnquantizedLinear

# impl(layer, *forward_native's args) -> forward_native's result
OpImpl = Callable[..., Any]
# factory(ops, layer) -> the implementation for this layer, or None where it cannot serve it
OpFactory = Callable[["LayerOps", "CustomOp"], "OpImpl | None"]


class LayerOps:
    """The layer implementations one backend offers, by op name (``CustomOp.op_name``).

    The base class offers none: every layer runs its PyTorch reference and unquantized linear
    layers use ``UnquantizedLinear``. Backends subclass it and fill ``factories``; one instance
    serves one model (it may hold per-model state, e.g. the CUDA backend's GEMV dispatch).
    """

    name: ClassVar[str] = "native"
    factories: ClassVar[Mapping[str, OpFactory]] = {}

    def implementation(self, layer: CustomOp) -> OpImpl | None:
        """This backend's implementation for ``layer``, or None for the reference."""
        factory = self.factories.get(layer.op_name)
        return None if factory is None else factory(self, layer)

    def unquantized_linear(self) -> QuantMethod:
        """The method of a linear layer that no quantizer claims (a fresh one per layer)."""
        return UnquantizedLinear()


_CURRENT: ContextVar[LayerOps | None] = ContextVar("genserve_layer_ops", default=None)


@contextmanager
def use_layer_ops(ops: LayerOps | None) -> Iterator[None]:
    """Make ``ops`` the table layers constructed inside this block take their implementations from."""
    token = _CURRENT.set(ops)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_layer_ops() -> LayerOps:
    """The table set by ``use_layer_ops``; the reference ``LayerOps()`` outside one."""
    return _CURRENT.get() or LayerOps()


class CustomOp(nn.Module):
    """A layer with a reference ``forward_native`` and an implementation bound at construction.

    Subclasses set ``op_name``, implement ``forward_native``, and call ``bind_forward()`` at the
    end of ``__init__`` (once the attributes the backend's factory reads exist).
    """

    op_name: ClassVar[str] = ""
    # Methods holding the reference maths: a subclass overriding one keeps the reference path.
    reference_methods: ClassVar[tuple[str, ...]] = ("forward_native",)
    # The chosen implementation; None: ``forward_native``.
    _impl: OpImpl | None = None
    # Which table the implementation came from ("native" for the reference), for logs and tests.
    impl_name: str = "native"

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        impl = self._impl
        if impl is None:
            return self.forward_native(*args, **kwargs)
        return impl(self, *args, **kwargs)

    def bind_forward(self) -> None:
        """Choose this layer's implementation from the current ``LayerOps`` (see the module doc)."""
        ops = current_layer_ops()
        impl = None if self._overrides_reference() else ops.implementation(self)
        self._impl = impl
        self.impl_name = "native" if impl is None else ops.name

    def _overrides_reference(self) -> bool:
        owner = next(c for c in type(self).__mro__ if "op_name" in vars(c))
        return any(getattr(type(self), m) is not getattr(owner, m) for m in self.reference_methods)
