"""From ``--quantize`` and the checkpoint to the model's ``QuantizationConfig``.

The checkpoint's quantization is read from ``quantization_config`` in config.json, else from
``quantize_config.json`` (AutoGPTQ) or ``quant_config.json`` (AutoAWQ). ``--quantize`` takes TGI's
names; given with a quantized checkpoint it must name the checkpoint's method, and a format that
reads pre-quantized weights (gptq, awq, marlin, compressed-tensors) refuses a checkpoint without
them.
"""

from __future__ import annotations

import json
from pathlib import Path

from genserve.layers.quantization.base import (
    LinearKernelChooser,
    QuantizationConfig,
    QuantizationError,
)

# Checkpoint spellings of TGI's --quantize names.
ALIASES = {"compressed_tensors": "compressed-tensors"}

TOOLS = {
    "gptq": "GPTQModel or llm-compressor",
    "awq": "AutoAWQ or llm-compressor",
    "marlin": "a Marlin packer",
    "compressed-tensors": "llm-compressor",
    "fbgemm_fp8": "transformers' FbgemmFp8Config",
    "gguf": "llama.cpp's convert_hf_to_gguf.py and llama-quantize (then pass the .gguf file)",
}


def checkpoint_quantization(hf_config, folder: Path | None) -> dict | None:
    """The checkpoint's quantization config as a dict with ``quant_method`` set, or None."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict()
    if raw:
        return dict(raw)
    if folder is not None:
        for fname, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
            path = Path(folder) / fname
            if path.is_file():
                with open(path) as f:
                    data = json.load(f)
                data.setdefault("quant_method", method)
                return data
    return None


def checkpoint_method(qconf: dict) -> str:
    method = str(qconf.get("quant_method", "")).lower()
    method = ALIASES.get(method, method)
    if method == "gptq" and (qconf.get("is_marlin_format") or str(qconf.get("checkpoint_format", "")) == "marlin"):
        return "marlin"
    return method


def build_quantization(registry, flag: str | None, hf_config, folder: Path | None,
                       kernels: LinearKernelChooser, backend_name: str
                       ) -> tuple[str | None, QuantizationConfig | None]:
    """``(name, config)`` for the model, ``(None, None)`` when it is not quantized.

    Raises QuantizationError when the flag and the checkpoint disagree, when the method is not
    installed or does not run on the backend, and for settings the method refuses.
    """
    qconf = checkpoint_quantization(hf_config, folder)
    found = checkpoint_method(qconf) if qconf else None
    name = flag.lower() if flag else found
    if name is None:
        return None, None
    if flag and found and name != found:
        raise QuantizationError(f"--quantize {flag} does not match the checkpoint, which is {found}-quantized "
                                f"(quantization_config.quant_method); drop the flag or pass --quantize {found}")
    if name not in registry:
        known = ", ".join(registry) or "none"
        raise QuantizationError(f"quantization {name!r} is not supported by any installed plugin; "
                                f"supported: {known}")
    cls = registry.get(name)
    if cls.requires_checkpoint_config and not found:
        raise QuantizationError(f"--quantize {name} needs a checkpoint already quantized to {name} (its "
                                f"config.json has no quantization_config): quantize the model first, "
                                f"e.g. with {TOOLS.get(name, 'its tool')}, and serve that checkpoint")
    if not cls.requires_checkpoint_config and found and not cls.accepts_checkpoint_config:
        raise QuantizationError(f"--quantize {name} quantizes dense weights at load, but the checkpoint is "
                                f"already {found}-quantized")
    if cls.backends is not None and backend_name not in cls.backends:
        raise QuantizationError(f"quantizer {name!r} does not run on backend {backend_name!r}")
    return name, cls.from_config(qconf, kernels)
