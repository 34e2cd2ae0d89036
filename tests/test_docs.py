"""Docs that list code facts stay in step with the code."""

from pathlib import Path

from genserve.args import FLAGS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_flag_is_documented():
    text = (DOCS / "flags.md").read_text()
    missing = [f.name for f in FLAGS if f"`{f.name}`" not in text]
    assert not missing, f"docs/flags.md lacks {missing}"
