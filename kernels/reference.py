"""Pure-torch NVFP4 codec: the specification every other path must equal bit for bit.

Arithmetic order (chosen to equal compressed-tensors 0.20's ``calculate_qparams`` + ``_quantize``
on every code and scale byte when given the same global scale ``gs``), all in float32:

1. ``amax_block = max |x|`` over each block of 16 along K.
2. ``block_scale = fp8_e4m3fn(min(gs * (amax_block / 6), 448))`` (torch cast: RNE, subnormals kept).
3. ``scale_eff = float32(block_scale) / gs``.
4. ``code = e2m1_rne_saturating(x / scale_eff)``; sign bit set iff ``x / scale_eff < 0``, so
   -0.0 encodes as +0 (code 0) and a small negative that rounds to zero as code 8 (-0), like
   compressed-tensors.
5. decode: ``E2M1[code] * scale_eff`` in float32, then cast to the requested dtype.

Decided edge cases: a block whose scale is 0 (all-zero block, or amax so small relative to the
tensor's amax that the FP8 scale underflows) stores scale byte 0 and codes 0 and decodes to
exactly 0, never NaN (compressed-tensors would store its eps 0.125 there; both decode to 0).
Values beyond ±6 after scaling saturate to ±6. NaN/Inf in a weight raise NonFiniteWeightError.
"""

from __future__ import annotations

import torch

from kernels.formats import (
    E2M1_RNE_THRESHOLDS,
    E2M1_SIGNED_VALUES,
    FP4_BLOCK_SIZE,
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    NVFP4ShapeError,
    NVFP4Weight,
    as_global_scale,
    check_block_dim,
    check_packed,
    check_weight,
    global_scale_from_amax,
)


def block_scales_reference(
    amax_block: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 block scales and the effective fp32 scale ``fp32(block_scale) / gs``.

    ``amax_block`` float32 (any shape), ``global_scale`` float32 [1]. Returns
    ``(block_scale float8_e4m3fn, scale_eff float32)`` of ``amax_block``'s shape.
    """
    scale_f32 = global_scale * (amax_block / FP4_E2M1_MAX)
    block_scale = torch.clamp(scale_f32, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scale_eff = block_scale.to(torch.float32) / global_scale
    return block_scale, scale_eff


def e2m1_codes_reference(scaled: torch.Tensor) -> torch.Tensor:
    """Round float32 values to E2M1 codes (RNE, saturating at ±6); uint8, same shape."""
    magnitude = scaled.abs()
    low, mid_up_1, mid_2, mid_up_3, mid_4, mid_up_5, high = E2M1_RNE_THRESHOLDS
    index = (
        (magnitude > low).to(torch.uint8)
        + (magnitude >= mid_up_1).to(torch.uint8)
        + (magnitude > mid_2).to(torch.uint8)
        + (magnitude >= mid_up_3).to(torch.uint8)
        + (magnitude > mid_4).to(torch.uint8)
        + (magnitude >= mid_up_5).to(torch.uint8)
        + (magnitude > high).to(torch.uint8)
    )
    return index | ((scaled < 0).to(torch.uint8) << 3)


def _scaled_blocks(
    blocks: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks float32 [R, nb, 16] -> (block_scale fp8 [R, nb], scale_eff f32 [R, nb],
    scaled f32 [R, nb, 16] = blocks / scale_eff, 0 where scale_eff == 0)."""
    amax_block = blocks.abs().amax(dim=-1)  # [R, nb]
    block_scale, scale_eff = block_scales_reference(amax_block, global_scale)
    zero_scale = (scale_eff == 0).unsqueeze(-1)  # [R, nb, 1]
    safe_scale = torch.where(scale_eff == 0, torch.ones_like(scale_eff), scale_eff)
    scaled = blocks / safe_scale.unsqueeze(-1)
    scaled = torch.where(zero_scale, torch.zeros_like(scaled), scaled)
    return block_scale, scale_eff, scaled


def _resolve_global_scale(
    weight: torch.Tensor, global_scale: torch.Tensor | float | None
) -> torch.Tensor:
    if global_scale is None:
        return global_scale_from_amax(weight.detach().abs().amax().to(torch.float32)).to(
            weight.device
        )
    return as_global_scale(global_scale, weight.device)


def pack_codes_reference(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [R, K] -> bytes uint8 [R, K/2], even element in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes_reference(weight_packed: torch.Tensor) -> torch.Tensor:
    """bytes uint8 [R, K/2] -> codes uint8 [R, K]."""
    low = weight_packed & 0x0F
    high = weight_packed >> 4
    return torch.stack((low, high), dim=-1).reshape(weight_packed.shape[0], -1)


@torch.no_grad()
def quantize_nvfp4_reference(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
) -> NVFP4Weight:
    """Quantize a finite 2-D float weight [out, in] (in % 16 == 0, any float dtype/strides).

    ``global_scale`` None -> ``448*6/amax(weight)``; a fused group passes its shared scale.
    """
    check_weight(weight, name)
    out_features, in_features = weight.shape
    gs = _resolve_global_scale(weight, global_scale)
    blocks = (
        weight.detach()
        .to(torch.float32)
        .reshape(out_features, in_features // FP4_BLOCK_SIZE, FP4_BLOCK_SIZE)
    )  # [out, nb, 16]
    block_scale, _, scaled = _scaled_blocks(blocks, gs)
    codes = e2m1_codes_reference(scaled).reshape(out_features, in_features)
    return NVFP4Weight(pack_codes_reference(codes), block_scale, gs)


@torch.no_grad()
def dequantize_nvfp4_reference(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Decode a packed triple to ``dtype`` [out, in] (``E2M1[code] * fp32(scale) / gs``)."""
    out_features, in_features = check_packed(weight_packed, weight_scale, weight_global_scale)
    if weight_scale.dtype == torch.uint8:
        weight_scale = weight_scale.view(torch.float8_e4m3fn)
    gs = weight_global_scale.reshape(1).to(device=weight_packed.device, dtype=torch.float32)
    scale_eff = weight_scale.to(torch.float32) / gs  # [out, nb]
    codes = unpack_codes_reference(weight_packed).long()  # [out, in]
    values = E2M1_SIGNED_VALUES.to(weight_packed.device)[codes]
    values = values.reshape(out_features, -1, FP4_BLOCK_SIZE) * scale_eff.unsqueeze(-1)
    return values.reshape(out_features, in_features).to(dtype)


@torch.no_grad()
def fake_quantize_nvfp4_weight_reference(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype and shape."""
    packed = quantize_nvfp4_reference(weight, global_scale, name=name)
    return dequantize_nvfp4_reference(*packed, dtype=weight.dtype)


@torch.no_grad()
def fake_quantize_nvfp4_activation_reference(
    x: torch.Tensor, input_global_scale: torch.Tensor | float
) -> torch.Tensor:
    """W4A4 emulation of an activation ``x [..., K]`` (K % 16 == 0): dynamic FP8 block scale per
    16 values along K under the static ``input_global_scale``; same shape and dtype as ``x``."""
    check_block_dim(x.shape[-1], "activation")
    gs = as_global_scale(input_global_scale, x.device)
    k = x.shape[-1]
    blocks = x.detach().to(torch.float32).reshape(-1, k // FP4_BLOCK_SIZE, FP4_BLOCK_SIZE)
    _, scale_eff, scaled = _scaled_blocks(blocks, gs)
    codes = e2m1_codes_reference(scaled).long()  # [R, nb, 16]
    values = E2M1_SIGNED_VALUES.to(x.device)[codes] * scale_eff.unsqueeze(-1)
    return values.reshape(x.shape).to(x.dtype)


@torch.no_grad()
def nvfp4_w4a16_matmul_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
) -> torch.Tensor:
    """``x [..., K] @ dequant(W).T -> [..., out]`` in x's dtype (fp32 accumulation)."""
    weight = dequantize_nvfp4_reference(
        weight_packed, weight_scale, weight_global_scale, dtype=torch.float32
    )
    check_matmul_shapes(x, weight.shape[1])
    return (x.to(torch.float32) @ weight.T).to(x.dtype)


def check_matmul_shapes(x: torch.Tensor, in_features: int) -> None:
    """Raise NVFP4ShapeError unless ``x``'s last dim equals the weight's ``in_features``."""
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise NVFP4ShapeError(
            f"x: last dim {x.shape[-1] if x.ndim else None} does not match the weight's "
            f"in_features {in_features}"
        )
