"""The cuda and rocm backend plugins on a CPU machine: registration, selection, lazy imports.

Needs ``pip install -e backends/cuda -e backends/rocm --no-deps``.
"""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("genserve_cuda")
pytest.importorskip("genserve_rocm")

from genserve.attention.base import AttentionSpec  # noqa: E402
from genserve.backends.options import BackendOptions  # noqa: E402
from genserve.backends.select import BackendError, select_backend  # noqa: E402
from genserve.layers.custom_op import LayerOps  # noqa: E402
from genserve.plugins import load_plugins  # noqa: E402
from genserve_cuda.attention.flash_attn import FlashAttnPaged  # noqa: E402
from genserve_cuda.attention.triton_paged import TritonPagedAttention  # noqa: E402
from genserve_cuda.backend import CudaBackend  # noqa: E402
from genserve_cuda.layer_ops import CudaLayerOps  # noqa: E402
from genserve_cuda.quant.triton_w4a16 import TritonW4A16Kernel  # noqa: E402
from genserve_rocm.backend import RocmBackend  # noqa: E402

SPEC = AttentionSpec(num_heads=8, head_dim=64, num_kv_heads=2, scale=0.125)


@pytest.fixture
def plugins():
    return load_plugins()


def fake_gpu(monkeypatch, present: bool, hip: str | None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    monkeypatch.setattr(torch.version, "hip", hip)


def test_entry_points_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="genserve")}
    assert eps.get("cuda") == "genserve_cuda.plugin"
    assert eps.get("rocm") == "genserve_rocm.plugin"


def test_plugins_register_backends_and_attention(plugins):
    assert plugins.backends.get("cuda") is CudaBackend
    assert plugins.backends.get("rocm") is RocmBackend
    assert plugins.attention.get("triton") is TritonPagedAttention
    assert plugins.attention.get("flash_attn") is FlashAttnPaged
    assert plugins.linear_kernels.get("triton_w4a16") is TritonW4A16Kernel
    assert CudaBackend.linear_kernel_preference == ("triton_w4a16", "torch_wna16", "cuda_fp8_scaled_mm")
    assert CudaBackend(BackendOptions(custom_kernels=False)).linear_kernel_preference == ("torch_wna16",)
    assert plugins.backends.owner("cuda") == "cuda" and plugins.backends.owner("rocm") == "rocm"
    assert not plugins.failed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_not_available_on_this_cpu_machine(plugins):
    assert not CudaBackend.is_available()
    assert not RocmBackend.is_available()
    assert select_backend(plugins, "auto").name == "cpu"


@pytest.mark.parametrize("name", ["cuda", "rocm"])
def test_selecting_an_unavailable_gpu_backend_says_why(plugins, monkeypatch, name):
    fake_gpu(monkeypatch, present=False, hip=None)
    with pytest.raises(BackendError) as err:
        select_backend(plugins, name)
    msg = str(err.value)
    assert f"backend {name!r}" in msg and "installed backends:" in msg
    assert "ROCm build" in msg if name == "rocm" else ("CUDA" in msg)


def test_cuda_on_a_rocm_build_points_to_rocm(plugins, monkeypatch):
    fake_gpu(monkeypatch, present=True, hip="6.2")
    with pytest.raises(BackendError, match="use --backend rocm"):
        select_backend(plugins, "cuda")


@pytest.mark.parametrize("hip,expected", [(None, "cuda"), ("6.2", "rocm")])
def test_auto_picks_the_gpu_stack_of_the_torch_build(plugins, monkeypatch, hip, expected):
    fake_gpu(monkeypatch, present=True, hip=hip)
    assert select_backend(plugins, "auto").name == expected


def test_cuda_backend_options(monkeypatch):
    b = CudaBackend()
    assert b.default_dtype == torch.bfloat16 and b.distributed_backend == "nccl" and b.graph_sizes()
    assert b.attention_preference == ("flash_attn", "triton", "torch")
    assert b.device == torch.device("cuda", 0)
    assert b.graph_sizes() == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert CudaBackend(BackendOptions(graph_sizes=None)).graph_sizes() == b.graph_sizes()  # flag not given
    assert CudaBackend(BackendOptions(graph_sizes="0")).graph_sizes() == ()
    assert CudaBackend(BackendOptions(graph_sizes=0)).graph_sizes() == ()
    assert CudaBackend(BackendOptions(graph_sizes=[])).graph_sizes() == ()
    assert CudaBackend(BackendOptions(graph_sizes="4,1,4")).graph_sizes() == (1, 4)
    off = CudaBackend(BackendOptions(custom_kernels=False))
    assert off.attention_preference == ("torch",)
    assert CudaBackend.attention_preference[0] == "flash_attn"  # the class is untouched
    assert type(off.layer_ops()) is LayerOps  # the PyTorch reference layers
    assert isinstance(b.layer_ops(), CudaLayerOps)


def test_cuda_memory_budget(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    # 5% of 80 GiB = 4 GiB reserved for activations.
    assert CudaBackend().memory_budget() == 56 * gib
    assert CudaBackend(BackendOptions(memory_fraction=0.5)).memory_budget() == 26 * gib
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib // 2, 8 * gib))
    assert CudaBackend().memory_budget() == 0


def test_rocm_backend_defaults():
    b = RocmBackend()
    assert b.attention_preference == ("triton", "torch")
    assert b.graph_sizes() == ()  # untested on HIP: opt-in only
    assert RocmBackend(BackendOptions(graph_sizes=None)).graph_sizes() == ()
    assert RocmBackend(BackendOptions(graph_sizes=[1, 2])).graph_sizes() == (1, 2)


def test_kernels_say_why_they_cannot_run_here():
    cpu = torch.device("cpu")
    assert "CUDA" in TritonPagedAttention.supports(SPEC, torch.bfloat16, cpu) or \
        "triton is not installed" in TritonPagedAttention.supports(SPEC, torch.bfloat16, cpu)
    assert FlashAttnPaged.supports(SPEC, torch.bfloat16, cpu) is not None


def test_packages_import_without_triton_or_gpu():
    """Block triton and flash_attn outright; the plugins must still load and register."""
    code = """
import sys
sys.modules["triton"] = None; sys.modules["flash_attn"] = None  # import of either now fails
import genserve_cuda._triton as t
t.triton_importable.cache_clear()
from genserve.plugins import load_plugins
p = load_plugins()
assert not p.failed(), [i.error for i in p.failed()]
assert "cuda" in p.backends and "rocm" in p.backends and "triton" in p.attention
import torch
from genserve.attention.base import AttentionSpec
reason = p.attention.get("triton").supports(AttentionSpec(8, 64, 2, 0.125), torch.bfloat16,
                                            torch.device("cuda"))
assert reason == "triton is not installed", reason
from genserve.layers.quantization.kernels import WNA16Config
cfg = WNA16Config(4, 128, False, False, 4096, 4096, torch.bfloat16)
assert p.linear_kernels.get("triton_w4a16").can_implement(cfg, torch.device("cuda")) == "triton is not installed"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_loading_the_plugins_imports_no_kernel_module():
    code = """
import sys
from genserve.plugins import load_plugins
load_plugins()
heavy = [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "flash_attn",
         "genserve_cuda.kernels", "genserve_cuda.graphs", "genserve_cuda.layer_ops"))]
print(heavy)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_layers_bind_the_backend_implementation_at_construction():
    """Built under the CUDA backend's layer ops, layers bind the fused implementations then;
    built outside any, the same classes run the PyTorch reference. Nothing is patched later."""
    from genserve.layers.custom_op import use_layer_ops
    from genserve.layers.norm import RMSNorm

    with use_layer_ops(CudaBackend().layer_ops()):
        fused = RMSNorm(8)
    plain = RMSNorm(8)
    assert fused.impl_name == "cuda" and plain.impl_name == "native"
    assert "forward" not in vars(fused) and "forward" not in vars(plain)


def test_cuda_layer_ops_keep_cpu_maths(monkeypatch):
    """The fused implementations fall back to the core's PyTorch code for CPU tensors, bit for bit."""
    from genserve.layers.activation import GatedActivation
    from genserve.layers.custom_op import use_layer_ops
    from genserve.layers.norm import RMSNorm
    from genserve_cuda.layer_ops import DispatchedLinear

    from genserve.layers.linear import ColumnParallelLinear

    def build():
        return torch.nn.ModuleDict({"norm": RMSNorm(32), "act": GatedActivation("silu"),
                                    "proj": ColumnParallelLinear(32, 16, bias=True, dtype=torch.float32)})

    ref_model = build()
    ops = CudaLayerOps()
    with use_layer_ops(ops):
        model = build()
    for p in ref_model["proj"].parameters():
        p.data.normal_()
    model.load_state_dict(ref_model.state_dict())
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    ref = (ref_model["norm"](x, r), ref_model["act"](x), ref_model["proj"](x[:1]))
    assert [m.impl_name for m in (model["norm"], model["act"])] == ["cuda", "cuda"]
    assert isinstance(model["proj"].quant, DispatchedLinear) and ops.gemv.layers == [model["proj"]]
    out = (model["norm"](x, r), model["act"](x), model["proj"](x[:1]))
    assert torch.equal(out[0][0], ref[0][0]) and torch.equal(out[0][1], ref[0][1])
    assert torch.equal(out[1], ref[1])
    assert torch.equal(out[2], ref[2])  # untuned (and fp32): a one-row input stays on F.linear
