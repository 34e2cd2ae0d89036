"""Where the ranks of one sharded engine run: one host, several nodes, or torchrun's processes.

The flags are torchrun's (and their environment variables): ``--nnodes`` (NNODES),
``--node-rank`` (NODE_RANK), ``--master-addr`` (MASTER_ADDR), ``--master-port`` (MASTER_PORT).
``--num-shard`` keeps TGI's meaning, the tensor-parallel degree: the total number of ranks,
split evenly over the nodes (``--num-shard 16 --nnodes 2``: 8 per node). ``--sharded`` shards
over every device of every node; neither flag gives one rank per node.

Started by torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment), each process is one
rank and spawns nothing: WORLD_SIZE is the degree (a --num-shard that disagrees is refused).

Rank 0 serves HTTP; every other process only runs shards (docs/distributed.md).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from genserve.errors import ConfigError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Topology:
    """The ranks of one engine, as this process sees them. All fields are plain values.

    ``world_size``: ranks in all; ``nnodes``/``node_rank``: machines and this one's index;
    ``ranks_per_node``: ranks each node runs; ``master_addr``/``master_port``: node 0's
    rendezvous store (port 0: one host, the store picks a free port); ``rank``: the rank this
    process holds (the first of its node for a node of spawned workers, whose own process
    holds none unless it is node 0); ``torchrun``: one rank per process, started by torchrun.
    """

    world_size: int
    nnodes: int = 1
    node_rank: int = 0
    ranks_per_node: int = 1
    master_addr: str = LOOPBACK
    master_port: int = 0
    rank: int = 0
    torchrun: bool = False

    @property
    def local_ranks(self) -> range:
        """The global ranks this node runs."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)

    @property
    def serves_http(self) -> bool:
        """Whether this process is rank 0's: the scheduler and the HTTP server."""
        return self.rank == 0

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1 or self.torchrun

    @property
    def remote_members(self) -> list[str]:
        """Who rank 0 watches through heartbeats: every other node, or every other torchrun rank."""
        if self.torchrun:
            return [f"rank {r}" for r in range(1, self.world_size)]
        return [f"node {n}" for n in range(1, self.nnodes)]

    def describe(self) -> str:
        ranks = self.local_ranks
        return (f"node {self.node_rank} of {self.nnodes}, ranks {ranks.start}..{ranks.stop - 1} of "
                f"{self.world_size}, rendezvous at {self.master_addr}:{self.master_port}")


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` names this host only (then the sockets may stay on ``lo``)."""
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def launched_by_torchrun() -> bool:
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _torchrun_topology(args) -> Topology:
    env = os.environ
    world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    if args.num_shard is not None and args.num_shard != world:
        raise ConfigError(f"--num-shard {args.num_shard} disagrees with torchrun's WORLD_SIZE {world}")
    return Topology(world_size=world, nnodes=max(1, world // per_node),
                    node_rank=int(env.get("GROUP_RANK", rank // per_node)), ranks_per_node=per_node,
                    master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]), rank=rank,
                    torchrun=True)


def device_count(backend_cls) -> int | None:
    """Devices the backend sees; None where ranks are processes, not devices (CPU)."""
    return backend_cls.device_count()


def shard_count(args, backend_cls) -> int:
    devices = device_count(backend_cls)
    n = args.num_shard if args.num_shard is not None else devices  # --sharded: every device
    if n is None:
        raise ConfigError(f"--sharded cannot count the devices of backend {backend_cls.name!r}; "
                          "give --num-shard")
    if n < 1 or (args.sharded and n == 1):
        raise ConfigError(f"--sharded needs at least 2 shards, got {n}")
    if devices is not None and n > devices:
        raise ConfigError(f"--num-shard {n} needs {n} devices; backend {backend_cls.name!r} sees {devices}")
    return n


def resolve_topology(args, backend_cls) -> Topology:
    """The topology the flags (``args``) and the environment ask for, on ``backend_cls``'s devices.

    Raises ``ConfigError`` when they do not fit: --node-rank out of range, no --master-addr for
    several nodes, a --num-shard that does not split evenly, more ranks per node than devices.
    """
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return _torchrun_topology(args)
    nnodes, node_rank = int(args.nnodes or 1), int(args.node_rank or 0)
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is not in 0..{nnodes - 1} (--nnodes {nnodes})")
    if nnodes == 1:
        world = shard_count(args, backend_cls)
        return Topology(world_size=world, ranks_per_node=world)
    if not args.master_addr:
        raise ConfigError("--nnodes > 1 needs --master-addr (MASTER_ADDR): the address of node 0")
    devices = device_count(backend_cls)
    if args.num_shard is not None:
        if args.num_shard < nnodes or args.num_shard % nnodes:
            raise ConfigError(f"--num-shard {args.num_shard} (the total) does not split evenly over "
                              f"--nnodes {nnodes}")
        per_node = args.num_shard // nnodes
    elif args.sharded:
        if devices is None:
            raise ConfigError(f"--sharded cannot count the devices of backend {backend_cls.name!r}; "
                              "give --num-shard (the total over all nodes)")
        per_node = devices
    else:
        per_node = 1
    if devices is not None and per_node > devices:
        raise ConfigError(f"{per_node} ranks per node need {per_node} devices; backend "
                          f"{backend_cls.name!r} sees {devices}")
    return Topology(world_size=per_node * nnodes, nnodes=nnodes, node_rank=node_rank,
                    ranks_per_node=per_node, master_addr=args.master_addr, master_port=int(args.master_port),
                    rank=node_rank * per_node)
