"""The README's two set-up commands stay true: CI runs the test command it shows."""

import json
import re
import subprocess
from pathlib import Path

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


def test_serve_command_installs_serves_and_asks():
    cmd = block("serve-command")
    assert "pip install -e ." in cmd and "genserve serve" in cmd
    body = re.search(r"-d '(\{.*\})'", cmd).group(1)
    assert json.loads(body)["messages"][0]["content"]


def test_dev_requirements_name_every_local_distribution():
    reqs = (ROOT / "requirements-dev.txt").read_text()
    for pyproject in ROOT.glob("backends/*/pyproject.toml"):
        assert f"./backends/{pyproject.parent.name}" in reqs
    for pyproject in ROOT.glob("plugins/*/pyproject.toml"):
        assert f"./plugins/{pyproject.parent.name}" in reqs
