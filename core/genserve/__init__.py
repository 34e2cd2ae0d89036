"""genserve: a plugin-based LLM inference server with TGI's API.

Offline use without a server (vLLM's shape; docs/offline.md)::

    from genserve import LLM, SamplingParams
    outputs = LLM().generate(["Hello!"], SamplingParams(max_new_tokens=8))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use: `import genserve` (the CLI does it) stays free of torch.
_LAZY = {
    "LLM": "genserve.entrypoints.llm",
    "SamplingParams": "genserve.engine.sampling_params",
    "GenerationOutput": "genserve.engine.offline",
    "CompletionOutput": "genserve.engine.offline",
}
__all__ = ["LLM", "CompletionOutput", "GenerationOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from genserve.engine.offline import CompletionOutput, GenerationOutput
    from genserve.engine.sampling_params import SamplingParams
    from genserve.entrypoints.llm import LLM


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
