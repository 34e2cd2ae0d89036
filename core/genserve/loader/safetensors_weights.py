"""Streaming tensors out of (sharded) safetensors files as lazy slices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from safetensors import safe_open
from tqdm.auto import tqdm


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (pickled .bin files are not loaded)")
    return files


def iter_safetensors(folder: Path, show_progress: bool = True) -> Iterator[tuple[str, object]]:
    """``(name, lazy slice)`` pairs: a layer narrows the slice so only its rank's bytes are read."""
    files = safetensors_files(folder)
    for path in tqdm(files, desc="Loading safetensors shards", disable=not show_progress or len(files) < 2):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in tqdm(names, desc=f"Loading {path.name}", leave=False, disable=not show_progress):
                yield name, f.get_slice(name)
