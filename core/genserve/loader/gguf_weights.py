"""GGUF checkpoints, read through transformers' GGUF support (dequantized on load)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch


def iter_gguf(folder: Path, gguf_file: str, config, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors under transformers' parameter names (with a progress bar)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps GGUF names to its own through a model skeleton; build it on "meta".
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(folder / gguf_file), return_tensors=True,
                                  model_to_load=skeleton, torch_dtype=dtype)
    yield from parsed["tensors"].items()
