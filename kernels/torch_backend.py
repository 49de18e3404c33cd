"""Vectorized-torch backend (``torch``). Must equal ``kernels.reference`` bit for bit.

Plain torch ops, so it runs on any device (CPU, and CUDA when Triton is missing); on CPU the
default backend is ``kernels.numba_kernels`` (fused, ~30x faster) and this path is the fallback
when numba is not importable.

Quantization works on row chunks of ~1M elements (cache-friendly), and maps each scaled value to
its E2M1 code with one signed ``torch.bucketize`` over 15 boundaries plus a 16-entry table
instead of the reference's 7 comparisons; ``round_to_nvfp4_grid_torch`` rounds arithmetically
(1 thread, min of 101 on a loaded machine, indicative: [576, 1] 156 us vs the reference's 248;
[576, 128] 0.48 ms vs 1.2 ms; bucketize was slower than the reference from [576, 128] up).
Measured and rejected: ``torch.compile`` of the same math (75 s
first compile, a new compile per shape, no faster than this path on 2 cores). Dequantize,
activation fake-quant, the matmul, the block-scale search and the FP8 ops use the reference
(already vectorized torch).
"""

from __future__ import annotations

import torch

from kernels.formats import (
    FP4_BLOCK_SIZE,
    NVFP4Weight,
    check_block_scale,
    check_weight,
)
from kernels.reference import (
    _resolve_global_scale,
    block_scales_reference,
    dequantize_fp8_reference,
    dequantize_nvfp4_reference,
    fake_quantize_fp8_activation_per_token_reference,
    fake_quantize_fp8_weight_reference,
    fake_quantize_nvfp4_activation_reference,
    grid_inputs,
    nvfp4_w4a16_matmul_reference,
    quantize_fp8_per_channel_reference,
    search_nvfp4_block_scales_reference,
)

__all__ = [
    "dequantize_fp8_torch",
    "dequantize_nvfp4_torch",
    "fake_quantize_fp8_activation_per_token_torch",
    "fake_quantize_fp8_weight_torch",
    "fake_quantize_nvfp4_activation_torch",
    "fake_quantize_nvfp4_weight_torch",
    "nvfp4_w4a16_matmul_torch",
    "quantize_fp8_per_channel_torch",
    "quantize_nvfp4_torch",
    "round_to_nvfp4_grid_torch",
    "search_nvfp4_block_scales_torch",
]

dequantize_nvfp4_torch = dequantize_nvfp4_reference
fake_quantize_nvfp4_activation_torch = fake_quantize_nvfp4_activation_reference
nvfp4_w4a16_matmul_torch = nvfp4_w4a16_matmul_reference
search_nvfp4_block_scales_torch = search_nvfp4_block_scales_reference
quantize_fp8_per_channel_torch = quantize_fp8_per_channel_reference
dequantize_fp8_torch = dequantize_fp8_reference
fake_quantize_fp8_weight_torch = fake_quantize_fp8_weight_reference
fake_quantize_fp8_activation_per_token_torch = fake_quantize_fp8_activation_per_token_reference

CHUNK_ELEMENTS = 1 << 20


def _next(value: float, toward: float) -> float:
    return float(torch.nextafter(torch.tensor(value), torch.tensor(toward)))


# ``bucketize(v, BOUNDARIES)`` counts boundaries strictly below v; bucket -> code via CODE_OF_BUCKET.
# Same decisions as kernels.reference.e2m1_codes_reference (RNE, saturating, sign iff v < 0).
_BOUNDARIES = torch.tensor(
    [_next(-5.0, -9), -3.5, _next(-2.5, -9), -1.75, _next(-1.25, -9), -0.75, _next(-0.25, -9)]
    + [_next(0.0, -1)]  # (-tiny, 0.25] -> code 0, so -0.0 encodes as +0
    + [0.25, _next(0.75, 0), 1.25, _next(1.75, 0), 2.5, _next(3.5, 0), 5.0],
    dtype=torch.float32,
)
_CODE_OF_BUCKET = torch.tensor(
    [15, 14, 13, 12, 11, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.uint8
)


@torch.no_grad()
def quantize_nvfp4_torch(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
) -> NVFP4Weight:
    """Same contract and bytes as ``quantize_nvfp4_reference``; faster on CPU."""
    check_weight(weight, name)
    out_features, in_features = weight.shape
    blocks_per_row = in_features // FP4_BLOCK_SIZE
    if block_scale is not None:
        block_scale = check_block_scale(block_scale, weight, name)
    gs = _resolve_global_scale(weight, global_scale)
    boundaries = _BOUNDARIES.to(weight.device)
    code_of_bucket = _CODE_OF_BUCKET.to(weight.device)
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(
        out_features, blocks_per_row, dtype=torch.float8_e4m3fn, device=weight.device
    )
    chunk_rows = max(1, CHUNK_ELEMENTS // in_features)
    for start in range(0, out_features, chunk_rows):
        rows = slice(start, start + chunk_rows)
        blocks = (
            weight[rows]
            .to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            .reshape(-1, blocks_per_row, FP4_BLOCK_SIZE)
        )
        if block_scale is None:
            chunk_scale, scale_eff = block_scales_reference(blocks.abs().amax(dim=-1), gs)
        else:
            chunk_scale = block_scale[rows]
            scale_eff = chunk_scale.to(torch.float32) / gs
        scale[rows] = chunk_scale
        zero_scale = scale_eff == 0  # [r, nb]
        has_zero = bool(zero_scale.any())
        if has_zero:
            scale_eff = torch.where(zero_scale, torch.ones_like(scale_eff), scale_eff)
        blocks.div_(scale_eff.unsqueeze(-1))  # in place: blocks now holds x / scale_eff
        codes = code_of_bucket[torch.bucketize(blocks, boundaries, out_int32=True)]
        if has_zero:
            codes.masked_fill_(zero_scale.unsqueeze(-1), 0)
        codes = codes.reshape(-1, in_features)  # [r, K]
        packed[rows] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return NVFP4Weight(packed, scale, gs)


@torch.no_grad()
def fake_quantize_nvfp4_weight_torch(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype and shape."""
    packed = quantize_nvfp4_torch(weight, global_scale, name=name, block_scale=block_scale)
    return dequantize_nvfp4_reference(*packed, dtype=weight.dtype)


@torch.no_grad()
def round_to_nvfp4_grid_torch(values: torch.Tensor, scale_eff: torch.Tensor) -> torch.Tensor:
    """Same contract and bits as ``round_to_nvfp4_grid_reference`` in a few cheap elementwise
    ops (GPTQ calls it once per column): the E2M1 grid has step 0.5 below 2, 1 in [2, 4) and 2
    above, taken from the float32 exponent bits, so ``round(m / step) * step`` (``torch.round``:
    ties to even, which is the even code here) clamped at 6 is the codec's magnitude; exact, as
    the steps are powers of two. No comparisons or ``torch.where`` on the full slice (each
    costs 3-20x an arithmetic op on CPU)."""
    scaled, scale_eff, zero = grid_inputs(values, scale_eff)
    # zero scale -> +0 (codes 0); -0.0 -> +0 (the sign bit is set only for values < 0)
    scaled = scaled * (~zero).to(torch.float32) + 0.0
    magnitude = scaled.abs()
    exponent = magnitude.view(torch.int32) >> 23
    step = ((exponent - 1).clamp(126, 128) << 23).view(torch.float32)  # 0.5, 1 or 2
    magnitude = torch.clamp(torch.round(magnitude / step) * step, max=6.0)
    return torch.copysign(magnitude, scaled) * scale_eff
