"""genserve behind Ray Serve on a local Ray cluster (CPU, tiny model): two replicas both answer
TGI's and OpenAI's routes (streaming too), and a killed replica's requests fail cleanly while
Ray Serve replaces it. Skipped where ray[serve] is not installed (the ``ray`` extra)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from genserve.integrations.ray_serve import REPLICA_HEADER, app_builder, build_app

from tests.server.tinymodel import build_tiny_llama

LIMIT_S = 120  # Ray starts a replacement replica (a process that imports torch) within this
FLAGS = ["--backend", "cpu", "--dtype", "float32", "--max-batch-total-tokens", "2048",
         "--max-concurrent-requests", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    """Two genserve replicas behind Ray Serve's proxy; yields its URL."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny"))
    port = free_port()
    # Each replica takes one CPU: 2 replicas and 1 spare for the replacement the test asks for.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(["--model-id", str(folder), *FLAGS], num_replicas=2, health_check_period_s=2),
                  name="genserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def generate(url: str, text: str = "Paris is", max_new_tokens: int = 4) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": text, "parameters": {"max_new_tokens": max_new_tokens}},
                      timeout=LIMIT_S)


def test_two_replicas_serve_tgi_and_openai_routes(ray_app):
    seen = set()
    deadline = time.monotonic() + LIMIT_S
    while len(seen) < 2 and time.monotonic() < deadline:  # Ray Serve picks replicas at random
        r = generate(ray_app)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"]
        seen.add(r.headers[REPLICA_HEADER])
    assert len(seen) == 2, f"only replica(s) {seen} answered"

    r = httpx.post(ray_app + "/v1/chat/completions", timeout=LIMIT_S, json={
        "model": "tgi", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion" and r.json()["usage"]["completion_tokens"] == 5

    # Streaming passes through Ray Serve's proxy as server-sent events, token by token.
    with httpx.stream("POST", ray_app + "/generate_stream", timeout=LIMIT_S,
                      json={"inputs": "Paris is", "parameters": {"max_new_tokens": 6}}) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 6 and events[-1]["generated_text"] is not None

    # TGI's errors keep their format and status through the proxy.
    r = generate(ray_app, max_new_tokens=0)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_killed_replica_is_replaced(ray_app):
    r = generate(ray_app)
    victim_id = r.headers[REPLICA_HEADER]  # the replica actor's name

    # Requests in flight while the replica dies: each one either completes or fails with an
    # HTTP error from Ray Serve's proxy (it does not retry a request a replica had started,
    # https://docs.ray.io/en/latest/serve/production-guide/fault-tolerance.html); none hangs.
    statuses: list[int] = []

    def client():
        for _ in range(4):
            try:
                statuses.append(generate(ray_app, max_new_tokens=64).status_code)
            except httpx.HTTPError as exc:  # a connection the proxy closed: a clean failure too
                statuses.append(type(exc).__name__)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for c in clients:
        c.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(victim_id, namespace="serve"), no_restart=True)
    for c in clients:
        c.join(LIMIT_S)
    assert not any(c.is_alive() for c in clients), "a request hangs after its replica was killed"
    print("statuses while a replica was killed:", statuses)
    assert len(statuses) == 12 and all(s == 200 or (isinstance(s, int) and s >= 500) or isinstance(s, str)
                                       for s in statuses), statuses
    assert statuses.count(200) >= 6, statuses  # the surviving replica kept serving

    # Ray Serve starts a replacement: two replicas answer again, the killed one not among them.
    seen: set[str] = set()
    deadline = time.monotonic() + LIMIT_S
    while len(seen) < 2 and time.monotonic() < deadline:
        r = generate(ray_app)
        if r.status_code == 200:
            seen.add(r.headers[REPLICA_HEADER])
        else:
            time.sleep(0.5)
    assert len(seen) == 2 and victim_id not in seen, seen


def test_app_builder_arguments():
    app = app_builder({"genserve_args": "--backend cpu --max-concurrent-requests 3", "num_replicas": "2"})
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2 and deployment.max_ongoing_requests == 3
    assert deployment.ray_actor_options["num_cpus"] == 1
    app = build_app(["--backend", "cpu"], autoscaling_config={"min_replicas": 1, "max_replicas": 4,
                                                              "target_ongoing_requests": 2})
    cfg = app._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 2)
    with pytest.raises(ValueError, match="unknown app_builder arguments"):
        app_builder({"genserve_args": "--backend cpu", "replicas": "2"})
