"""One model over two "nodes" on this host (gloo on CPU, --master-addr 127.0.0.1): node 1 is a
real ``genserve serve --node-rank 1`` process that spawns its own ranks; node 0 is rank 0,
built in this process (parity) or a ``genserve serve`` process with HTTP (failures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from genserve.args import defaults
from genserve.backends.cpu import CpuBackend
from genserve.errors import ConfigError
from genserve.executor.topology import resolve_topology
from genserve.testing import (
    generate_greedy,
    load_genserve,
    make_prompts,
    prompt_logits,
    save_reference,
)

from tests.server.tinymodel import build_tiny_llama

from .conftest import tiny_llama

ENGINE_FLAGS = ["--backend", "cpu", "--dtype", "float32", "--block-size", "4",
                "--max-batch-total-tokens", "4096", "--max-batch-prefill-tokens", "64"]
LIMIT_S = 30  # a dead node must turn into errors within this; far above the few seconds it takes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A ``genserve serve`` process with its log in a file."""

    def __init__(self, folder: Path, args: list[str], env: dict | None = None):
        self.log_path = Path(tempfile.mktemp(prefix="genserve-node-", suffix=".log"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's life, closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genserve.cli", "serve", "--model-id", str(folder), *ENGINE_FLAGS, *args],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(20) is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def node_flags(rank: int, nnodes: int, num_shard: int, port: int) -> list[str]:
    return ["--nnodes", str(nnodes), "--node-rank", str(rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--num-shard", str(num_shard)]


@pytest.fixture
def nodes():
    """``start(folder, args, env)``: a node process, stopped (and its log shown) after the test."""
    started: list[Node] = []

    def start(folder, args, env=None) -> Node:
        started.append(Node(folder, args, env))
        return started[-1]

    yield start
    for node in started:
        node.stop()
        print(f"--- {node.log_path} ---\n{node.log()[-3000:]}")


def test_topology_from_flags_and_torchrun_env(monkeypatch):
    """--num-shard is the total over the nodes; --sharded needs device counts; torchrun's env wins."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)
    topo = resolve_topology(defaults(nnodes=2, node_rank=1, master_addr="10.0.0.1", num_shard=4), CpuBackend)
    assert (topo.world_size, topo.ranks_per_node, topo.rank, list(topo.local_ranks)) == (4, 2, 2, [2, 3])
    assert not topo.serves_http and topo.remote_members == ["node 1"]
    topo = resolve_topology(defaults(nnodes=3, master_addr="h"), CpuBackend)  # one rank per node
    assert (topo.world_size, topo.serves_http) == (3, True)
    with pytest.raises(ConfigError, match="does not split evenly"):
        resolve_topology(defaults(nnodes=2, master_addr="h", num_shard=3), CpuBackend)
    with pytest.raises(ConfigError, match="needs --master-addr"):
        resolve_topology(defaults(nnodes=2, master_addr=None), CpuBackend)
    with pytest.raises(ConfigError, match="not in 0..1"):
        resolve_topology(defaults(nnodes=2, node_rank=2, master_addr="h"), CpuBackend)
    with pytest.raises(ConfigError, match="cannot count the devices"):
        resolve_topology(defaults(nnodes=2, master_addr="h", sharded=True), CpuBackend)

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    topo = resolve_topology(defaults(), CpuBackend)
    assert (topo.torchrun, topo.world_size, topo.nnodes, topo.node_rank, topo.rank) == (True, 4, 2, 1, 3)
    assert topo.remote_members == ["rank 1", "rank 2", "rank 3"] and not topo.serves_http
    with pytest.raises(ConfigError, match="disagrees with torchrun's WORLD_SIZE 4"):
        resolve_topology(defaults(num_shard=2), CpuBackend)


def test_two_nodes_match_one_process(tmp_path, nodes):
    """4 ranks, 2 per node: logits and greedy tokens equal the unsharded engine's; node 1 serves no
    HTTP, says so, and exits 0 when rank 0 stops the engine."""
    config = tiny_llama(num_key_value_heads=4)
    save_reference(config, tmp_path)
    port = free_port()
    plain = load_genserve(tmp_path)  # first: while this process is a rank, every engine is a shard
    node1 = nodes(tmp_path, node_flags(1, 2, 4, port))
    sharded = load_genserve(tmp_path, num_shard=4, nnodes=2, node_rank=0, master_addr="127.0.0.1",
                            master_port=port)
    try:
        prompts = make_prompts(config.vocab_size)
        for p in prompts:
            diff = (prompt_logits(sharded, p) - prompt_logits(plain, p)).abs().max().item()
            assert diff < 1e-4, f"logits over two nodes differ by {diff:.2e} for a prompt of {len(p)} tokens"
        want = [generate_greedy(plain, [p], 12)[0] for p in prompts]
        assert generate_greedy(sharded, prompts, 12, join_every=2) == want
        assert list(sharded.runner.peers.supervisor.procs) == [1]  # node 0 spawned rank 1 only
    finally:
        sharded.runner.peers.shutdown()
    assert node1.wait(LIMIT_S) == 0, "node 1 did not stop cleanly with rank 0"
    log = node1.log()
    assert "node 1 of 2, ranks 2..3 of 4" in log and "runs shards only; HTTP is served by node 0" in log
    assert "[shard 2]" in log and "[shard 3]" in log


def generate(url: str, max_new_tokens: int) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": "hello", "parameters": {
        "max_new_tokens": max_new_tokens, "decoder_input_details": False}}, timeout=LIMIT_S)


def wait_healthy(node0: Node, url: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert node0.proc.poll() is None, f"node 0 exited:\n{node0.log()[-3000:]}"
        try:
            if httpx.get(url + "/health", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"node 0 not healthy after {timeout}s:\n{node0.log()[-3000:]}")


def test_killed_node_fails_requests_and_health(tmp_path, nodes):
    """Kill node 1's process mid-request: the request ends with TGI's generation error (424,
    as TGI answers a failed shard), /health answers 503, later requests fail at once; no hang."""
    build_tiny_llama(tmp_path)  # with a tokenizer, for HTTP
    port, http_port = free_port(), free_port()
    env = {"GENSERVE_NODE_TIMEOUT": "3"}
    node0 = nodes(tmp_path, [*node_flags(0, 2, 2, port), "--hostname", "127.0.0.1", "--port", str(http_port)], env)
    node1 = nodes(tmp_path, node_flags(1, 2, 2, port), env)
    url = f"http://127.0.0.1:{http_port}"
    wait_healthy(node0, url)
    assert generate(url, 4).status_code == 200

    answer: list[httpx.Response] = []
    long_request = threading.Thread(target=lambda: answer.append(generate(url, 400)))
    long_request.start()
    time.sleep(1.0)  # the request is decoding
    t0 = time.monotonic()
    node1.proc.kill()
    long_request.join(LIMIT_S)
    assert answer, "the in-flight request hangs after node 1 died"
    r = answer[0]
    assert r.status_code == 424, r.text
    assert r.json()["error_type"] == "generation" and "tensor-parallel engine is down" in r.json()["error"]

    health = httpx.get(url + "/health", timeout=LIMIT_S)
    assert health.status_code == 503 and health.json()["error_type"] == "healthcheck"
    r = generate(url, 4)
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    assert time.monotonic() - t0 < LIMIT_S


def test_idle_node_loss_fails_health_through_heartbeat(tmp_path, nodes):
    """A node lost while nothing runs is seen by its missed heartbeats (SIGSTOP: its sockets stay
    open, so no collective would notice): /health fails within the node timeout, and the stopped
    node's shards are told through the store and end."""
    build_tiny_llama(tmp_path)
    port, http_port = free_port(), free_port()
    env = {"GENSERVE_NODE_TIMEOUT": "3"}
    node0 = nodes(tmp_path, [*node_flags(0, 2, 2, port), "--hostname", "127.0.0.1", "--port", str(http_port)], env)
    node1 = nodes(tmp_path, node_flags(1, 2, 2, port), env)
    url = f"http://127.0.0.1:{http_port}"
    wait_healthy(node0, url)
    node1.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < LIMIT_S:
            health = httpx.get(url + "/health", timeout=LIMIT_S)
            if health.status_code == 503:
                break
            time.sleep(0.5)
        assert health.status_code == 503, "node 1 stopped beating, yet /health stays 200"
        assert 2.5 < time.monotonic() - t0 < LIMIT_S
        assert "node 1 lost: no heartbeat for 3s" in node0.log()
    finally:
        node1.proc.send_signal(signal.SIGCONT)
    # Resumed, node 1 reads that the engine is dead and stops its shards.
    assert node1.wait(LIMIT_S) == 1
    assert "rank 0 declared the engine dead" in node1.log()


def test_torchrun_ranks_serve_like_one_process(tmp_path, nodes):
    """``torchrun --nproc-per-node 2 -m genserve.cli serve``: rank 0 serves HTTP, rank 1 runs its
    shard only; greedy tokens equal the unsharded engine's; SIGTERM to torchrun stops both."""
    build_tiny_llama(tmp_path)
    plain = load_genserve(tmp_path)
    http_port = free_port()
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
             "127.0.0.1", "--master-port", str(free_port()), "-m", "genserve.cli", "serve",
             "--model-id", str(tmp_path), *ENGINE_FLAGS, "--hostname", "127.0.0.1", "--port", str(http_port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        ids = httpx.post(url + "/tokenize", json={"inputs": "Paris is the capital"}, timeout=LIMIT_S).json()
        prompt = [t["id"] for t in ids]
        r = httpx.post(url + "/generate", timeout=LIMIT_S, json={"inputs": "Paris is the capital", "parameters": {
            "max_new_tokens": 8, "details": True}})
        assert r.status_code == 200, r.text
        assert [t["id"] for t in r.json()["details"]["tokens"]] == generate_greedy(plain, [prompt], 8)[0]
        log = log_path.read_text()
        assert "rank 1 (torchrun): this process runs one shard only; HTTP is served by rank 0" in log
        assert "tensor parallel: 2 ranks over gloo" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(LIMIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"torchrun did not stop:\n{log_path.read_text()[-3000:]}") from None


def test_remote_shard_exit_is_reported_by_its_node(tmp_path, nodes):
    """A shard of node 1 dies while nothing runs: node 1 reports it through the store at once
    (rank 0 names the shard and its signal), /health fails, and node 1 exits 1."""
    import re

    build_tiny_llama(tmp_path)
    port, http_port = free_port(), free_port()
    node0 = nodes(tmp_path, [*node_flags(0, 2, 2, port), "--hostname", "127.0.0.1", "--port", str(http_port)])
    node1 = nodes(tmp_path, node_flags(1, 2, 2, port))  # the default 30 s node timeout: not what fires
    url = f"http://127.0.0.1:{http_port}"
    wait_healthy(node0, url)
    shard_pid = int(re.search(r"shards \[1\] started \(pids \[(\d+)\]\)", node1.log()).group(1))
    os.kill(shard_pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert node1.wait(LIMIT_S) == 1
    while "node 1 failed" not in node0.log() and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert "node 1 failed: shard 1 exited (killed by SIGKILL)" in node0.log()
    health = httpx.get(url + "/health", timeout=LIMIT_S)
    assert health.status_code == 503
    assert time.monotonic() - t0 < 10  # well inside the 30 s heartbeat timeout
