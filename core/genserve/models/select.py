"""Which model class serves a checkpoint: a registered architecture, or the transformers fallback.

``--model-impl auto`` (the default) takes the class a plugin registered for ``config.model_type``
and falls back to ``TransformersForCausalLM`` for a type nobody registers (TGI's
``AutoModelForCausalLM`` fallback); ``genserve`` refuses unregistered types; ``transformers``
uses the fallback even where a native module exists (to compare the two, or to work around one).
"""

from __future__ import annotations

import logging

from genserve.models.base import CausalLM
from genserve.registry import Registry

logger = logging.getLogger(__name__)


class ArchitectureError(ValueError):
    """No model class can serve this configuration; the message says why."""


def select_architecture(architectures: Registry, config, model_impl: str = "auto") -> type[CausalLM]:
    """The model class for ``config`` (see the module docstring). Raises ArchitectureError."""
    from genserve.models.transformers_fallback import TransformersForCausalLM, unsupported_reason

    model_type = config.model_type
    if model_impl != "transformers" and model_type in architectures:
        return architectures.get(model_type)
    if model_impl == "genserve":
        known = ", ".join(architectures) or "none"
        raise ArchitectureError(f"model type {model_type!r} is not supported by any installed plugin "
                                f"(--model-impl genserve); supported: {known}")
    why = unsupported_reason(config)
    if why is not None:
        known = ", ".join(architectures) or "none"
        raise ArchitectureError(f"model type {model_type!r} is not supported by any installed plugin "
                                f"(supported: {known}), and the transformers fallback cannot serve "
                                f"it: {why}")
    return TransformersForCausalLM
