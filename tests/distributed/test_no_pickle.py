"""Nothing a peer process sends is unpickled (vLLM's CVEs came from pickled peer messages)."""

import re
from pathlib import Path

import pytest

import genserve.distributed
import genserve.executor
from genserve.args import defaults
from genserve.executor.sharded import plain_flags
from genserve.errors import ConfigError

# pickle itself, torch.distributed's *_object collectives, torch.load, multiprocessing channels.
PICKLING = re.compile(r"import \w*pickle|\w*pickle\.|_object_list|gather_object|broadcast_object|"
                      r"torch\.load\(|\.Queue\(|\.Pipe\(|\.Manager\(")


def test_distributed_code_uses_no_pickling_api():
    # The process groups and channel, and the executor that spawns and feeds the workers.
    paths = [path for pkg in (genserve.distributed, genserve.executor)
             for path in sorted(Path(pkg.__file__).parent.glob("*.py"))]
    hits = [f"{path.name}:{n}: {line.strip()}" for path in paths
            for n, line in enumerate(path.read_text().splitlines(), 1) if PICKLING.search(line)]
    assert not hits, "pickling reaches the shard processes:\n" + "\n".join(hits)


def test_workers_get_plain_flag_values_only():
    flags = plain_flags(defaults(model_id="/m", num_shard=2))
    assert flags["model_id"] == "/m" and flags["num_shard"] == 2
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in flags.values())
    with pytest.raises(ConfigError, match="cannot be passed"):
        plain_flags(defaults(model_id=Path("/m")))
