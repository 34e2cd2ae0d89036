"""Typed backend options: every option a backend reads has a flag, and the flags reach it."""

import dataclasses

import pytest

from genserve.args import defaults
from genserve.backends.cpu import CpuBackend
from genserve.backends.options import BackendOptions, parse_sizes
from genserve.cli import build_parser
from genserve.executor.sharded import plain_flags


def test_shared_options_come_from_tgis_flags():
    opts = BackendOptions.from_args(defaults(cuda_memory_fraction=0.5, cuda_graphs="8,1,8",
                                             disable_custom_kernels=True))
    assert opts == BackendOptions(memory_fraction=0.5, graph_sizes=(1, 8), custom_kernels=False)
    assert BackendOptions.from_args(defaults()).graph_sizes is None  # not given: the backend's default
    assert BackendOptions.from_args(defaults(cuda_graphs="0")).graph_sizes == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.memory_fraction = 1.0
    assert [parse_sizes(x) for x in (None, "", 0, "4,2", [2, 0, 2], 3)] == [None, (), (), (2, 4), (2,), (3,)]
    # --cuda-graphs is checked as it is parsed; 0 disables graphs.
    assert BackendOptions.from_args(build_parser().parse_args(["serve", "--cuda-graphs", "0"])).graph_sizes == ()
    with pytest.raises(SystemExit):  # argparse's error: "invalid size_list value: '1,x'"
        build_parser().parse_args(["serve", "--cuda-graphs", "1,x"])


def test_disable_custom_kernels_is_handled_by_the_base_class():
    off = CpuBackend(BackendOptions(custom_kernels=False))
    assert off.attention_preference == ("torch",)
    assert CpuBackend().attention_preference == CpuBackend.attention_preference == ("torch", "reference")


def test_backend_flags_are_real_flags_with_env_vars(monkeypatch):
    pytest.importorskip("genserve_neuron")
    pytest.importorskip("genserve_ipex")
    from genserve_ipex.backend import IpexBackend, IpexOptions
    from genserve_neuron.backend import NeuronBackend
    from genserve_neuron.options import NeuronOptions

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--neuron-hbm-bytes", "--neuron-decode-batch", "--neuron-prefill-batch",
                 "--neuron-prefill-len", "--neuron-context-len", "--ipex-device", "NEURON_HBM_BYTES"):
        assert flag in help_text, flag
    args = build_parser().parse_args(["serve", "--neuron-hbm-bytes", "1024", "--neuron-decode-batch", "4,1",
                                      "--ipex-device", "cpu", "--cuda-graphs", "2"])
    assert NeuronOptions.from_args(args) == NeuronOptions(graph_sizes=(2,), hbm_bytes=1024, decode_batch=(1, 4))
    assert IpexOptions.from_args(args).device == "cpu"
    assert NeuronBackend(NeuronOptions.from_args(args)).options.hbm_bytes == 1024
    # A namespace built without the backend's flags (``defaults()``) reads their env vars.
    monkeypatch.setenv("NEURON_PREFILL_LEN", "8,32")
    assert NeuronOptions.from_args(defaults()).prefill_len == (8, 32)
    assert NeuronOptions.from_args(defaults()).decode_batch == ()  # empty: derived from the limits
    # Shard workers rebuild their flags from plain values: the backend's own go with them.
    flags = plain_flags(args, NeuronBackend)
    assert flags["neuron_hbm_bytes"] == 1024 and flags["neuron_decode_batch"] == "1,4"
    assert plain_flags(defaults(), NeuronBackend)["neuron_prefill_len"] == "8,32"
    assert "ipex_device" not in plain_flags(args, NeuronBackend)
    with pytest.raises(TypeError, match="backend 'ipex' takes IpexOptions, not BackendOptions"):
        IpexBackend(BackendOptions())
    with pytest.raises(SystemExit):  # argparse's error: "invalid size_list value: '4,x'"
        build_parser().parse_args(["serve", "--neuron-decode-batch", "4,x"])


def test_backend_flags_are_documented():
    from pathlib import Path

    from genserve.backends.options import all_backend_flags
    from genserve.plugins import load_plugins

    backends = load_plugins().backends
    text = (Path(__file__).parents[2] / "docs" / "flags.md").read_text()
    missing = [f.name for f in all_backend_flags(backends.get(n) for n in backends) if f"`{f.name}`" not in text]
    assert not missing, f"docs/flags.md lacks {missing}"
