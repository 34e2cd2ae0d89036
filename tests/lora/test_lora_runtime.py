"""Loading and unloading adapters while a real ``genserve serve`` runs (vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter): guarded by the API key, restricted to
--lora-modules-dir (symlinks included), validated like startup loading with 4xx answers that
disturb nothing, slots shared with the startup adapters, and refused unless enabled."""

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from genserve.lora.directories import resolve_allowed
from genserve.lora.errors import LoRAError

from .lorakit import (
    ALL_TARGETS,
    generate,
    load_with_adapters,
    make_adapter,
    save_base,
    tiny_llama,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from serverkit import API_KEY, ServerProcess
from tinymodel import build_tiny_llama

NEW_TOKENS = 8
PROMPT = "The quick brown fox"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# -- the directory check, without a server ----------------------------------------------------
def test_paths_are_restricted_to_the_allowed_directories(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "good").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "adapter_config.json").write_text("{}")
    dirs = [allowed.resolve()]
    assert resolve_allowed("a", str(allowed / "good"), dirs) == (allowed / "good").resolve()
    assert resolve_allowed("a", "good", dirs) == (allowed / "good").resolve()  # relative to it
    for path in (str(outside / "secret"), "../outside/secret", str(allowed / ".." / "outside" / "secret")):
        with pytest.raises(LoRAError, match="is outside the directories run-time loads may read"):
            resolve_allowed("a", path, dirs)
    os.symlink(outside / "secret", allowed / "link")  # a directory symlink escaping
    with pytest.raises(LoRAError, match="is outside the directories"):
        resolve_allowed("a", "link", dirs)
    (allowed / "filelink").mkdir()  # a file symlink escaping from an allowed directory
    os.symlink(outside / "secret" / "adapter_config.json", allowed / "filelink" / "adapter_config.json")
    with pytest.raises(LoRAError, match="adapter_config.json links outside the directories"):
        resolve_allowed("a", "filelink", dirs)
    with pytest.raises(LoRAError, match="does not exist"):
        resolve_allowed("a", "missing", dirs)
    with pytest.raises(LoRAError, match="no directory allows run-time loads"):
        resolve_allowed("a", str(allowed / "good"), [])


def test_refused_unless_enabled(tmp_path):
    from fastapi.testclient import TestClient
    from genserve.args import defaults
    from genserve.server.app import create_app
    from genserve.server.state import ServerState

    app = create_app(ServerState(defaults()), load=False)
    with TestClient(app) as client:
        for route, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}),
                            ("/v1/unload_lora_adapter", {"lora_name": "x"})):
            r = client.post(route, json=body)
            assert r.status_code == 400
            assert r.json()["error_type"] == "lora_adapter"
            assert "--enable-lora-runtime-updates" in r.json()["error"]


# -- a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-runtime")
    base = build_tiny_llama(root / "tiny")
    allowed = root / "adapters"
    adapters = {
        "first": make_adapter(base, allowed / "first", seed=21, target_modules=ALL_TARGETS),
        "second": make_adapter(base, allowed / "second", seed=22, r=2, target_modules=["q_proj", "down_proj"]),
        "third": make_adapter(base, allowed / "third", seed=23, r=4, target_modules=["v_proj", "gate_proj"]),
    }
    startup = make_adapter(base, root / "startup", seed=24, target_modules=["o_proj"])
    bad = {
        "outside": make_adapter(base, root / "outside", seed=25, target_modules=["q_proj"]),
        "rank": make_adapter(base, allowed / "rank8", seed=26, r=8, target_modules=["q_proj"]),
    }
    other = save_base(root / "other-base", tiny_llama(vocab_size=512, intermediate_size=96))
    bad["shape"] = make_adapter(other, allowed / "other-model", seed=27, target_modules=["gate_proj"])
    (allowed / "empty").mkdir()
    os.symlink(bad["outside"], allowed / "escape")
    server = ServerProcess("lora-runtime", [
        "--model-id", str(base), "--max-batch-total-tokens", "4096", "--api-key", API_KEY,
        "--lora-adapters", f"boot={startup}", "--enable-lora-runtime-updates",
        "--lora-modules-dir", str(allowed), "--max-loras", "1", "--max-lora-rank", "4"],
        {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    try:
        server.wait_ready()
        yield server, base, allowed, adapters, startup
    finally:
        server.stop()


def post(server, route, body, auth=True):
    return httpx.post(server.url + route, json=body, headers=AUTH if auth else {}, timeout=60)


def tokens(server, adapter_id=None):
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": True}
    if adapter_id:
        params["adapter_id"] = adapter_id
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    return [t["id"] for t in d["prefill"]], [t["id"] for t in d["tokens"]]


def served(server):
    return [m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]][1:]


def test_load_generate_unload(setup):
    server, base, _, adapters, startup = setup
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "first", "lora_path": "first"},
                auth=False).status_code == 401
    assert served(server) == ["boot"]
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "first", "lora_path": str(adapters["first"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'first' added successfully."
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": "second"})  # relative
    assert r.status_code == 200, r.text
    assert served(server) == ["boot", "first", "second"]
    assert httpx.get(server.url + "/info", headers=AUTH).json()["lora_adapters"] == ["boot", "first", "second"]

    # One slot (--max-loras 1) for three adapters: each request swaps its adapter in.
    prompt_ids, base_tokens = tokens(server)
    got = {name: tokens(server, name)[1] for name in ("first", "boot", "second", "first")}
    engine = load_with_adapters(base, f"first={adapters['first']},boot={startup},second={adapters['second']}")
    want = generate(engine, [(prompt_ids, a) for a in (None, "first", "boot", "second")], NEW_TOKENS)
    assert [base_tokens, got["first"], got["boot"], got["second"]] == want
    assert len({tuple(t) for t in want}) == 4  # the adapters really differ

    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert r.status_code == 200 and "removed" in r.text
    assert served(server) == ["boot", "first"]
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "second"}})
    assert r.status_code == 422
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    # Loaded again under the same name: the same tokens.
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": "second"}).status_code == 200
    assert tokens(server, "second")[1] == want[3]


@pytest.mark.parametrize("body, status, message", [
    ({"lora_name": "x", "lora_path": "empty"}, 400, "has no adapter_config.json"),
    ({"lora_name": "x", "lora_path": "nowhere"}, 400, "does not exist"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "is outside the directories run-time loads may read"),
    ({"lora_name": "x", "lora_path": "escape"}, 400, "is outside the directories"),
    ({"lora_name": "x", "lora_path": "../outside"}, 400, "is outside the directories"),
    ({"lora_name": "x", "lora_path": "rank8"}, 400, "has rank 8, above --max-lora-rank 4"),
    ({"lora_name": "x", "lora_path": "other-model"}, 400, "does not fit the base model's layer"),
    ({"lora_name": "boot", "lora_path": "third"}, 400, "'boot' is already loaded"),
    ({"lora_name": "x"}, 422, "lora_path"),
], ids=["missing-files", "missing-dir", "outside", "symlink-escape", "dotdot", "rank", "other-base",
        "duplicate", "no-path"])
def test_bad_loads_are_4xx_and_disturb_nothing(setup, body, status, message):
    server = setup[0]
    before = served(server), tokens(server, "boot")
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and message in r.json()["error"], r.json()
    assert (served(server), tokens(server, "boot")) == before


def test_unload_in_use_is_refused_until_it_finishes(setup):
    server, *_ = setup
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": "third"}).status_code == 200
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3000, "adapter_id": "third"}}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client, \
            client.stream("POST", "/generate_stream", json=long) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is running
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "third"})
        assert r.status_code == 409 and r.json()["error_type"] == "lora_adapter_in_use", r.text
        assert "third" in served(server)
        # Loading another adapter while it runs is fine (a load touches no slot).
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "second"})
        assert r.status_code == 200, r.text
    # The client went away: the request is aborted, and the adapter can go.
    for _ in range(100):
        r = post(server, "/v1/unload_lora_adapter", {"lora_name": "third"})
        if r.status_code != 409:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert "third" not in served(server)
    assert tokens(server, "late")[1] == tokens(server, "second")[1]  # same files, same tokens
