"""NVFP4 numerics: E2M1 codes, FP8 block scales, torch reference codec, Triton and numba kernels.

Public contract (other packages import only these names)::

    from kernels import quantize_nvfp4, dequantize_nvfp4, NVFP4Weight, ...
"""

from kernels.dispatch import (
    BACKEND_ENV_VAR,
    KernelBackend,
    dequantize_nvfp4,
    fake_quantize_nvfp4_activation,
    fake_quantize_nvfp4_weight,
    global_scale_from_amax,
    numba_available,
    nvfp4_w4a16_matmul,
    quantize_nvfp4,
    resolve_backend,
    triton_available,
)
from kernels.formats import (
    E2M1_VALUES,
    FP4_BLOCK_SIZE,
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    NonFiniteWeightError,
    NVFP4Error,
    NVFP4ShapeError,
    NVFP4Weight,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "E2M1_VALUES",
    "FP4_BLOCK_SIZE",
    "FP4_E2M1_MAX",
    "FP8_E4M3_MAX",
    "KernelBackend",
    "NVFP4Error",
    "NVFP4ShapeError",
    "NVFP4Weight",
    "NonFiniteWeightError",
    "dequantize_nvfp4",
    "fake_quantize_nvfp4_activation",
    "fake_quantize_nvfp4_weight",
    "global_scale_from_amax",
    "numba_available",
    "nvfp4_w4a16_matmul",
    "quantize_nvfp4",
    "resolve_backend",
    "triton_available",
]
