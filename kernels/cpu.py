"""Fast CPU path (vectorized torch). Must equal ``kernels.reference`` bit for bit."""

from __future__ import annotations

from kernels.reference import (
    dequantize_nvfp4_reference as dequantize_nvfp4_cpu,
)
from kernels.reference import (
    fake_quantize_nvfp4_activation_reference as fake_quantize_nvfp4_activation_cpu,
)
from kernels.reference import (
    fake_quantize_nvfp4_weight_reference as fake_quantize_nvfp4_weight_cpu,
)
from kernels.reference import (
    nvfp4_w4a16_matmul_reference as nvfp4_w4a16_matmul_cpu,
)
from kernels.reference import (
    quantize_nvfp4_reference as quantize_nvfp4_cpu,
)

__all__ = [
    "dequantize_nvfp4_cpu",
    "fake_quantize_nvfp4_activation_cpu",
    "fake_quantize_nvfp4_weight_cpu",
    "nvfp4_w4a16_matmul_cpu",
    "quantize_nvfp4_cpu",
]
