"""A client that goes away cancels its request: the KV blocks come back within a step or two,
for non-streaming requests (which Starlette would not cancel by itself) and for streams."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serverkit import metric

pytestmark = pytest.mark.slow
LONG = {"inputs": "Hello world", "parameters": {"max_new_tokens": 3500}}  # minutes on this model


def wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_dropped_non_streaming_request_frees_kv(tiny_server, tiny):
    assert metric(tiny, "genserve_kv_blocks_used") == 0
    before = metric(tiny, "tgi_request_success")

    async def drop_after_start():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as client:
            task = asyncio.create_task(client.post("/generate", json=LONG))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, wait_for, lambda: metric(tiny, "genserve_kv_blocks_used") > 0,
                                       30, "the request to start")
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(drop_after_start())
    took = wait_for(lambda: metric(tiny, "genserve_kv_blocks_used") == 0, 5, "KV blocks to be freed")
    assert took < 5
    assert metric(tiny, "genserve_requests_running") == 0
    assert metric(tiny, "genserve_requests_in_flight") == 0
    assert metric(tiny, "tgi_request_success") == before  # it did not run to completion
    assert metric(tiny, 'tgi_request_failure{err="cancelled"}') >= 1


def test_dropped_stream_frees_kv(tiny_server, tiny):
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        with client.stream("POST", "/generate_stream", json=LONG) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data:")
                if seen == 3:
                    break
            assert metric(tiny, "genserve_kv_blocks_used") > 0
        # leaving the block closes the connection mid-stream
    wait_for(lambda: metric(tiny, "genserve_kv_blocks_used") == 0, 5, "KV blocks to be freed")
    assert metric(tiny, "genserve_requests_running") == 0 and metric(tiny, "genserve_requests_in_flight") == 0


def test_dropped_openai_requests_free_kv(tiny_server, tiny):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3500, "n": 2}
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()  # (a dropped iterator would close the connection already)
            next(lines)
            wait_for(lambda: metric(tiny, "genserve_requests_running") == 2, 30, "both choices to run")
    wait_for(lambda: metric(tiny, "genserve_kv_blocks_used") == 0, 5, "KV blocks to be freed")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3500}, timeout=1.5)
    wait_for(lambda: metric(tiny, "genserve_kv_blocks_used") == 0, 5, "KV blocks to be freed")
