"""``--lora-adapters``: which adapters to load, and where their files are.

TGI's syntax: a comma-separated list of ``id`` (a hub repository, downloaded) or ``id=path``
(a local directory, or a hub repository served under another id).
"""

from __future__ import annotations

import logging
from pathlib import Path

from genserve.lora.errors import LoRAError

logger = logging.getLogger(__name__)


def parse_lora_adapters(spec: str | None) -> dict[str, str | None]:
    """``"a,b=/path"`` -> {"a": None, "b": "/path"} (None: the id itself is the source)."""
    adapters: dict[str, str | None] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, path = item.partition("=")
        adapters[name.strip()] = path.strip() or None
    return adapters


def resolve_adapter_dir(adapter_id: str, source: str | None, revision: str | None = None) -> Path:
    """A local directory holding the adapter's files: ``source`` (or the id) when it is one,
    else a hub repository fetched with ``snapshot_download`` (only the adapter files)."""
    where = source or adapter_id
    path = Path(where).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or where.startswith((".", "~")) or where.count("/") > 1:
        raise LoRAError(adapter_id, f"{where} is not a directory")
    from huggingface_hub import snapshot_download

    logger.info("LoRA adapter %s: downloading %s from the hub", adapter_id, where)
    try:
        local = snapshot_download(where, revision=revision, allow_patterns=[
            "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"])
    except Exception as exc:  # offline, unknown repository, gated...
        raise LoRAError(adapter_id, f"cannot download {where!r} from the hub: {exc}") from exc
    return Path(local)
