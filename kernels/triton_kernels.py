"""Triton NVFP4 kernels (CUDA; on CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).

Same numerics as ``kernels.reference``, bit for bit. FP8 E4M3 is encoded and decoded with
integer bit operations (Triton's interpreter rounds ``x.to(tl.float8e4nv)`` wrongly), and every
float32 division uses ``tl.div_rn`` (IEEE round-to-nearest; plain ``/`` is approximate on GPU).

Each program handles ``BLOCK_B`` quantization blocks of 16 elements, loaded as the 8 even and the
8 odd elements of each block (the two nibbles of one output byte), so no interleaving is needed.
Quantize+pack optionally encodes under given block scales (``HAS_GIVEN``). The block-scale search
holds a [blocks, candidates] tile, accumulates the float64 error over k = 0..15 in order and is
launched with ``enable_fp_fusion=False`` (no FMA contraction, so the GPU rounds like the
reference); the first minimum in trial order is found with exact min/compare reductions.
Importing this module raises ImportError when Triton is missing; ``kernels.dispatch`` imports it
lazily.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.formats import (
    DEFAULT_SCALE_CANDIDATES,
    FOUR_OVER_SIX_CANDIDATE,
    FP4_BLOCK_SIZE,
    NVFP4Weight,
    ScaleCandidates,
    as_global_scale,
    check_block_dim,
    check_block_scale,
    check_packed,
    check_weight,
)
from kernels.reference import _resolve_global_scale, check_matmul_shapes, resolve_importance

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Quantization blocks per program: the interpreter's speed depends on the program count.
DEFAULT_BLOCK_B = 4096 if INTERPRETER else 128


@triton.jit
def _fp8_e4m3_encode(v):
    """float32 in [0, 448] -> E4M3 byte as int32 (round to nearest even, subnormals kept)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = bits >> 23
    # normal range (v >= 2**-6): round the 23-bit mantissa to 3 bits, carry into the exponent
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal range: RNE(v * 2**9) from the 24-bit significand
    significand = (bits & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - exponent, 30)
    shift = tl.maximum(shift, 1)
    quotient = significand >> shift
    remainder = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    round_up = (remainder > half) | ((remainder == half) & ((quotient & 1) == 1))
    subnormal = quotient + round_up.to(tl.int32)
    return tl.where(exponent >= 121, normal, subnormal)


@triton.jit
def _fp8_e4m3_decode(code):
    """E4M3 byte (int32, 0..255) -> float32."""
    exponent = (code >> 3) & 15
    mantissa = code & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125
    value = tl.where(exponent == 0, subnormal, normal)
    return tl.where((code & 0x80) != 0, -value, value)


@triton.jit
def _e2m1_encode(scaled):
    """float32 -> E2M1 code (int32 0..15), RNE, saturating; sign bit iff scaled < 0."""
    m = tl.abs(scaled)
    index = (
        (m > 0.25).to(tl.int32)
        + (m >= 0.75).to(tl.int32)
        + (m > 1.25).to(tl.int32)
        + (m >= 1.75).to(tl.int32)
        + (m > 2.5).to(tl.int32)
        + (m >= 3.5).to(tl.int32)
        + (m > 5.0).to(tl.int32)
    )
    return index | ((scaled < 0.0).to(tl.int32) << 3)


@triton.jit
def _e2m1_decode(code):
    """E2M1 code (int32 0..15) -> float32 (code 8 -> -0.0)."""
    index = code & 7
    normal = ((((index >> 1) + 126) << 23) | ((index & 1) << 22)).to(tl.float32, bitcast=True)
    magnitude = tl.where(index < 2, index.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _to_store_dtype(value, out_ptr):
    """float32 -> out_ptr's element type with round-to-nearest-even. bfloat16 is rounded with
    integer ops first because Triton's interpreter truncates fp32 -> bf16 (the GPU rounds)."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the high 16 bits
        value = bits.to(tl.float32, bitcast=True)
    return value.to(out_ptr.dtype.element_ty)


@triton.jit
def _amax_scale_byte(amax, global_scale, divisor: tl.constexpr):
    """``fp8(min(gs * (amax / divisor), 448))`` as an E4M3 byte (int32); divisor 6 is
    round-to-nearest, 4 is Four Over Six."""
    return _fp8_e4m3_encode(tl.minimum(global_scale * tl.div_rn(amax, divisor), 448.0))


@triton.jit
def _codes_under_scale(x_even, x_odd, scale_byte, global_scale):
    """x_even/x_odd float32 [BB, 8] under E4M3 bytes [BB] -> (codes_even, codes_odd int32
    [BB, 8], scale_eff float32 [BB]); a zero scale gives codes 0."""
    scale_eff = tl.div_rn(_fp8_e4m3_decode(scale_byte), global_scale)
    zero = scale_eff == 0.0
    safe = tl.where(zero, 1.0, scale_eff)[:, None]
    scaled_even = tl.where(zero[:, None], 0.0, tl.div_rn(x_even, safe))
    scaled_odd = tl.where(zero[:, None], 0.0, tl.div_rn(x_odd, safe))
    return _e2m1_encode(scaled_even), _e2m1_encode(scaled_odd), scale_eff


@triton.jit
def _block_codes(x_even, x_odd, global_scale):
    """x_even/x_odd float32 [BB, 8] -> (codes_even, codes_odd int32 [BB, 8], scale byte int32
    [BB], scale_eff float32 [BB])."""
    amax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    scale_byte = _amax_scale_byte(amax, global_scale, 6.0)
    code_even, code_odd, scale_eff = _codes_under_scale(x_even, x_odd, scale_byte, global_scale)
    return code_even, code_odd, scale_byte, scale_eff


@triton.jit
def _load_blocks(x_ptr, stride_r, stride_c, n_blocks, blocks_per_row, BLOCK_B: tl.constexpr):
    block = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    valid = block < n_blocks
    row = block // blocks_per_row
    group = block % blocks_per_row
    pair = tl.arange(0, 8)  # [8]
    col_even = group[:, None] * 16 + 2 * pair[None, :]  # [BB, 8]
    mask = valid[:, None]
    base = x_ptr + row[:, None].to(tl.int64) * stride_r
    x_even = tl.load(base + col_even * stride_c, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(base + (col_even + 1) * stride_c, mask=mask, other=0.0).to(tl.float32)
    return block, valid, row, group, pair, col_even, x_even, x_odd


@triton.jit
def quantize_pack_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    global_scale_ptr,
    given_ptr,
    stride_r,
    stride_c,
    stride_gr,
    stride_gc,
    n_blocks,
    blocks_per_row,
    HAS_GIVEN: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """x [R, K] (any strides) -> packed uint8 [R, K/2] contiguous, scale bytes uint8 [R, K/16].
    ``HAS_GIVEN``: encode under the E4M3 bytes at ``given_ptr`` [R, K/16] (any strides)."""
    block, valid, row, group, pair, col_even, x_even, x_odd = _load_blocks(
        x_ptr, stride_r, stride_c, n_blocks, blocks_per_row, BLOCK_B
    )
    global_scale = tl.load(global_scale_ptr)
    if HAS_GIVEN:
        given = given_ptr + row.to(tl.int64) * stride_gr + group * stride_gc
        scale_byte = tl.load(given, mask=valid, other=0).to(tl.int32)
        code_even, code_odd, _ = _codes_under_scale(x_even, x_odd, scale_byte, global_scale)
    else:
        code_even, code_odd, scale_byte, _ = _block_codes(x_even, x_odd, global_scale)
    packed = (code_even | (code_odd << 4)).to(tl.uint8)
    out_offsets = row[:, None].to(tl.int64) * (blocks_per_row * 8) + group[:, None] * 8 + pair
    tl.store(packed_ptr + out_offsets, packed, mask=valid[:, None])
    tl.store(scale_ptr + block, scale_byte.to(tl.uint8), mask=valid)


@triton.jit
def fake_quantize_activation_kernel(
    x_ptr,
    out_ptr,
    global_scale_ptr,
    stride_r,
    stride_c,
    n_blocks,
    blocks_per_row,
    BLOCK_B: tl.constexpr,
):
    """x [R, K] -> dequant(quant(x)) [R, K] contiguous in out's dtype."""
    block, valid, row, group, pair, col_even, x_even, x_odd = _load_blocks(
        x_ptr, stride_r, stride_c, n_blocks, blocks_per_row, BLOCK_B
    )
    global_scale = tl.load(global_scale_ptr)
    code_even, code_odd, _, scale_eff = _block_codes(x_even, x_odd, global_scale)
    value_even = _e2m1_decode(code_even) * scale_eff[:, None]
    value_odd = _e2m1_decode(code_odd) * scale_eff[:, None]
    out_base = out_ptr + row[:, None].to(tl.int64) * (blocks_per_row * 16) + col_even
    mask = valid[:, None]
    tl.store(out_base, _to_store_dtype(value_even, out_ptr), mask=mask)
    tl.store(out_base + 1, _to_store_dtype(value_odd, out_ptr), mask=mask)


@triton.jit
def search_block_scales_kernel(
    x_ptr,
    weights_ptr,
    offsets_ptr,
    out_ptr,
    global_scale_ptr,
    stride_r,
    stride_c,
    n_blocks,
    blocks_per_row,
    n_candidates,
    FOUR_OVER_SIX: tl.constexpr,
    CANDIDATES: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """MSE block-scale search: x [R, K] (any strides), weights float64 [K], offsets int32
    [CANDIDATES] (``ScaleCandidates.order()`` padded past ``n_candidates``) -> chosen E4M3 bytes
    uint8 [R * K/16]. Every candidate of a block is a column of a [BB, CANDIDATES] tile; the
    error sums k = 0..15 in order in float64 (as the reference), and the first minimum in trial
    order wins."""
    block = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    valid = block < n_blocks
    row = block // blocks_per_row
    group = block % blocks_per_row
    base = x_ptr + row.to(tl.int64) * stride_r + (group * 16).to(tl.int64) * stride_c  # [BB]
    lanes = tl.arange(0, 16)
    tile = tl.load(base[:, None] + lanes[None, :] * stride_c, mask=valid[:, None], other=0.0)
    amax = tl.max(tl.abs(tile.to(tl.float32)), axis=1)  # [BB]
    global_scale = tl.load(global_scale_ptr)
    rtn = _amax_scale_byte(amax, global_scale, 6.0)
    four = _amax_scale_byte(amax, global_scale, 4.0)
    slot = tl.arange(0, CANDIDATES)  # [C]
    offset = tl.load(offsets_ptr + slot)
    is_four = offset == FOUR_OVER_SIX
    byte = tl.where(is_four[None, :], four[:, None], rtn[:, None] + offset[None, :])  # [BB, C]
    usable = (is_four[None, :] | (offset[None, :] == 0) | ((byte >= 1) & (byte <= 126))) & (
        slot < n_candidates
    )[None, :]
    byte = tl.where(usable, byte, 0)
    scale_eff = tl.div_rn(_fp8_e4m3_decode(byte), global_scale)  # [BB, C]
    zero = scale_eff == 0.0
    safe = tl.where(zero, 1.0, scale_eff)
    error = tl.zeros((BLOCK_B, CANDIDATES), dtype=tl.float64)
    for k in tl.static_range(16):
        value = tl.load(base + k * stride_c, mask=valid, other=0.0).to(tl.float32)[:, None]
        scaled = tl.where(zero, 0.0, tl.div_rn(value, safe))
        decoded = _e2m1_decode(_e2m1_encode(scaled)) * scale_eff
        diff = value.to(tl.float64) - decoded.to(tl.float64)
        weight = tl.load(weights_ptr + group * 16 + k, mask=valid, other=0.0)  # [BB] f64
        error = error + (diff * diff) * weight[:, None]
    error = tl.where(usable, error, float("inf"))
    best_error = tl.min(error, axis=1)
    first = tl.min(tl.where(error == best_error[:, None], slot[None, :], CANDIDATES), axis=1)
    best = tl.sum(tl.where(slot[None, :] == first[:, None], byte, 0), axis=1)
    tl.store(out_ptr + block, best.to(tl.uint8), mask=valid)


@triton.jit
def unpack_dequantize_kernel(
    packed_ptr,
    scale_ptr,
    global_scale_ptr,
    out_ptr,
    stride_pr,
    stride_pc,
    stride_sr,
    stride_sc,
    n_blocks,
    blocks_per_row,
    BLOCK_B: tl.constexpr,
):
    """packed uint8 [R, K/2] + scale bytes uint8 [R, K/16] -> out [R, K] contiguous."""
    block = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = block < n_blocks
    row = block // blocks_per_row
    group = block % blocks_per_row
    pair = tl.arange(0, 8)
    mask = valid[:, None]
    byte_offsets = row[:, None].to(tl.int64) * stride_pr + (group[:, None] * 8 + pair) * stride_pc
    packed = tl.load(packed_ptr + byte_offsets, mask=mask, other=0).to(tl.int32)
    scale_byte = tl.load(
        scale_ptr + row.to(tl.int64) * stride_sr + group * stride_sc, mask=valid, other=0
    ).to(tl.int32)
    global_scale = tl.load(global_scale_ptr)
    scale_eff = tl.div_rn(_fp8_e4m3_decode(scale_byte), global_scale)[:, None]
    value_even = _e2m1_decode(packed & 15) * scale_eff
    value_odd = _e2m1_decode(packed >> 4) * scale_eff
    out_base = (
        out_ptr + row[:, None].to(tl.int64) * (blocks_per_row * 16) + group[:, None] * 16 + 2 * pair
    )
    tl.store(out_base, _to_store_dtype(value_even, out_ptr), mask=mask)
    tl.store(out_base + 1, _to_store_dtype(value_odd, out_ptr), mask=mask)


@triton.jit
def w4a16_matmul_kernel(
    x_ptr,
    packed_ptr,
    scale_eff_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_pn,
    stride_pk,
    stride_om,
    stride_on,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out [M, N] = x [M, K] @ dequant(W [N, K]).T; W is decoded tile by tile in registers.

    The even and odd K columns are multiplied separately (low and high nibbles), so a tile of
    bytes [BN, BK/2] is never interleaved. ``scale_eff`` is fp32 [N, K/16] contiguous.
    ``DOT_FP32``: fp32 inputs, IEEE dot (fp32 x, and always in the interpreter, whose bf16 dot
    is wrong); otherwise W tiles are cast to x's dtype (bf16/fp16 tensor cores).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    half_k = K // 2
    for k0 in range(0, half_k, BLOCK_K // 2):
        offs_p = k0 + tl.arange(0, BLOCK_K // 2)  # byte column = K column pair
        mask_p = offs_p < half_k
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        x_mask = mask_m[:, None] & mask_p[None, :]
        x_even = tl.load(x_rows + (2 * offs_p[None, :]) * stride_xk, mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + (2 * offs_p[None, :] + 1) * stride_xk, mask=x_mask, other=0.0)
        if DOT_FP32:
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
        w_mask = mask_n[:, None] & mask_p[None, :]
        packed = tl.load(
            packed_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_p[None, :] * stride_pk,
            mask=w_mask,
            other=0,
        ).to(tl.int32)
        scale_eff = tl.load(
            scale_eff_ptr + offs_n[:, None].to(tl.int64) * (K // 16) + (offs_p[None, :] // 8),
            mask=w_mask,
            other=0.0,
        )
        w_even = _e2m1_decode(packed & 15) * scale_eff  # [BN, BK/2]
        w_odd = _e2m1_decode(packed >> 4) * scale_eff
        if DOT_FP32:
            acc += tl.dot(x_even, tl.trans(w_even), input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(w_odd), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)))
            acc += tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)))
    out_offsets = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(
        out_ptr + out_offsets,
        _to_store_dtype(acc, out_ptr),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _grid_blocks(n_blocks: int, block_b: int) -> tuple[int]:
    return (triton.cdiv(n_blocks, block_b),)


def quantize_nvfp4_triton(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
    block_b: int | None = None,
) -> NVFP4Weight:
    """Triton quantize+pack of a finite 2-D weight [out, in] (in % 16 == 0, any strides);
    ``block_scale`` as in ``quantize_nvfp4_reference``."""
    check_weight(weight, name)
    out_features, in_features = weight.shape
    gs = _resolve_global_scale(weight, global_scale)
    blocks_per_row = in_features // FP4_BLOCK_SIZE
    n_blocks = out_features * blocks_per_row
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(out_features, blocks_per_row, dtype=torch.uint8, device=weight.device)
    given = scale  # not read unless HAS_GIVEN
    if block_scale is not None:
        given = check_block_scale(block_scale, weight, name).view(torch.uint8)
    block_b = block_b or DEFAULT_BLOCK_B
    if n_blocks:
        quantize_pack_kernel[_grid_blocks(n_blocks, block_b)](
            weight,
            packed,
            scale,
            gs,
            given,
            weight.stride(0),
            weight.stride(1),
            given.stride(0),
            given.stride(1),
            n_blocks,
            blocks_per_row,
            HAS_GIVEN=block_scale is not None,
            BLOCK_B=block_b,
        )
    return NVFP4Weight(packed, scale.view(torch.float8_e4m3fn), gs)


#: Blocks per program of the search (its tile is [BLOCK_B, candidates] float64).
SEARCH_BLOCK_B = 4096 if INTERPRETER else 32


def search_nvfp4_block_scales_triton(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    importance: torch.Tensor | None = None,
    candidates: ScaleCandidates = DEFAULT_SCALE_CANDIDATES,
    name: str = "weight",
    block_b: int | None = None,
) -> torch.Tensor:
    """Triton MSE block-scale search; same contract and bytes as
    ``search_nvfp4_block_scales_reference``. Launched with ``enable_fp_fusion=False``: the
    float64 error must not be contracted into FMAs (the reference rounds every product)."""
    check_weight(weight, name)
    out_features, in_features = weight.shape
    gs = _resolve_global_scale(weight, global_scale)
    weights = resolve_importance(importance, in_features, weight.device, name).contiguous()
    order = candidates.order()
    slots = triton.next_power_of_2(len(order))
    offsets = torch.zeros(slots, dtype=torch.int32)
    offsets[: len(order)] = torch.tensor(order, dtype=torch.int32)
    blocks_per_row = in_features // FP4_BLOCK_SIZE
    n_blocks = out_features * blocks_per_row
    out = torch.empty(out_features, blocks_per_row, dtype=torch.uint8, device=weight.device)
    block_b = block_b or SEARCH_BLOCK_B
    if n_blocks:
        search_block_scales_kernel[_grid_blocks(n_blocks, block_b)](
            weight,
            weights,
            offsets.to(weight.device),
            out,
            gs,
            weight.stride(0),
            weight.stride(1),
            n_blocks,
            blocks_per_row,
            len(order),
            FOUR_OVER_SIX=FOUR_OVER_SIX_CANDIDATE,
            CANDIDATES=slots,
            BLOCK_B=block_b,
            enable_fp_fusion=False,
        )
    return out.view(torch.float8_e4m3fn)


def dequantize_nvfp4_triton(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    block_b: int | None = None,
) -> torch.Tensor:
    """Triton unpack+dequantize to ``dtype`` [out, in]."""
    out_features, in_features = check_packed(weight_packed, weight_scale, weight_global_scale)
    scale_bytes = weight_scale.view(torch.uint8)
    gs = weight_global_scale.reshape(1).to(device=weight_packed.device, dtype=torch.float32)
    out = torch.empty(out_features, in_features, dtype=dtype, device=weight_packed.device)
    blocks_per_row = in_features // FP4_BLOCK_SIZE
    n_blocks = out_features * blocks_per_row
    block_b = block_b or DEFAULT_BLOCK_B
    if n_blocks:
        unpack_dequantize_kernel[_grid_blocks(n_blocks, block_b)](
            weight_packed,
            scale_bytes,
            gs,
            out,
            weight_packed.stride(0),
            weight_packed.stride(1),
            scale_bytes.stride(0),
            scale_bytes.stride(1),
            n_blocks,
            blocks_per_row,
            BLOCK_B=block_b,
        )
    return out


def fake_quantize_nvfp4_activation_triton(
    x: torch.Tensor, input_global_scale: torch.Tensor | float, *, block_b: int | None = None
) -> torch.Tensor:
    """Triton W4A4 activation fake-quant of ``x [..., K]``; same shape and dtype."""
    check_block_dim(x.shape[-1], "activation")
    gs = as_global_scale(input_global_scale, x.device)
    k = x.shape[-1]
    x2d = x.reshape(-1, k)  # [R, K], a view when possible
    out = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
    blocks_per_row = k // FP4_BLOCK_SIZE
    n_blocks = x2d.shape[0] * blocks_per_row
    block_b = block_b or DEFAULT_BLOCK_B
    if n_blocks:
        fake_quantize_activation_kernel[_grid_blocks(n_blocks, block_b)](
            x2d,
            out,
            gs,
            x2d.stride(0),
            x2d.stride(1),
            n_blocks,
            blocks_per_row,
            BLOCK_B=block_b,
        )
    return out.reshape(x.shape)


def nvfp4_w4a16_matmul_triton(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    *,
    block_m: int = 32,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Fused ``x [..., K] @ dequant(W).T -> [..., out]`` in x's dtype."""
    out_features, in_features = check_packed(weight_packed, weight_scale, weight_global_scale)
    check_matmul_shapes(x, in_features)
    gs = weight_global_scale.reshape(1).to(device=x.device, dtype=torch.float32)
    scale_eff = (weight_scale.view(torch.float8_e4m3fn).to(torch.float32) / gs).contiguous()
    x2d = x.reshape(-1, in_features)
    m = x2d.shape[0]
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m and out_features:
        grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, block_n))
        w4a16_matmul_kernel[grid](
            x2d,
            weight_packed,
            scale_eff,
            out,
            m,
            out_features,
            in_features,
            x2d.stride(0),
            x2d.stride(1),
            weight_packed.stride(0),
            weight_packed.stride(1),
            out.stride(0),
            out.stride(1),
            DOT_FP32=x.dtype == torch.float32 or INTERPRETER,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
    return out.reshape(*x.shape[:-1], out_features)
