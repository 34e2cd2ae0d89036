"""The ``genserve`` command: plugin listing, help, and one-line configuration errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "server"))
from serverkit import free_port, genserve_command  # noqa: E402
from tinymodel import build_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow


def genserve(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(genserve_command() + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("genserve: error: ")
    return last


@pytest.fixture(scope="module")
def broken_plugins(tmp_path_factory) -> Path:
    """An installed distribution with two genserve plugins: one raises on import, one is missing."""
    root = tmp_path_factory.mktemp("plugins")
    info = root / "genserve_broken_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: genserve-broken-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[genserve]\nexploding = genserve_exploding_test_plugin\nmissing = genserve_no_such_module_xyz\n")
    (root / "genserve_exploding_test_plugin.py").write_text('raise RuntimeError("boom at import")\n')
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_help():
    r = genserve("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "plugins" in r.stdout
    r = genserve("serve", "--help")
    for flag in ("--model-id", "--max-total-tokens", "--max-input-length", "--api-key", "--payload-limit",
                 "--cors-allow-origin", "--lora-adapters", "MAX_TOTAL_TOKENS"):
        assert flag in r.stdout, flag


def test_plugins_lists_what_each_registered():
    r = genserve("plugins")
    assert r.returncode == 0
    assert "genserve.backends.cpu" in r.stdout and "backends: cpu" in r.stdout
    assert "architectures:" in r.stdout and "llama" in r.stdout
    assert "attention: " in r.stdout and "quantizers: " in r.stdout and "lora: " in r.stdout
    data = json.loads(genserve("plugins", "--json").stdout)
    cpu = next(p for p in data if p["module"] == "genserve.backends.cpu")
    assert cpu["builtin"] is True and cpu["registered"]["backends"] == ["cpu"] and cpu["error"] is None


def test_plugins_reports_broken_plugins_by_name(broken_plugins):
    env = {"PYTHONPATH": os.pathsep.join([str(broken_plugins), os.environ.get("PYTHONPATH", "")])}
    r = genserve("plugins", env=env)
    assert r.returncode == 0
    out = r.stdout
    assert "exploding (genserve_exploding_test_plugin, installed)" in out
    assert "FAILED to load: RuntimeError: boom at import" in out
    assert "missing (genserve_no_such_module_xyz, installed)" in out and "ModuleNotFoundError" in out
    assert "2 plugin(s) failed to load: " in out and "exploding" in out.splitlines()[-1]
    # a plugin that was asked for and cannot load stops `serve` with one line naming it
    r = genserve("serve", "--port", str(free_port()), env={**env, "GENSERVE_PLUGINS": "exploding"})
    assert "plugin 'exploding'" in one_line_error(r) and "boom at import" in r.stderr


def test_unknown_backend_lists_installed_ones():
    line = one_line_error(genserve("serve", "--backend", "nope", "--port", str(free_port())))
    assert "backend 'nope' is not installed" in line and "cpu" in line
    # flags without a subcommand mean `serve`, and flags come from the environment too
    assert one_line_error(genserve("--backend", "nope")) == line
    assert one_line_error(genserve("serve", "--port", str(free_port()), env={"GENSERVE_BACKEND": "nope"})) == line


def test_missing_model_is_one_line():
    line = one_line_error(genserve("serve", "--model-id", "/no/such/model/dir", "--port", str(free_port())))
    assert "/no/such/model/dir" in line and "does not exist" in line


def test_inconsistent_limits_are_one_line(tiny_dir):
    line = one_line_error(genserve("serve", "--model-id", str(tiny_dir), "--port", str(free_port()),
                                   "--max-input-tokens", "100", "--max-total-tokens", "50",
                                   env={"OMP_NUM_THREADS": "1"}))
    assert "--max-input-tokens (100) must be smaller than --max-total-tokens (50)" in line


def test_bad_flag_value_is_an_argparse_error():
    r = genserve("serve", "--max-total-tokens", "lots")
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_health_is_503_until_the_model_is_loaded(tiny_dir):
    import time

    import httpx
    from serverkit import ServerProcess

    server = ServerProcess("loading", ["--model-id", str(tiny_dir)], {"OMP_NUM_THREADS": "1"})
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                r = httpx.get(server.url + "/health", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            if not seen or seen[-1][0] != r.status_code:
                gen = httpx.post(server.url + "/generate", json={"inputs": "hi"}, timeout=30)
                seen.append((r.status_code, r.json() if r.status_code == 503 else None, gen.status_code))
            if r.status_code == 200:
                break
            time.sleep(0.02)
    finally:
        assert server.stop() == 0
    assert seen[0] == (503, {"error": "the model is loading", "error_type": "healthcheck"}, 503)
    assert seen[-1][0] == 200 and seen[-1][2] == 200
