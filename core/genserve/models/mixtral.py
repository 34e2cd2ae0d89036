"""Mixtral: the Llama decoder with a sparse mixture-of-experts MLP (``layers/moe.py``)."""

from __future__ import annotations

from genserve.layers.moe import FusedMoE
from genserve.models.base import ModelContext
from genserve.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.stacked_params = LlamaForCausalLM.stacked_params + FusedMoE.checkpoint_mapping(
            config.num_local_experts)

    def make_mlp(self, config, layer_idx, ctx):
        return FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                        config.intermediate_size, activation=config.hidden_act, dtype=ctx.dtype,
                        quant_config=ctx.quant, prefix=f"model.layers.{layer_idx}.block_sparse_moe")

    def rename_weight(self, name):
        # Checkpoints call the MoE block "block_sparse_moe"; it sits where Llama's MLP does.
        return super().rename_weight(name).replace(".block_sparse_moe.", ".mlp.")


ARCHITECTURES = {"mixtral": MixtralForCausalLM}
