"""Tensor parallelism: the TP state the layers read, and ``--num-shard N`` over N processes.

- ``state``: which rank this process is and the collectives layers call (identity at size 1).
- ``launch``: rank 0 (the server) spawns ranks 1..N-1 and builds its own shard; ``build_engine``
  hands over to it when shards are asked for.
- ``worker``: ranks 1..N-1 build their shard and mirror rank 0's forward and LM-head calls.
- ``channel``: each step's batch sent as tensors (no pickle) over a gloo control group.
- ``runner``: rank 0's runner announces each collective-bearing call before running it.
- ``supervisor``: a dead or stuck worker turns into ``ShardFailure`` errors, never a hang;
  ``runner.dead`` says why for health checks.
- ``groups``: the process groups at 127.0.0.1, timeouts (``GENSERVE_SHARD_TIMEOUT``) and the
  environment defaults (``NCCL_NVLS_ENABLE=0``).
"""
