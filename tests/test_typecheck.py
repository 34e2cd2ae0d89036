"""mypy over ``core/genserve`` (configured in ``mypy.ini``) reports no errors, and the
configuration is strict enough to catch a call of a member a base class does not declare."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy comes with the test extra (pip install -e .[test])")

ROOT = Path(__file__).resolve().parents[1]


def run_mypy(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(ROOT / "core")}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini"), *args],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_core_type_checks():
    # A cold run takes ~40 s of CPU (mostly reading torch's annotations); mypy's cache
    # (.mypy_cache) makes reruns take a few seconds.
    res = run_mypy()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: no issues found" in res.stdout


def test_an_undeclared_member_is_an_error(tmp_path):
    """What the check is for: callers use the members Backend, ModelRunner, CausalLM and
    AttentionImpl declare, and a hasattr-style member nobody declared fails the check."""
    # A module name of its own: mypy's incremental cache (shared with earlier runs) keys
    # modules by name and would report an earlier probe's file path.
    probe = tmp_path / f"probe_{tmp_path.name.replace('-', '_')}_{os.getpid()}.py"
    probe.write_text(
        "from genserve.attention.base import AttentionImpl\n"
        "from genserve.backends.base import Backend\n"
        "from genserve.engine.model_runner import ModelRunner\n"
        "\n"
        "\n"
        "def declared(runner: ModelRunner, backend: Backend, impl: type[AttentionImpl]) -> None:\n"
        "    runner.warmup()\n"
        "    print(runner.lazy_kernels, runner.overlap_steps, runner.model.recompute_at_length,\n"
        "          runner.model.is_encoder_decoder, impl.graph_safe, backend.device_count(),\n"
        "          backend.layer_ops())\n"
        "    backend.after_weights_loaded(runner.model)\n"
        "\n"
        "\n"
        "def undeclared(runner: ModelRunner, backend: Backend) -> None:\n"
        "    runner.capture_graphs()\n"
        "    backend.optimize_model(runner.model)\n")
    res = run_mypy(str(probe))
    errors = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert [e.split(": error: ")[1] for e in errors] == [
        '"ModelRunner" has no attribute "capture_graphs"  [attr-defined]',
        '"Backend" has no attribute "optimize_model"  [attr-defined]',
    ], res.stdout
    assert all(e.startswith(str(probe)) for e in errors), (str(probe), errors)
