"""Rank 0's model runner: announce each collective-bearing call to the workers, then run it.

Only the forward pass and the LM head make collectives, so only those are mirrored; preparing
inputs, sampling, penalties and grammar masks stay on rank 0, which samples from its
all-gathered logits. The backend's own runner (CUDA graphs, say) keeps its ``execute``:
``make_sharded`` slots ``ShardedModelRunner`` in front of the backend's class.
"""

from __future__ import annotations

import atexit
from contextlib import contextmanager

import torch

from genserve.distributed.channel import Channel
from genserve.distributed.groups import destroy_groups
from genserve.distributed.supervisor import ShardFailure, Supervisor
from genserve.engine.model_runner import FinishedStep, ModelRunner


class ShardedModelRunner(ModelRunner):
    channel: Channel
    supervisor: Supervisor

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

    def execute(self, input_ids, positions, batch):
        with self._collective("forward"):
            self.channel.send_forward(input_ids, positions, batch.attn, batch.lora)
            return super().execute(input_ids, positions, batch)

    def _compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._collective("lm head"):
            self.channel.send_logits(hidden)
            return self._local_logits(hidden)

    # The supervisor must vouch for a step after it ran, so steps don't overlap (yet).
    overlap_steps = False

    def launch(self, scheduled):
        self.supervisor.check()
        results = super().launch(scheduled).results()
        # Under NCCL an abort lets a cut-short collective return garbage: never hand it out.
        self.supervisor.check()
        return FinishedStep(scheduled, results)

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop the workers and leave the process groups (stop the engine thread first)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        atexit.unregister(self.shutdown)  # and let the engine be collected
        self.supervisor.stop(self.channel.send_stop, grace)
        destroy_groups()


def make_sharded(runner: ModelRunner, channel: Channel, supervisor: Supervisor) -> ShardedModelRunner:
    """Turn rank 0's runner (of whatever backend class) into a sharded one, in place."""
    base = type(runner)
    if not issubclass(base, ShardedModelRunner):
        runner.__class__ = type(f"Sharded{base.__name__}", (ShardedModelRunner, base), {})
    runner.channel, runner.supervisor = channel, supervisor
    # Every LM-head call, from the sampler path or a prompt-logprobs path, is announced.
    runner._local_logits = runner.model.compute_logits
    runner.model.compute_logits = runner._compute_logits
    return runner
