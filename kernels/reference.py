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

Given block scales (``block_scale=``, e.g. from the search below or fixed for GPTQ): steps 1-2
are skipped, the given E4M3 bytes are used as they are and steps 3-5 are unchanged, so a value
beyond ``±6 * scale_eff`` saturates. ``round_to_nvfp4_grid_reference`` is steps 4-5 for one
value and its ``scale_eff``: bit-identical with ``dequantize(quantize(...))`` in float32.

MSE block-scale search (``search_nvfp4_block_scales_reference``), per block of 16:

1. ``rtn`` = the step-2 byte; the candidate bytes and their trial order come from
   ``ScaleCandidates.order()`` (kernels.formats).
2. For a candidate byte ``c``: ``scale_eff = float32(fp8(c)) / gs`` and
   ``dq_k = E2M1[code(x_k / scale_eff)] * scale_eff`` exactly as in quantize + dequantize
   (``dq_k = ±0`` when ``scale_eff == 0``), all float32.
3. Error, in float64 and in this order: ``d_k = f64(x_k) - f64(dq_k)``,
   ``t_k = (d_k * d_k) * f64(w_k)`` with ``w_k = float32(importance[16 b + k])`` (1.0 when no
   importance is given), ``err = ((t_0 + t_1) + t_2) + ... + t_15`` (sequential, no FMA).
4. The first candidate in trial order with the smallest error wins (strict ``<``).

FP8 tier (W8A8, compressed-tensors ``float-quantized``), see ``quantize_fp8_per_channel_reference``
and ``fake_quantize_fp8_activation_per_token_reference`` for their arithmetic order.
"""

from __future__ import annotations

import torch

from kernels.formats import (
    DEFAULT_SCALE_CANDIDATES,
    E2M1_RNE_THRESHOLDS,
    E2M1_SIGNED_VALUES,
    FOUR_OVER_SIX_CANDIDATE,
    FP4_BLOCK_SIZE,
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    FP8_E4M3_MAX_BYTE,
    FP8Weight,
    NVFP4Error,
    NVFP4ShapeError,
    NVFP4Weight,
    ScaleCandidates,
    as_global_scale,
    check_block_dim,
    check_block_scale,
    check_float_matrix,
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
    blocks: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks float32 [R, nb, 16] -> (block_scale fp8 [R, nb], scale_eff f32 [R, nb],
    scaled f32 [R, nb, 16] = blocks / scale_eff, 0 where scale_eff == 0).

    ``block_scale`` (fp8 [R, nb]) given: used as is instead of the amax scales."""
    if block_scale is None:
        amax_block = blocks.abs().amax(dim=-1)  # [R, nb]
        block_scale, scale_eff = block_scales_reference(amax_block, global_scale)
    else:
        scale_eff = block_scale.to(torch.float32) / global_scale
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
    block_scale: torch.Tensor | None = None,
) -> NVFP4Weight:
    """Quantize a finite 2-D float weight [out, in] (in % 16 == 0, any float dtype/strides).

    ``global_scale`` None -> ``448*6/amax(weight)``; a fused group passes its shared scale.
    ``block_scale`` (float8_e4m3fn [out, in/16], finite, >= 0) given: codes are encoded under
    those scales (no amax), values beyond ``±6 * scale`` saturate; it is returned as
    ``weight_scale``.
    """
    check_weight(weight, name)
    out_features, in_features = weight.shape
    if block_scale is not None:
        block_scale = check_block_scale(block_scale, weight, name)
    gs = _resolve_global_scale(weight, global_scale)
    blocks = (
        weight.detach()
        .to(torch.float32)
        .reshape(out_features, in_features // FP4_BLOCK_SIZE, FP4_BLOCK_SIZE)
    )  # [out, nb, 16]
    block_scale, _, scaled = _scaled_blocks(blocks, gs, block_scale)
    codes = e2m1_codes_reference(scaled).reshape(out_features, in_features)
    return NVFP4Weight(pack_codes_reference(codes), block_scale.contiguous(), gs)


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
    block_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype and shape."""
    packed = quantize_nvfp4_reference(weight, global_scale, name=name, block_scale=block_scale)
    return dequantize_nvfp4_reference(*packed, dtype=weight.dtype)


@torch.no_grad()
def round_to_nvfp4_grid_reference(values: torch.Tensor, scale_eff: torch.Tensor) -> torch.Tensor:
    """Each value rounded onto its block's NVFP4 grid: ``E2M1[code(v / s)] * s`` in float32
    (RNE, saturating at ``±6 s``; ``s == 0`` gives +0; -0.0 gives +0 and a negative that
    rounds to zero gives -0.0, as the codec). ``values`` and ``scale_eff`` (= ``fp32(block
    scale) / gs``, >= 0) broadcast against each other and are read as float32.

    Bit-identical with ``dequantize_nvfp4(*quantize_nvfp4(w, gs, block_scale=S), float32)``
    where ``scale_eff = S.float() / gs`` (GPTQ rounds one column at a time with it).
    """
    scaled, scale_eff, zero = grid_inputs(values, scale_eff)
    scaled = torch.where(zero, torch.zeros_like(scaled), scaled)
    decoded = E2M1_SIGNED_VALUES.to(scaled.device)[e2m1_codes_reference(scaled).long()]
    return decoded * scale_eff


def grid_inputs(
    values: torch.Tensor, scale_eff: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``(values / scale_eff, scale_eff, scale_eff == 0)`` (dividing by 1 where the
    scale is 0) for the grid-rounding ops."""
    values = values.to(torch.float32)
    scale_eff = scale_eff.to(device=values.device, dtype=torch.float32)
    zero = scale_eff == 0
    return values / torch.where(zero, torch.ones_like(scale_eff), scale_eff), scale_eff, zero


def _fp8_values(scale_bytes: torch.Tensor) -> torch.Tensor:
    """int tensor of E4M3 bytes 0..255 -> their float32 values (torch's decode)."""
    return scale_bytes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def candidate_scale_bytes(
    amax_block: torch.Tensor, global_scale: torch.Tensor, candidates: ScaleCandidates
) -> tuple[torch.Tensor, torch.Tensor]:
    """The search's candidate bytes for blocks of amax ``amax_block`` (float32 [...]).

    Returns ``(bytes int32 [..., C], valid bool [..., C])`` in ``candidates.order()``; column 0
    is the round-to-nearest byte (always valid).
    """
    rtn_scale, _ = block_scales_reference(amax_block, global_scale)
    rtn = rtn_scale.view(torch.uint8).to(torch.int32)
    columns, valid = [], []
    for offset in candidates.order():
        if offset == FOUR_OVER_SIX_CANDIDATE:
            four = global_scale * (amax_block / 4.0)
            four = torch.clamp(four, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
            columns.append(four.view(torch.uint8).to(torch.int32))
            valid.append(torch.ones_like(rtn, dtype=torch.bool))
        else:
            byte = rtn + offset
            columns.append(byte)
            valid.append(
                torch.ones_like(rtn, dtype=torch.bool)
                if offset == 0
                else (byte >= 1) & (byte <= FP8_E4M3_MAX_BYTE)
            )
    return torch.stack(columns, dim=-1), torch.stack(valid, dim=-1)


def block_errors_reference(
    blocks: torch.Tensor,
    weights: torch.Tensor,
    scale_bytes: torch.Tensor,
    global_scale: torch.Tensor,
) -> torch.Tensor:
    """Weighted squared error of each block under each candidate scale byte (float64).

    ``blocks`` float32 [N, 16], ``weights`` float64 [N, 16] (or broadcastable),
    ``scale_bytes`` int [N, C] (0..126) -> float64 [N, C], summed over k = 0..15 in order.
    """
    scale_eff = _fp8_values(scale_bytes) / global_scale  # [N, C]
    x = blocks.unsqueeze(1)  # [N, 1, 16]
    dq = round_to_nvfp4_grid_reference(x, scale_eff.unsqueeze(-1))  # [N, C, 16]
    diff = x.to(torch.float64) - dq.to(torch.float64)
    terms = (diff * diff) * weights.unsqueeze(1)  # [N, C, 16]
    error = torch.zeros(terms.shape[:-1], dtype=torch.float64, device=terms.device)
    for k in range(FP4_BLOCK_SIZE):  # fixed sequential order (no pairwise summation)
        error = error + terms[..., k]
    return error


def resolve_importance(
    importance: torch.Tensor | None, in_features: int, device: torch.device, name: str
) -> torch.Tensor:
    """``importance`` as float64 [in] (``f64(f32(importance))``; ones when None). It must be a
    finite, non-negative float vector of length ``in_features``."""
    if importance is None:
        return torch.ones(in_features, dtype=torch.float64, device=device)
    if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
        raise NVFP4Error(f"{name}: importance must be a float tensor [in_features]")
    if tuple(importance.shape) != (in_features,):
        raise NVFP4ShapeError(
            f"{name}: importance must have shape ({in_features},), got {tuple(importance.shape)}"
        )
    weights = importance.detach().to(device=device, dtype=torch.float32)
    if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise NVFP4Error(f"{name}: importance must be finite and >= 0")
    return weights.to(torch.float64)


#: Blocks per chunk of the reference search (bounds its float64 temporaries).
SEARCH_CHUNK_BLOCKS = 1 << 14


@torch.no_grad()
def search_nvfp4_block_scales_reference(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    importance: torch.Tensor | None = None,
    candidates: ScaleCandidates = DEFAULT_SCALE_CANDIDATES,
    name: str = "weight",
) -> torch.Tensor:
    """Per 16-block, the FP8 E4M3 scale among ``candidates`` minimising
    ``sum_k w_k (x_k - dq(x_k))**2`` (module docstring: arithmetic and tie order).

    ``weight`` finite 2-D [out, in] (in % 16 == 0), ``global_scale`` as ``quantize_nvfp4``,
    ``importance`` float [in] (the input's per-channel second moment; None = unweighted).
    Returns float8_e4m3fn [out, in/16] for ``quantize_nvfp4(..., block_scale=...)``.
    """
    check_weight(weight, name)
    out_features, in_features = weight.shape
    gs = _resolve_global_scale(weight, global_scale)
    weights = resolve_importance(importance, in_features, weight.device, name)
    weights = weights.reshape(-1, FP4_BLOCK_SIZE)  # [nb, 16]
    blocks_per_row = in_features // FP4_BLOCK_SIZE
    blocks = weight.detach().to(torch.float32).reshape(-1, FP4_BLOCK_SIZE)  # [R * nb, 16]
    best = torch.empty(blocks.shape[0], dtype=torch.uint8, device=weight.device)
    chunk = max(blocks_per_row, SEARCH_CHUNK_BLOCKS // blocks_per_row * blocks_per_row)
    for start in range(0, blocks.shape[0], chunk):
        part = blocks[start : start + chunk]  # [N, 16], N a multiple of blocks_per_row
        part_weights = weights.repeat(part.shape[0] // blocks_per_row, 1)  # [N, 16]
        scale_bytes, valid = candidate_scale_bytes(part.abs().amax(dim=-1), gs, candidates)
        errors = block_errors_reference(part, part_weights, scale_bytes.clamp(0, 126), gs)
        best_error, best_byte = errors[:, 0], scale_bytes[:, 0]
        for j in range(1, scale_bytes.shape[1]):  # trial order: strict < keeps the first
            better = valid[:, j] & (errors[:, j] < best_error)
            best_error = torch.where(better, errors[:, j], best_error)
            best_byte = torch.where(better, scale_bytes[:, j], best_byte)
        best[start : start + chunk] = best_byte.to(torch.uint8)
    return best.reshape(out_features, blocks_per_row).view(torch.float8_e4m3fn)


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


# --------------------------------------------------------------------------- FP8 tier (W8A8)

#: compressed-tensors replaces a zero scale by the scale dtype's eps (float32 here).
FP8_ZERO_SCALE_EPS = torch.finfo(torch.float32).eps


@torch.no_grad()
def quantize_fp8_per_channel_reference(weight: torch.Tensor, *, name: str = "weight") -> FP8Weight:
    """FP8 E4M3 weight with one float32 scale per output channel (row), as compressed-tensors'
    ``calculate_qparams`` + ``quantize`` for ``QuantizationArgs(num_bits=8, type="float",
    strategy="channel", symmetric=True)`` on the float32 weight, with its zero point:

    1. ``x = float32(weight)``; ``scale = amax_row(|x|) / 448`` (float32), 0 -> float32 eps.
    2. ``q = fp8_e4m3fn(clamp(x / scale + 0.0, -448, 448))`` (the ``+ 0.0`` is compressed-tensors'
       zero point: -0.0 encodes as +0).

    A bf16/fp16 weight is upcast first (exact); compressed-tensors run on the bf16 tensor itself
    would compute its scale in bf16 and round ``x / scale`` to bf16 before the FP8 cast.
    """
    check_float_matrix(weight, name)
    x = weight.detach().to(torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True)  # [out, 1]
    scale = amax / FP8_E4M3_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, FP8_ZERO_SCALE_EPS), scale)
    scaled = x / scale + 0.0
    q = torch.clamp(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Weight(q, scale)


@torch.no_grad()
def dequantize_fp8_reference(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``float32(weight) * weight_scale`` (float32), then cast to ``dtype`` [out, in]."""
    check_fp8_weight(weight, weight_scale)
    scale = weight_scale.to(device=weight.device, dtype=torch.float32).reshape(-1, 1)
    return (weight.to(torch.float32) * scale).to(dtype)


@torch.no_grad()
def fake_quantize_fp8_weight_reference(
    weight: torch.Tensor, *, name: str = "weight"
) -> torch.Tensor:
    """``dequantize_fp8(quantize_fp8_per_channel(weight))`` in ``weight``'s dtype and shape."""
    return dequantize_fp8_reference(
        *quantize_fp8_per_channel_reference(weight, name=name), weight.dtype
    )


@torch.no_grad()
def fake_quantize_fp8_activation_per_token_reference(x: torch.Tensor) -> torch.Tensor:
    """W8A8 emulation of an activation ``x [..., K]``: a dynamic FP8 scale per token (row of
    the last dim), as compressed-tensors' forward for ``QuantizationArgs(num_bits=8,
    type="float", strategy="token", dynamic=True, symmetric=True)``, in ``x``'s dtype:

    1. ``scale = amax_row(|x|) / 448`` in x's dtype (bf16/fp16: computed in float32, rounded
       to x's dtype, as every step below); 0 -> ``finfo(x.dtype).eps``.
    2. ``q = float(fp8_e4m3fn(clamp(x / scale + 0, -448, 448)))``; 3. ``out = q * scale``.

    Same shape and dtype as ``x``. compressed-tensors reduces over every dim but the first
    two, so on a 2-D input it takes one scale for the whole tensor; transformers passes
    ``[batch, seq, K]`` and gets per-token scales, which is what this op always does.
    """
    if x.ndim < 1 or x.shape[-1] == 0:
        raise NVFP4ShapeError(f"activation: expected [..., K] with K > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise NVFP4Error(f"activation: expected a floating-point tensor, got {x.dtype}")
    x = x.detach()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.tensor(FP8_E4M3_MAX, dtype=x.dtype, device=x.device)
    eps = torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype, device=x.device)
    scale = torch.where(scale == 0, eps, scale)
    scaled = x / scale + torch.zeros((), dtype=x.dtype, device=x.device)
    q = torch.clamp(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    return q * scale


def check_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int]:
    """Validate an FP8 pair (float8_e4m3fn [out, in], scale [out, 1] or [out]); return its shape."""
    if weight.dtype != torch.float8_e4m3fn or weight.ndim != 2:
        raise NVFP4ShapeError(
            f"weight: expected float8_e4m3fn [out, in], got {weight.dtype} {tuple(weight.shape)}"
        )
    if weight_scale.numel() != weight.shape[0]:
        raise NVFP4ShapeError(
            f"weight_scale: expected {weight.shape[0]} values (one per output channel), got "
            f"shape {tuple(weight_scale.shape)}"
        )
    return weight.shape[0], weight.shape[1]
