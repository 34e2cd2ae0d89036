"""Each layer gets the first attention implementation, in the backend's order, that serves it."""

import pytest
import torch

from genserve.attention.base import AttentionSpec
from genserve.attention.torch_ref import TorchAttention, TorchReferenceAttention
from genserve.models.base import ModelContext


class NoSoftcap(TorchAttention):
    name = "no-softcap"

    @classmethod
    def supports(cls, spec, dtype, device):
        return "no softcap" if spec.logit_softcap is not None else None


def ctx(fallbacks):
    return ModelContext(dtype=torch.float32, device=torch.device("cpu"), attention_cls=NoSoftcap,
                        attention_fallbacks=fallbacks)


def test_layers_fall_back_only_when_the_first_choice_refuses():
    plain = AttentionSpec(4, 16, 2, 0.25)
    capped = AttentionSpec(4, 16, 2, 0.25, logit_softcap=50.0)
    c = ctx((TorchReferenceAttention,))
    assert type(c.attention_for(plain)) is NoSoftcap
    assert type(c.attention_for(capped)) is TorchReferenceAttention


def test_no_implementation_gives_the_reasons():
    with pytest.raises(ValueError, match="no-softcap: no softcap"):
        ctx(()).attention_for(AttentionSpec(4, 16, 2, 0.25, logit_softcap=50.0))
