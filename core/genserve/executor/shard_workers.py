"""Rank 0's view of ranks 1..N-1: announce each collective-bearing call, supervise, stop.

Only the forward pass and the LM head make collectives, so only those are mirrored; preparing
inputs, sampling, penalties and grammar masks stay on rank 0, which samples from its
all-gathered logits. ``ShardWorkers`` is the ``Peers`` rank 0's runner receives in its
constructor, whatever the backend's runner class (CUDA graphs, say, keep their ``execute``):
the runner calls ``forward``/``logits`` around each such call, so nothing is patched in.
"""

from __future__ import annotations

import atexit
from contextlib import contextmanager

from genserve.distributed.channel import Channel
from genserve.distributed.groups import destroy_groups
from genserve.distributed.supervisor import Supervisor
from genserve.engine.model_runner import FinishedStep, LaunchedStep
from genserve.engine.peers import Peers
from genserve.errors import ShardFailure


class ShardWorkers(Peers):
    """The worker processes of a sharded engine, as rank 0's runner's ``peers``.

    Rank 0 builds its shard while the workers build theirs: every collective of the build
    (KV-cache agreement, warm-up, graph capture) is made by all ranks on their own, so nothing
    is announced until ``serve`` hands over the channel the workers then listen on.
    """

    # The supervisor must vouch for a step after it ran, so steps don't overlap (yet).
    allows_overlap = False

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.channel: Channel | None = None  # set by ``serve``: the workers wait on it
        self._closed = False

    def serve(self, channel: Channel) -> None:
        """From now on announce every call on ``channel`` (the workers have built their shards)."""
        self.channel = channel

    @property
    def dead(self) -> str | None:
        """Why the tensor-parallel engine cannot run (None while healthy): for health checks."""
        return self.supervisor.dead

    @contextmanager
    def _collective(self, what: str):
        """Run a call all ranks take part in, timed by the supervisor; a failure is fatal."""
        self.supervisor.check()
        try:
            with self.supervisor.busy():
                yield
        except ShardFailure:
            raise
        except Exception as exc:
            # The ranks may now wait on different collectives: nothing can be trusted again.
            raise self.supervisor.fail_from(what, exc) from exc

    @contextmanager
    def forward(self, input_ids, positions, batch):
        if self.channel is None:  # building: the workers run their own build's forwards
            yield
            return
        with self._collective("forward"):
            self.channel.send_forward(input_ids, positions, batch.attn, batch.lora)
            yield

    @contextmanager
    def logits(self, hidden):
        if self.channel is None:
            yield
            return
        with self._collective("lm head"):
            self.channel.send_logits(hidden)
            yield

    def finish(self, step: LaunchedStep) -> LaunchedStep:
        results = step.results()
        # Under NCCL an abort lets a cut-short collective return garbage: never hand it out.
        self.supervisor.check()
        return FinishedStep(step.scheduled, results)

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop the workers and leave the process groups (stop the engine thread first)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)  # and let the engine be collected

        def tell() -> None:
            if self.channel is not None:
                self.channel.send_stop()
            # Leave the groups now, while the workers leave theirs, not after they exited:
            # tearing a communicator down waits for every rank under NCCL (torch's
            # destroy_process_group notes ncclCommAbort was a collective call in some NCCL
            # versions). Rank 0 used to leave only after the workers had exited, which blocked
            # for good and ended the process with "terminate called without an active
            # exception" (2 H200s, docs/benchmarks.md).
            destroy_groups()

        self.supervisor.stop(tell, grace)
        destroy_groups()  # after a failure (nothing was told): the groups are aborted by now
