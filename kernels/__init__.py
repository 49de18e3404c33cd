"""NVFP4 and FP8 numerics: E2M1 codes, FP8 block scales, torch reference codec, Triton and
numba kernels, MSE block-scale search, FP8 (W8A8) tier.

Public contract (other packages import only these names)::

    from kernels import quantize_nvfp4, dequantize_nvfp4, NVFP4Weight, ...
"""

from kernels.dispatch import (
    BACKEND_ENV_VAR,
    KernelBackend,
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_fp8_activation_per_token,
    fake_quantize_fp8_weight,
    fake_quantize_nvfp4_activation,
    fake_quantize_nvfp4_weight,
    global_scale_from_amax,
    numba_available,
    nvfp4_w4a16_matmul,
    quantize_fp8_per_channel,
    quantize_nvfp4,
    resolve_backend,
    round_to_nvfp4_grid,
    search_nvfp4_block_scales,
    triton_available,
)
from kernels.formats import (
    DEFAULT_SCALE_CANDIDATES,
    E2M1_VALUES,
    FOUR_OVER_SIX,
    FP4_BLOCK_SIZE,
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    FP8Weight,
    NonFiniteWeightError,
    NVFP4Error,
    NVFP4ShapeError,
    NVFP4Weight,
    ScaleCandidates,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "DEFAULT_SCALE_CANDIDATES",
    "E2M1_VALUES",
    "FOUR_OVER_SIX",
    "FP4_BLOCK_SIZE",
    "FP4_E2M1_MAX",
    "FP8_E4M3_MAX",
    "FP8Weight",
    "KernelBackend",
    "NVFP4Error",
    "NVFP4ShapeError",
    "NVFP4Weight",
    "NonFiniteWeightError",
    "ScaleCandidates",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "fake_quantize_fp8_activation_per_token",
    "fake_quantize_fp8_weight",
    "fake_quantize_nvfp4_activation",
    "fake_quantize_nvfp4_weight",
    "global_scale_from_amax",
    "numba_available",
    "nvfp4_w4a16_matmul",
    "quantize_fp8_per_channel",
    "quantize_nvfp4",
    "resolve_backend",
    "round_to_nvfp4_grid",
    "search_nvfp4_block_scales",
    "triton_available",
]
