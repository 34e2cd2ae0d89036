"""Tensor parallelism's plumbing: the TP state the layers read and the process groups.

- ``state``: which rank this process is and the collectives layers call (identity at size 1).
- ``channel``: each step's batch sent as tensors (no pickle) over a gloo control group.
- ``supervisor``: a dead or stuck worker turns into ``ShardFailure`` errors, never a hang;
  ``dead`` says why for health checks.
- ``groups``: the process groups (at node 0's store), timeouts (``GENSERVE_SHARD_TIMEOUT``) and
  the environment defaults (``NCCL_NVLS_ENABLE=0``).
- ``heartbeat``: other machines' liveness through the store (``GENSERVE_NODE_TIMEOUT``).

Spawning the ranks and building them is the executor's (``genserve.executor``): this package
imports nothing above the engine.
"""
