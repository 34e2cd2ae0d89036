"""FP8 linear for ``--quantize fp8`` on sm89+: W8A8 through cuBLASLt (``torch._scaled_mm``), and
weight-only for one-row inputs.

Weights: float8_e4m3fn ``[N, K]`` with one float32 scale per output channel (``scale_b [1, N]``).
One row (batch-1 decode): the Triton GEMV reads the float8 weights and multiplies by the scale
at the end (``genserve_cuda.kernels.gemv``), activations stay 16-bit: the weight bytes are the
whole cost there, and quantizing the activation would add a launch and error for nothing.
More rows: activations quantized per token on every call (``per_token_fp8``, one Triton
launch, CUDA-graph safe), ``scale_a [M, 1]``. ``_scaled_mm`` with row-wise scales computes
``(q_x * scale_a) @ (q_w * scale_b).T`` in fp32 and writes bf16. Its second operand must be
column-major, which ``weight_fp8.t()`` of the row-major ``[N, K]`` weight is, and cuBLASLt needs
K and N to be multiples of 16. Row-wise scaling takes bf16 output only, so other activation
dtypes go to the reference kernel.
"""

from __future__ import annotations

import torch

from genserve.layers.quantization.fp8_kernels import FP8LinearConfig, FP8LinearKernel


class CudaScaledMMFP8Kernel(FP8LinearKernel):
    name = "cuda_fp8_scaled_mm"

    @classmethod
    def can_implement(cls, config, device):
        if not isinstance(config, FP8LinearConfig):
            return "not an FP8 layer"
        if device.type != "cuda" or not torch.cuda.is_available():
            return "needs a CUDA device"
        if getattr(torch.version, "hip", None) is not None:
            return "ROCm's FP8 type is float8_e4m3fnuz, this kernel stores float8_e4m3fn"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "FP8 tensor cores need compute capability 8.9 or newer"
        if config.act_dtype != torch.bfloat16:
            return f"row-wise scaled FP8 GEMMs write bf16 only, activations are {config.act_dtype}"
        if config.in_features % 16 or config.out_features % 16:
            return (f"cuBLASLt FP8 needs in/out features multiples of 16, layer is "
                    f"{config.in_features}x{config.out_features}")
        return None

    def process_weights(self, layer, qweight, scale):
        layer.register_buffer("weight_fp8", qweight.contiguous())
        layer.register_buffer("weight_scale", scale.float().reshape(1, -1).contiguous())  # [1, N]

    @staticmethod
    def quantizes_activations(rows: int) -> bool:
        """Whether a call with ``rows`` input rows is W8A8 (else weight-only, the GEMV)."""
        return rows != 1

    def apply(self, layer, x, bias):
        from genserve_cuda.kernels.fp8_quant import per_token_fp8
        from genserve_cuda.kernels.gemv import FP8_CONFIG, gemv

        rows = x.reshape(-1, x.shape[-1])
        if not self.quantizes_activations(rows.shape[0]):
            y = gemv(rows, layer.weight_fp8, bias, FP8_CONFIG, scale=layer.weight_scale.view(-1))
            return y.reshape(*x.shape[:-1], -1)
        q, scale_a = per_token_fp8(rows)
        y = torch._scaled_mm(q, layer.weight_fp8.t(), scale_a=scale_a, scale_b=layer.weight_scale,
                             out_dtype=x.dtype)
        y = y.reshape(*x.shape[:-1], -1)
        # Added outside the GEMM: cuBLASLt's FP8 epilogue bias is not offered with row-wise scales.
        return y if bias is None else y + bias
