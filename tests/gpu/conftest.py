"""Device choice for the GPU kernel tests.

On a CUDA machine they run on the GPU. With ``TRITON_INTERPRET=1`` and triton installed they
run on the CPU through Triton's interpreter (slow, small shapes: for kernel development).
Otherwise they are skipped.
"""

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


if INTERPRET and HAS_TRITON:
    # The interpreter keeps scalars as 1-element arrays, and NumPy 2 refuses int() on those,
    # so loops bounded by loaded values (range(lo, hi)) fail there but not on a GPU.
    from triton.runtime import interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def kernel_device() -> str | None:
    if not HAS_TRITON:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if INTERPRET else None


@pytest.fixture
def device():
    dev = kernel_device()
    if dev is None:
        pytest.skip("needs a CUDA device and triton (or TRITON_INTERPRET=1 with triton)")
    return dev


@pytest.fixture
def on_gpu(device):
    return device == "cuda"
