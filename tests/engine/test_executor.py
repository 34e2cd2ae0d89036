"""The composition root decides single-process or sharded; build_engine builds one rank."""

import pytest

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.engine.peers import Peers
from genserve.errors import ConfigError
from genserve.executor import ShardedExecutor, UniProcExecutor, get_executor_class


def test_executor_class_follows_the_shard_flags():
    assert get_executor_class(defaults()) is UniProcExecutor
    assert get_executor_class(defaults(num_shard=1)) is UniProcExecutor
    assert get_executor_class(defaults(num_shard=2)) is ShardedExecutor
    assert get_executor_class(defaults(sharded=True)) is ShardedExecutor


def test_build_engine_refuses_to_shard_itself():
    with pytest.raises(ConfigError, match="build_engine builds one rank; .* genserve.executor.create_engine"):
        build_engine(defaults(num_shard=2, backend="cpu"))


def test_single_rank_peers_change_nothing():
    peers = Peers()
    assert peers.allows_overlap
    with peers.forward(None, None, None), peers.logits(None):
        pass
    step = object()
    assert peers.finish(step) is step
    peers.shutdown()
