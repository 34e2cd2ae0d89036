"""GGUF checkpoints: tensors under transformers' parameter names, dequantized or kept as blocks.

Names and per-architecture fix-ups (llama.cpp stores Llama's q/k rows permuted for its rope) come
from transformers' GGUF support (``modeling_gguf_pytorch_utils``): its name map and tensor
processors, applied here tensor by tensor as its ``load_gguf_checkpoint`` does. Tensors the
model's ``GGUFConfig`` serves packed (``keeps_packed``) are not dequantized: their blocks are
decoded once (``genserve.layers.quantization.gguf.decode_blocks``) into ``<layer>.qweight``,
``<layer>.scales`` and ``<layer>.offsets``. A processor's row permutation is applied to those
tensors' rows (it is found by running the processor on row numbers); a tensor whose processor
does more than permute rows is dequantized instead (``layer_is_packable`` is False for it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType


@dataclass
class GGUFTensors:
    """A GGUF file's tensors and how transformers names and processes them."""

    reader: object  # gguf.GGUFReader
    processor: object  # transformers' TensorProcessor for the architecture
    names: dict[str, str]  # GGUF tensor name (``blk.0.attn_q.weight``) -> transformers' name
    parsed: dict  # transformers' parsed metadata (its processors read and write it)

    def hf_name(self, gguf_name: str) -> str | None:
        return self.names.get(gguf_name)


def open_gguf(path: Path, config) -> GGUFTensors:
    """Read ``path``'s metadata and build transformers' name map for ``config``'s model."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    parsed["tensors"] = {}
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    # transformers maps GGUF names to its own through a model skeleton; build it on "meta".
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # transformers 5 takes the processor; 4.x (the one IPEX 2.8 imports with) takes none.
    takes_processor = "processor" in inspect.signature(get_gguf_hf_weights_map).parameters
    weights_map: Any = get_gguf_hf_weights_map  # typed against transformers 5's signature
    names = weights_map(skeleton, processor) if takes_processor else weights_map(skeleton)
    return GGUFTensors(reader, processor, names, parsed)


def tensor_types(path: Path, config) -> dict[str, GGMLQuantizationType]:
    """transformers' parameter name -> the tensor's ``GGMLQuantizationType``, for every tensor."""
    t = open_gguf(path, config)
    out: dict[str, GGMLQuantizationType] = {}
    for tensor in t.reader.tensors:  # type: ignore[attr-defined]
        name = t.hf_name(tensor.name)
        if name:
            out[name] = tensor.tensor_type
    return out


def _row_permutation(t: GGUFTensors, name: str, rows: int, cols: int) -> np.ndarray | None:
    """The permutation transformers' processor applies to the rows of tensor ``name`` (identity
    when it leaves it alone); None when it does anything but permute rows."""
    probe = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None], (rows, cols))
    result = t.processor.process(weights=probe, name=name, tensor_key_mapping=t.names,  # type: ignore[attr-defined]
                                 parsed_parameters=t.parsed)
    out = np.asarray(result.weights) if result.weights is not None else None
    if result.name != name or out is None or out.shape != (rows, cols):
        return None
    perm = out[:, 0]
    if not (out[:, -1] == perm).all() or not np.array_equal(np.sort(perm), np.arange(rows)):
        return None
    return perm.astype(np.int64)


def iter_gguf(folder: Path, gguf_file: str, config, dtype: torch.dtype,
              keeps_packed: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the file under transformers' names, dequantized to
    ``dtype``; tensors ``keeps_packed(name)`` accepts come as their decoded blocks instead
    (``<layer>.qweight`` uint8 ``[N, K]``, ``<layer>.scales``/``<layer>.offsets`` float32
    ``[N, K/32]``). Raises ValueError when a tensor asked for packed cannot be."""
    from gguf import dequantize
    from tqdm import tqdm

    from genserve.layers.quantization.gguf import decode_blocks

    t = open_gguf(folder / gguf_file, config)
    for tensor in tqdm(t.reader.tensors, desc="Loading GGUF tensors"):  # type: ignore[attr-defined]
        hf = t.hf_name(tensor.name)
        if hf and keeps_packed is not None and keeps_packed(hf):
            rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dimensions innermost first
            perm = _row_permutation(t, tensor.name, rows, cols)
            if perm is None:
                raise ValueError(f"GGUF tensor {tensor.name}: its transformers processor reshapes it, so it "
                                 f"cannot be served packed")
            raw = np.asarray(tensor.data).reshape(rows, -1)[perm]
            q, scales, offsets = decode_blocks(raw, tensor.tensor_type, cols)
            layer = hf[: -len(".weight")]
            yield f"{layer}.qweight", q
            yield f"{layer}.scales", scales
            if offsets is not None:
                yield f"{layer}.offsets", offsets
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = t.processor.process(weights=weights, name=tensor.name, tensor_key_mapping=t.names,  # type: ignore[attr-defined]
                                     parsed_parameters=t.parsed)
        name = t.hf_name(result.name) if result.weights is not None else None
        if name:
            yield name, torch.from_numpy(np.copy(result.weights)).to(dtype)
    # Processors that assemble tensors from several GGUF ones (MoE experts) leave them here.
    for name, value in t.parsed["tensors"].items():
        yield name, torch.as_tensor(np.asarray(value)).to(dtype)
