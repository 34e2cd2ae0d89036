"""A lost or stuck shard fails requests with an error, within a bound, instead of hanging."""

import asyncio
import multiprocessing
import os
import signal
import time

import pytest

from genserve.args import defaults
from genserve.backends.cpu import CpuBackend
from genserve.distributed.state import get_tp_group
from genserve.engine.async_engine import AsyncEngine
from genserve.errors import EngineDeadError
from genserve.errors import ConfigError
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.sequence import FinishReason
from genserve.executor import sharded as launch
from genserve.testing import load_genserve, save_reference

from .conftest import tiny_llama

LIMIT_S = 30  # far above the few seconds these take: a hang fails the test instead of CI


def generate_until_done(engine: AsyncEngine, request_id: str, on_first_token=None):
    """(tokens received, error) of one long request; the error is the output's or the raised one."""
    async def run():
        tokens = 0
        try:
            async for out in engine.generate(request_id, [5, 6, 7, 8],
                                             SamplingParams(max_new_tokens=400, ignore_eos=True)):
                if tokens == 0 and on_first_token:
                    on_first_token()
                tokens += len(out.tokens)
                if out.finished:
                    assert out.finish_reason is FinishReason.ERROR, "the request finished normally"
                    return tokens, out.error
        except EngineDeadError as exc:
            return tokens, str(exc)
        raise AssertionError("the stream ended without a final output")

    return asyncio.run(asyncio.wait_for(run(), LIMIT_S))


@pytest.fixture
def serving(tmp_path, build_sharded):
    """``serving()``: (rank 0's shard workers, started AsyncEngine) of a 2-rank tiny Llama."""
    servers = []

    def start():
        save_reference(tiny_llama(), tmp_path)
        engine = build_sharded(tmp_path)
        servers.append(AsyncEngine(engine))
        servers[-1].start()
        return engine.runner.peers, servers[-1]

    yield start
    for server in servers:  # before build_sharded stops the workers: no step may be running
        server.shutdown()


def test_killed_worker_fails_requests(serving):
    workers, server = serving()
    worker = workers.supervisor.procs[1]
    tokens, error = generate_until_done(server, "a", lambda: os.kill(worker.pid, signal.SIGKILL))
    assert 0 < tokens < 400
    assert "shard 1 exited (killed by SIGKILL)" in error
    assert workers.dead == "shard 1 exited (killed by SIGKILL)"  # what /health reads

    t0 = time.monotonic()
    tokens, error = generate_until_done(server, "b")  # a request after the loss fails at once
    assert tokens == 0 and "tensor-parallel engine is down" in error
    assert time.monotonic() - t0 < 5


def test_stuck_worker_times_out(serving, monkeypatch):
    monkeypatch.setenv("GENSERVE_SHARD_TIMEOUT", "3")
    workers, server = serving()
    worker = workers.supervisor.procs[1]
    t0 = time.monotonic()
    tokens, error = generate_until_done(server, "a", lambda: os.kill(worker.pid, signal.SIGSTOP))
    assert "took longer than 3s: a shard hangs" in error
    assert time.monotonic() - t0 < 3 + 10
    assert worker.exitcode == -signal.SIGKILL  # the supervisor ended the stuck worker


def test_config_error_at_start_stops_the_workers(tmp_path):
    save_reference(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="must be smaller"):  # rank 0's own error, not a shard's
        load_genserve(tmp_path, num_shard=2, max_input_tokens=100, max_total_tokens=50)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("genserve-shard")]
    assert get_tp_group().size == 1  # single-rank again: the next engine builds unsharded


def test_shard_flags():
    assert not launch.sharding_requested(defaults(num_shard=1))
    assert launch.sharding_requested(defaults(num_shard=2))
    assert launch.shard_count(defaults(num_shard=3), CpuBackend) == 3
    with pytest.raises(ConfigError, match="give --num-shard"):
        launch.shard_count(defaults(sharded=True), CpuBackend)
    with pytest.raises(ConfigError, match="at least 2 shards"):
        launch.shard_count(defaults(sharded=True, num_shard=1), CpuBackend)
