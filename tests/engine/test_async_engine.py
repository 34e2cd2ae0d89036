"""AsyncEngine's request streams: a consumer that is cancelled stops and aborts its request,
whatever the timing of the outputs arriving around the cancellation."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from types import SimpleNamespace

from genserve.engine.async_engine import AsyncEngine
from genserve.engine.outputs import RequestOutput
from genserve.engine.peers import Peers
from genserve.engine.sampling_params import SamplingParams


class IdleEngine:
    """Takes requests and aborts and never steps: the test delivers outputs itself."""

    has_work = False
    seqs: dict = {}
    runner = SimpleNamespace(peers=Peers())  # AsyncEngine.is_alive asks the runner's peers

    def __init__(self):
        self.added: list[str] = []
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt_ids, params):
        self.added.append(request_id)

    def abort(self, request_id):
        self.aborted.append(request_id)
        return None


async def _wait(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_cancel_as_an_output_arrives_aborts_the_request():
    """The output and the cancellation land in the same loop iteration: the consumer must end
    cancelled (before the fix, ``asyncio.wait_for`` returned the output instead on Python 3.11,
    and a dropped HTTP request ran to its end holding its KV blocks)."""
    rounds = 20
    engine = IdleEngine()
    aengine = AsyncEngine(engine)
    aengine.start()

    async def scenario(i: int):
        rid = f"r{i}"
        received = []

        async def consume():
            async with aclosing(aengine.generate(rid, [1, 2], SamplingParams())) as outputs:
                async for out in outputs:
                    received.append(out)

        consumer = asyncio.ensure_future(consume())
        await _wait(lambda: rid in engine.added and rid in aengine._streams)
        await asyncio.sleep(0.01)  # the consumer now waits on its empty stream
        _, stream = aengine._streams[rid]
        stream.put_nowait(RequestOutput(rid, text="x"))  # wakes the consumer's getter ...
        consumer.cancel()  # ... in the same iteration as the cancellation
        done, _ = await asyncio.wait((consumer,), timeout=5.0)
        assert done, "the cancelled consumer kept waiting for outputs"
        assert consumer.cancelled()
        await _wait(lambda: rid in engine.aborted)
        assert rid not in aengine._streams

    try:
        for i in range(rounds):
            asyncio.run(scenario(i))
    finally:
        aengine.shutdown(timeout=2.0)
    assert engine.aborted == [f"r{i}" for i in range(rounds)]


def test_outputs_in_order_then_finish():
    engine = IdleEngine()
    aengine = AsyncEngine(engine)
    aengine.start()

    async def scenario():
        async def consume():
            got = []
            async for out in aengine.generate("a", [1], SamplingParams()):
                got.append(out.text)
            return got

        consumer = asyncio.ensure_future(consume())
        await _wait(lambda: "a" in aengine._streams)
        _, stream = aengine._streams["a"]
        for t in "abc":
            stream.put_nowait(RequestOutput("a", text=t))
        stream.put_nowait(RequestOutput("a", text="!", finished=True))
        return await asyncio.wait_for(consumer, 5.0)

    try:
        assert asyncio.run(scenario()) == ["a", "b", "c", "!"]
    finally:
        aengine.shutdown(timeout=2.0)
    assert engine.aborted == []  # a finished request is not aborted
