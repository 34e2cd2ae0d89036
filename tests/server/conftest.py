"""Real ``genserve serve`` processes for the server tests, started once per session.

Servers are launched together when the first test of this directory starts (so the slow
embedded SmolLM2 loads while the tiny-model tests run); each fixture then waits for its /health.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from serverkit import ALLOWED_ORIGIN, API_KEY, ServerProcess
from tinymodel import build_lora_adapter, build_tiny_llama

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_servers: dict[str, ServerProcess] = {}
_dirs: dict[str, Path] = {}


def model_dir(kind: str) -> Path:
    if kind not in _dirs:
        if "root" not in _dirs:
            _dirs["root"] = Path(tempfile.mkdtemp(prefix="genserve-test-"))
        root = _dirs["root"]
        if kind == "tiny":
            _dirs["tiny"] = build_tiny_llama(root / "tiny")
            _dirs["lora"] = build_lora_adapter(root / "lora", _dirs["tiny"])
        elif kind == "lora":
            model_dir("tiny")
        elif kind == "metaspace":  # a SentencePiece-style tokenizer llguidance cannot load
            _dirs["metaspace"] = build_tiny_llama(root / "metaspace", metaspace=True)
        elif kind == "vision":  # a tiny random Llava-Next with its processor
            from genserve.multimodal.testing import build_tiny_llava_next

            build_tiny_llava_next(root / "vision")
            _dirs["vision"] = root / "vision"
        elif kind == "idefics2":  # a tiny random Idefics2 (crops of varying sizes)
            from genserve.multimodal.testing import build_tiny_idefics2

            build_tiny_idefics2(root / "idefics2")
            _dirs["idefics2"] = root / "idefics2"
        elif kind == "idefics":  # a tiny random Idefics v1 (gated cross-attention)
            from genserve.multimodal.testing import build_tiny_idefics

            build_tiny_idefics(root / "idefics")
            _dirs["idefics"] = root / "idefics"
        elif kind == "faulty":  # tokenizer ids beyond the model's vocabulary
            _dirs["faulty"] = build_tiny_llama(root / "faulty", model_vocab=300,
                                               max_position_embeddings=16384)
    return _dirs[kind]


def server_specs() -> dict:
    return {
        "tiny_server": lambda: ServerProcess("tiny", [
            "--model-id", str(model_dir("tiny")), "--max-batch-total-tokens", "32768",
            "--enable-prefill-logprobs", "--max-best-of", "3"], ONE_THREAD),
        "limited_server": lambda: ServerProcess("limited", [
            "--model-id", str(model_dir("tiny")), "--api-key", API_KEY,
            "--max-concurrent-requests", "2", "--max-total-tokens", "64", "--max-input-tokens", "48",
            "--payload-limit", "8192", "--cors-allow-origin", ALLOWED_ORIGIN,
            "--lora-adapters", f"tiny-adapter={model_dir('lora')}",
            "--max-batch-total-tokens", "4096"], ONE_THREAD),
        "faulty_server": lambda: ServerProcess("faulty", [
            "--model-id", str(model_dir("faulty")), "--disable-grammar-support",
            "--max-batch-total-tokens", "16384"], {**ONE_THREAD, "GENSERVE_GRACEFUL_SHUTDOWN_TIMEOUT": "3"}),
        "metaspace_server": lambda: ServerProcess("metaspace", [
            "--model-id", str(model_dir("metaspace")), "--max-batch-total-tokens", "8192"], ONE_THREAD),
        "smol_server": lambda: ServerProcess("smol", ["--max-batch-total-tokens", "8192"]),
        # Limits small enough to test each image refusal with small images (docs/vision.md).
        "vision_server": lambda: ServerProcess("vision", [
            "--model-id", str(model_dir("vision")), "--max-batch-total-tokens", "4096",
            "--max-images", "2", "--max-image-bytes", "60000", "--max-image-pixels", "10000",
            "--image-fetch-timeout", "1", "--max-input-tokens", "70", "--max-total-tokens", "100"],
            ONE_THREAD),
        "idefics2_server": lambda: ServerProcess("idefics2", [
            "--model-id", str(model_dir("idefics2")), "--max-batch-total-tokens", "4096"], ONE_THREAD),
        "idefics_server": lambda: ServerProcess("idefics", [
            "--model-id", str(model_dir("idefics")), "--max-batch-total-tokens", "4096", "--max-images", "2",
            "--max-input-tokens", "80", "--max-total-tokens", "160"], ONE_THREAD),
    }


def start(name: str) -> ServerProcess:
    if name not in _servers:
        _servers[name] = server_specs()[name]()
    return _servers[name]


_wanted: set[str] = set()


def pytest_collection_finish(session):
    _wanted.update(f for item in session.items for f in getattr(item, "fixturenames", ()))


def pytest_runtest_setup(item):
    """When the first server test is about to run, start every server the session will need."""
    for name in ("smol_server", "tiny_server", "limited_server", "faulty_server", "metaspace_server",
                 "vision_server", "idefics2_server", "idefics_server"):
        if name in _wanted:
            start(name)
    _wanted.clear()


def pytest_sessionfinish(session, exitstatus):
    for server in _servers.values():
        server.stop()
    if "root" in _dirs:
        shutil.rmtree(_dirs["root"], ignore_errors=True)


def _ready(name: str) -> ServerProcess:
    server = start(name)
    try:
        return server.wait_ready()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def tiny_server() -> ServerProcess:
    """The tiny random Llama (never emits EOS: every request runs to max_new_tokens)."""
    return _ready("tiny_server")


@pytest.fixture(scope="session")
def limited_server() -> ServerProcess:
    """Tiny model behind --api-key, 2 concurrent requests, 64 total tokens, 8 KB payloads, CORS."""
    return _ready("limited_server")


@pytest.fixture(scope="session")
def faulty_server() -> ServerProcess:
    """Tiny model whose vocabulary is smaller than its tokenizer's: some prompts fail in the engine."""
    return _ready("faulty_server")


@pytest.fixture(scope="session")
def metaspace_server() -> ServerProcess:
    """Tiny model with a SentencePiece-style (Metaspace, byte-fallback) tokenizer."""
    return _ready("metaspace_server")


@pytest.fixture(scope="session")
def vision_server() -> ServerProcess:
    """The tiny random Llava-Next (tests/server/test_vision.py), with small image limits."""
    return _ready("vision_server")


@pytest.fixture(scope="session")
def idefics2_server() -> ServerProcess:
    """The tiny random Idefics2 (tests/server/test_vision.py)."""
    return _ready("idefics2_server")


@pytest.fixture(scope="session")
def idefics2_dir() -> Path:
    return model_dir("idefics2")


@pytest.fixture(scope="session")
def idefics_server() -> ServerProcess:
    """The tiny random Idefics v1 (tests/server/test_vision.py)."""
    return _ready("idefics_server")


@pytest.fixture(scope="session")
def idefics_dir() -> Path:
    return model_dir("idefics")


@pytest.fixture(scope="session")
def vision_dir() -> Path:
    return model_dir("vision")


@pytest.fixture(scope="session")
def smol_server() -> ServerProcess:
    """The embedded SmolLM2-135M-Instruct."""
    return _ready("smol_server")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return model_dir("tiny")


@pytest.fixture()
def tiny(tiny_server) -> httpx.Client:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


@pytest.fixture()
def limited(limited_server) -> httpx.Client:
    with httpx.Client(base_url=limited_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client
