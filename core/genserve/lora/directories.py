"""Where run-time LoRA loads may read from: ``--lora-modules-dir``, nothing else.

A load names a directory (absolute, or relative to one of the allowed directories). Its real
path (every symlink resolved) must lie inside an allowed directory's real path, and so must
each adapter file read from it, so neither a ``..`` nor a symlink (to the directory or to a
file in it) reaches anything outside. Hub ids are not fetched at run time.
"""

from __future__ import annotations

from pathlib import Path

from genserve.lora.errors import LoRAError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def parse_dirs(flag: str | None) -> list[Path]:
    """``--lora-modules-dir`` "a,b" -> the directories' real paths. Raises ValueError for one
    that does not exist."""
    dirs = []
    for item in (flag or "").split(","):
        if item.strip():
            path = Path(item.strip()).expanduser()
            if not path.is_dir():
                raise ValueError(f"--lora-modules-dir {item.strip()!r} is not a directory")
            dirs.append(path.resolve())
    return dirs


def _inside(path: Path, dirs: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in dirs)


def resolve_allowed(adapter_id: str, lora_path: str, dirs: list[Path]) -> Path:
    """The real path of the adapter directory ``lora_path``, checked against ``dirs``.

    Raises LoRAError: no allowed directory configured, a path that does not exist or is not a
    directory, or one (or an adapter file in it) that resolves outside every allowed directory.
    """
    if not dirs:
        raise LoRAError(adapter_id, "no directory allows run-time loads (--lora-modules-dir)")
    given = Path(lora_path).expanduser()
    candidates = [given] if given.is_absolute() else [d / given for d in dirs]
    allowed = ", ".join(map(str, dirs))
    for candidate in candidates:
        real = candidate.resolve()  # symlinks followed as far as they exist
        if not _inside(real, dirs):
            raise LoRAError(adapter_id, f"{lora_path} is outside the directories run-time loads may "
                                        f"read ({allowed})")
        if not real.exists():
            continue
        if not real.is_dir():
            raise LoRAError(adapter_id, f"{lora_path} is not a directory")
        for name in ADAPTER_FILES:
            f = real / name
            if f.exists() and not _inside(f.resolve(), dirs):
                raise LoRAError(adapter_id, f"{lora_path}/{name} links outside the directories "
                                            f"run-time loads may read ({allowed})")
        return real
    raise LoRAError(adapter_id, f"{lora_path} does not exist" +
                    ("" if given.is_absolute() else f" in {allowed}"))
