"""Fused single-pass CPU NVFP4 kernels (numba). Must equal ``kernels.reference`` bit for bit.

Each op reads its input once per row into a float32 row buffer (bf16 -> fp32 is a 16-bit shift,
fp16 -> fp32 a table lookup, both exact, as torch's casts), then does the reference's float32
arithmetic in the reference's order, block by block: ``amax``, ``gs * (amax / 6)``, clamp at 448,
FP8 E4M3 encode with integer ops (RNE, subnormals), ``scale_eff = fp32(fp8) / gs``,
``x / scale_eff`` and E2M1 rounding by comparisons. Outputs are written straight into torch-owned
buffers (numpy views); fp32 -> bf16/fp16 stores round to nearest even with integer ops, as torch.

Given block scales (``block_scale=``) replace the amax scales of each row before encoding. The
block-scale search evaluates each candidate of a block like quantize + dequantize in float32,
then its float64 error sequentially over k = 0..15 (``fastmath=False``: LLVM neither
reassociates nor contracts it into FMAs), as ``kernels.reference`` defines it. The FP8 ops: the
weight in float32 (``x / scale + 0``, clamp, E4M3 RNE by integer ops); the per-token activation
rounds every intermediate to x's dtype (bf16/fp16 RNE by integer ops), as torch computes
compressed-tensors' steps in that dtype.

Blocks holding NaN/Inf are flagged in the same pass, so ``quantize`` needs no separate
``isfinite`` pass (a second read-only pass computes the tensor amax when no global scale is given).
Activation blocks holding NaN decode to NaN as in the reference; NaN payload bits are not matched.

Threads: rows are split over ``prange`` chunks (``parallel=True``, numba's ``workqueue`` layer
unless ``NUMBA_THREADING_LAYER`` is set, see below) for inputs of at least
``PARALLEL_MIN_ELEMENTS``, using ``min(torch.get_num_threads(), numba's thread count)`` threads.
The serial kernel (``nogil``) is used instead when another thread is already inside a parallel
kernel (numba's ``workqueue`` layer aborts on concurrent launches; thread pools such as the KL
sweep's then run the serial kernel in parallel themselves) and in a process forked from the one
that imported this module (GNU OpenMP is not fork safe; numba's ``omp`` layer kills such a child).

Compiled code is cached on disk (``cache=True``: ``__pycache__`` beside this file, else numba's
user-wide cache dir, or ``NUMBA_CACHE_DIR``); when no cache location is writable the kernels are
compiled in memory at first use instead.

Importing this module raises ImportError when numba is missing; ``kernels.dispatch`` imports it
lazily.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from kernels.formats import (
    DEFAULT_SCALE_CANDIDATES,
    E2M1_SIGNED_VALUES,
    FOUR_OVER_SIX_CANDIDATE,
    FP4_BLOCK_SIZE,
    FP8_E4M3_MAX_BYTE,
    FP8Weight,
    NVFP4Error,
    NVFP4Weight,
    ScaleCandidates,
    as_global_scale,
    check_block_dim,
    check_block_scale,
    check_matrix_layout,
    check_packed,
    check_weight_layout,
    global_scale_from_amax,
    non_finite_error,
)
from kernels.reference import (
    check_fp8_weight,
    check_matmul_shapes,
    fake_quantize_fp8_activation_per_token_reference,
    resolve_importance,
)

logger = logging.getLogger(__name__)

__all__ = [
    "dequantize_nvfp4_numba",
    "fake_quantize_nvfp4_activation_numba",
    "fake_quantize_nvfp4_weight_numba",
    "nvfp4_w4a16_matmul_numba",
    "quantize_nvfp4_numba",
]

#: Inputs with fewer elements run the serial kernel (a parallel launch costs more than it saves;
#: the serial kernels do ~1 ns per element).
PARALLEL_MIN_ELEMENTS = 1 << 20
#: prange chunks per thread (load balance on a shared machine).
CHUNKS_PER_THREAD = 4

# Row-buffer load/store modes (the storage dtype of a torch tensor viewed as numpy).
MODE_F32 = 0  # float32 array
MODE_BF16 = 1  # uint16 array holding bfloat16 bits
MODE_F16 = 2  # uint16 array holding float16 bits

_NATIVE_MODES = {torch.float32: MODE_F32, torch.bfloat16: MODE_BF16, torch.float16: MODE_F16}

_F32_ZERO = np.float32(0.0)
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_TWO = np.float32(2.0)
_F32_FOUR = np.float32(4.0)
_F32_SIX = np.float32(6.0)
_F32_EPS = np.float32(np.finfo(np.float32).eps)  # compressed-tensors' zero-scale replacement
_F32_FP8_MAX = np.float32(448.0)
_F32_INF = np.float32(np.inf)
_F32_NAN = np.float32(np.nan)
# E2M1 round-to-nearest-even decision points (see kernels.formats.E2M1_RNE_THRESHOLDS).
_T0, _T1, _T2, _T3, _T4, _T5, _T6 = (
    np.float32(0.25),
    np.float32(0.75),
    np.float32(1.25),
    np.float32(1.75),
    np.float32(2.5),
    np.float32(3.5),
    np.float32(5.0),
)


_CACHE_WARNED: list[bool] = []


def _jit(parallel: bool = False, inline: bool = False):
    """``njit`` with the project's options; ``cache=True`` unless no cache dir is writable.

    ``inline``: inline at numba-IR level (numba does not let LLVM inline one jitted function
    into another, and a call in an inner loop blocks vectorization: ~10x slower).
    """

    def decorate(fn):
        options = {
            "parallel": parallel,
            "nogil": True,
            "fastmath": False,
            "error_model": "numpy",
            "inline": "always" if inline else "never",
        }
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if not _CACHE_WARNED:
                _CACHE_WARNED.append(True)
                logger.warning(
                    "numba cache unavailable (%s); kernels are compiled in memory at first use "
                    "(set NUMBA_CACHE_DIR to a writable directory to keep them)",
                    exc,
                )
            return numba.njit(cache=False, **options)(fn)

    return decorate


# --------------------------------------------------------------------------- bit casts


@intrinsic
def _f32_bits(typingctx, value):
    """float32 -> its IEEE bits as int64 (zero-extended)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.zext(bits, ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """int64 whose low 32 bits are IEEE float32 bits -> float32."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(types.int64), codegen


# --------------------------------------------------------------------------- scalar codecs


@_jit(inline=True)
def _fp8_e4m3_encode(value):
    """float32 in [0, 448] -> E4M3 byte (round to nearest even, subnormals kept), as torch."""
    bits = _f32_bits(value)
    exponent = bits >> 23
    if exponent >= 121:  # normal (value >= 2**-6): round the mantissa to 3 bits, carry up
        return ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal: RNE(value * 2**9) from the 24-bit significand
    significand = (bits & 0x7FFFFF) | 0x800000
    shift = min(141 - exponent, 30)
    quotient = significand >> shift
    remainder = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if remainder > half or (remainder == half and (quotient & 1) == 1):
        quotient += 1
    return quotient


@_jit(inline=True)
def _e2m1_encode(scaled):
    """float32 -> E2M1 code 0..15 (RNE, saturating at ±6; sign bit iff scaled < 0).
    uint8 arithmetic: it vectorizes (int64 does not, ~10x slower)."""
    m = abs(scaled)
    index = (
        np.uint8(m > _T0)
        + np.uint8(m >= _T1)
        + np.uint8(m > _T2)
        + np.uint8(m >= _T3)
        + np.uint8(m > _T4)
        + np.uint8(m >= _T5)
        + np.uint8(m > _T6)
    )
    return index | (np.uint8(scaled < _F32_ZERO) << np.uint8(3))


@_jit(inline=True)
def _bf16_bits(value):
    """float32 -> bfloat16 bits (RNE; NaN -> 0x7FC0)."""
    bits = _f32_bits(value)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return 0x7FC0 if value != value else rounded


@_jit(inline=True)
def _f16_bits(value):
    """float32 -> float16 bits (RNE, subnormals, overflow to inf; NaN -> 0x7E00)."""
    bits = _f32_bits(value)
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    if magnitude > 0x7F800000:
        return sign | 0x7E00
    if magnitude >= 0x477FF000:  # >= 65520 (or inf): rounds to inf
        return sign | 0x7C00
    if magnitude >= 0x38800000:  # normal half (>= 2**-14): rebias, round mantissa to 10 bits
        rebased = magnitude - (112 << 23)
        return sign | ((rebased + 0xFFF + ((rebased >> 13) & 1)) >> 13)
    exponent = magnitude >> 23
    if exponent < 102:  # < 2**-25: rounds to zero
        return sign
    significand = (magnitude & 0x7FFFFF) | 0x800000
    shift = 126 - exponent  # value / 2**-24 = significand >> shift
    quotient = significand >> shift
    remainder = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if remainder > half or (remainder == half and (quotient & 1) == 1):
        quotient += 1
    return sign | quotient


# --------------------------------------------------------------------------- row load / store


@_jit(inline=True)
def _load_row(x, r, mode, f16_table, row):
    """x[r] (float32, or uint16 bf16/fp16 bits) -> float32 row buffer, exactly as torch casts."""
    k = x.shape[1]
    if mode == MODE_BF16:
        for c in range(k):
            row[c] = _f32_from_bits(np.int64(x[r, c]) << 16)
    elif mode == MODE_F16:
        for c in range(k):
            row[c] = f16_table[np.int64(x[r, c])]
    else:
        for c in range(k):
            row[c] = x[r, c]


@_jit(inline=True)
def _store_row(row, out, r, mode):
    """float32 row buffer -> out[r] (float32, or uint16 bf16/fp16 bits, RNE)."""
    k = out.shape[1]
    if mode == MODE_BF16:
        for c in range(k):
            out[r, c] = _bf16_bits(row[c])
    elif mode == MODE_F16:
        for c in range(k):
            out[r, c] = _f16_bits(row[c])
    else:
        for c in range(k):
            out[r, c] = row[c]


@_jit(inline=True)
def _e2m1_round(scaled):
    """float32 -> the E2M1 value it encodes to (same decisions as ``_e2m1_encode``, -0.0 for a
    negative that rounds to zero), as float32; sums of exact halves, so it vectorizes."""
    m = abs(scaled)
    magnitude = (
        _F32_HALF * np.float32(m > _T0)
        + _F32_HALF * np.float32(m >= _T1)
        + _F32_HALF * np.float32(m > _T2)
        + _F32_HALF * np.float32(m >= _T3)
        + _F32_ONE * np.float32(m > _T4)
        + _F32_ONE * np.float32(m >= _T5)
        + _F32_TWO * np.float32(m > _T6)
    )
    return -magnitude if scaled < _F32_ZERO else magnitude


@_jit(inline=True)
def _row_block_scales(row, gs, fp8_decode, scale_bytes, scale_eff):
    """Row buffer float32 [K] -> scale_bytes int64 [K/16], scale_eff float32 [K/16]; returns
    the number of blocks holding NaN/Inf. A NaN block gets byte 0x7F and scale_eff NaN; an Inf
    block has amax Inf (clamped to 448: its Inf values saturate).

    ``amax`` is the max of ``bits & 0x7FFFFFFF`` (for non-negative floats the integer order is the
    float order, and NaN sorts above Inf), which vectorizes where a float max does not.
    """
    n_blocks = row.shape[0] // FP4_BLOCK_SIZE
    for b in range(n_blocks):
        amax_bits = 0
        for j in range(FP4_BLOCK_SIZE):
            amax_bits = max(amax_bits, _f32_bits(row[b * FP4_BLOCK_SIZE + j]) & 0x7FFFFFFF)
        scale_bytes[b] = amax_bits  # temporarily: the block's amax bits
    bad = 0
    for b in range(n_blocks):
        amax_bits = scale_bytes[b]
        if amax_bits >= 0x7F800000:
            bad += 1
            if amax_bits > 0x7F800000:
                scale_bytes[b] = 0x7F
                scale_eff[b] = _F32_NAN
                continue
        scale_f32 = gs * (_f32_from_bits(amax_bits) / _F32_SIX)
        if scale_f32 > _F32_FP8_MAX:
            scale_f32 = _F32_FP8_MAX
        byte = _fp8_e4m3_encode(scale_f32)
        scale_bytes[b] = byte
        scale_eff[b] = fp8_decode[byte] / gs
    return bad


# --------------------------------------------------------------------------- serial row kernels


@_jit()
def _amax_rows(x, mode, f16_table, row0, row1):
    """(max |x| over rows [row0, row1) as float32, 1 if any value is NaN/Inf else 0)."""
    row = np.empty(x.shape[1], dtype=np.float32)
    amax_bits = 0
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        for c in range(row.shape[0]):
            amax_bits = max(amax_bits, _f32_bits(row[c]) & 0x7FFFFFFF)
    if amax_bits >= 0x7F800000:
        return _F32_ZERO, 1
    return _f32_from_bits(amax_bits), 0


@_jit(inline=True)
def _use_given_scales(given, r, gs, fp8_decode, scale_bytes, scale_eff):
    """Replace the row's amax scales by the caller's bytes ``given[r]`` when ``given`` has
    rows (an empty [0, 0] array means "no block scales given")."""
    if given.shape[0] > 0:
        for b in range(scale_bytes.shape[0]):
            byte = np.int64(given[r, b])
            scale_bytes[b] = byte
            scale_eff[b] = fp8_decode[byte] / gs


@_jit()
def _quantize_rows(x, mode, f16_table, gs, fp8_decode, given, packed, scale, row0, row1):
    """Quantize+pack rows [row0, row1): packed uint8 [R, K/2], scale bytes uint8 [R, K/16]
    (``given`` uint8 [R, K/16]: use these block scales; [0, 0]: amax scales).
    Returns the number of blocks holding NaN/Inf (their outputs are meaningless)."""
    k = x.shape[1]
    n_blocks = k // FP4_BLOCK_SIZE
    row = np.empty(k, dtype=np.float32)
    codes = np.empty(k, dtype=np.uint8)
    scale_bytes = np.empty(n_blocks, dtype=np.int64)
    scale_eff = np.empty(n_blocks, dtype=np.float32)
    bad = 0
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        bad += _row_block_scales(row, gs, fp8_decode, scale_bytes, scale_eff)
        _use_given_scales(given, r, gs, fp8_decode, scale_bytes, scale_eff)
        for b in range(n_blocks):
            scale[r, b] = scale_bytes[b]
            divisor = scale_eff[b]
            base = b * FP4_BLOCK_SIZE
            if divisor == _F32_ZERO or divisor != divisor:  # zero/underflow (or NaN): codes 0
                for j in range(FP4_BLOCK_SIZE):
                    codes[base + j] = 0
            else:
                for j in range(FP4_BLOCK_SIZE):
                    codes[base + j] = _e2m1_encode(row[base + j] / divisor)
        for i in range(k // 2):
            packed[r, i] = codes[2 * i] | (codes[2 * i + 1] << 4)
    return bad


@_jit()
def _fake_quantize_rows(x, mode, f16_table, gs, fp8_decode, given, out, row0, row1):
    """dequant(quant(x)) for rows [row0, row1) into out (same mode as x; ``given`` as in
    ``_quantize_rows``). A block holding NaN decodes to NaN, ±Inf saturates (as the
    reference); returns the number of such blocks."""
    k = x.shape[1]
    n_blocks = k // FP4_BLOCK_SIZE
    row = np.empty(k, dtype=np.float32)
    scale_bytes = np.empty(n_blocks, dtype=np.int64)
    scale_eff = np.empty(n_blocks, dtype=np.float32)
    bad = 0
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        bad += _row_block_scales(row, gs, fp8_decode, scale_bytes, scale_eff)
        _use_given_scales(given, r, gs, fp8_decode, scale_bytes, scale_eff)
        for b in range(n_blocks):
            factor = scale_eff[b]
            base = b * FP4_BLOCK_SIZE
            if factor == _F32_ZERO or factor != factor:  # zero block -> +0; NaN block -> NaN
                for j in range(FP4_BLOCK_SIZE):
                    row[base + j] = factor
            else:
                for j in range(FP4_BLOCK_SIZE):
                    row[base + j] = _e2m1_round(row[base + j] / factor) * factor
        _store_row(row, out, r, mode)
    return bad


@_jit()
def _dequantize_rows(packed, scale, gs, fp8_decode, e2m1_values, out, mode, row0, row1):
    """packed uint8 [R, K/2] + scale bytes uint8 [R, K/16] -> out rows [row0, row1)."""
    k = out.shape[1]
    row = np.empty(k, dtype=np.float32)
    for r in range(row0, row1):
        for b in range(k // FP4_BLOCK_SIZE):
            scale_eff = fp8_decode[np.int64(scale[r, b])] / gs
            base = b * FP4_BLOCK_SIZE
            for j in range(FP4_BLOCK_SIZE // 2):
                byte = np.int64(packed[r, b * (FP4_BLOCK_SIZE // 2) + j])
                row[base + 2 * j] = e2m1_values[byte & 15] * scale_eff
                row[base + 2 * j + 1] = e2m1_values[byte >> 4] * scale_eff
        _store_row(row, out, r, mode)


@_jit(inline=True)
def _block_amax_bits(row, base):
    """max of ``bits & 0x7FFFFFFF`` over row[base:base+16] (>= 0x7F800000: NaN/Inf inside)."""
    amax_bits = 0
    for j in range(FP4_BLOCK_SIZE):
        amax_bits = max(amax_bits, _f32_bits(row[base + j]) & 0x7FFFFFFF)
    return amax_bits


@_jit(inline=True)
def _amax_scale_byte(amax, gs, divisor):
    """``fp8(min(gs * (amax / divisor), 448))`` as an E4M3 byte (divisor 6: round-to-nearest,
    4: Four Over Six)."""
    scale_f32 = gs * (amax / divisor)
    if scale_f32 > _F32_FP8_MAX:
        scale_f32 = _F32_FP8_MAX
    return _fp8_e4m3_encode(scale_f32)


@_jit()
def _search_rows(x, mode, f16_table, gs, fp8_decode, weights, offsets, out, row0, row1):
    """MSE block-scale search for rows [row0, row1) -> out uint8 [R, K/16] (chosen bytes).

    ``weights`` float64 [K] (per-column importance), ``offsets`` int64 [C]: the candidates in
    trial order (``ScaleCandidates.order()``). Same float32/float64 arithmetic and order as
    ``kernels.reference.search_nvfp4_block_scales_reference``. The float32 decode of a block
    and its float64 error are two loops (the first vectorizes; measured 1.5x faster than one
    fused loop). Returns the number of blocks holding NaN/Inf."""
    k = x.shape[1]
    n_blocks = k // FP4_BLOCK_SIZE
    row = np.empty(k, dtype=np.float32)
    decoded = np.zeros(FP4_BLOCK_SIZE, dtype=np.float32)
    bad = 0
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        for b in range(n_blocks):
            base = b * FP4_BLOCK_SIZE
            amax_bits = _block_amax_bits(row, base)
            if amax_bits >= 0x7F800000:
                bad += 1
                out[r, b] = 0
                continue
            amax = _f32_from_bits(amax_bits)
            rtn = _amax_scale_byte(amax, gs, _F32_SIX)
            best_byte = rtn
            best_error = np.inf
            for j in range(offsets.shape[0]):
                offset = offsets[j]
                if offset == FOUR_OVER_SIX_CANDIDATE:
                    byte = _amax_scale_byte(amax, gs, _F32_FOUR)
                else:
                    byte = rtn + offset
                    if offset != 0 and (byte < 1 or byte > FP8_E4M3_MAX_BYTE):
                        continue
                scale_eff = fp8_decode[byte] / gs
                if scale_eff == _F32_ZERO:
                    decoded[:] = _F32_ZERO
                else:
                    for i in range(FP4_BLOCK_SIZE):
                        decoded[i] = _e2m1_round(row[base + i] / scale_eff) * scale_eff
                error = 0.0
                for i in range(FP4_BLOCK_SIZE):  # sequential, as the reference
                    diff = np.float64(row[base + i]) - np.float64(decoded[i])
                    error += (diff * diff) * weights[base + i]
                if j == 0 or error < best_error:
                    best_error = error
                    best_byte = byte
            out[r, b] = best_byte
    return bad


@_jit(inline=True)
def _fp8_e4m3_encode_signed(value):
    """float32 -> E4M3 byte as torch's ``clamp(v, -448, 448).to(float8_e4m3fn)`` (NaN -> 0x7F,
    a negative that rounds to zero -> 0x80)."""
    if value != value:
        return 0x7F
    magnitude = abs(value)
    if magnitude > _F32_FP8_MAX:
        magnitude = _F32_FP8_MAX
    byte = _fp8_e4m3_encode(magnitude)
    return byte | 0x80 if value < _F32_ZERO else byte


@_jit(inline=True)
def _round_to_mode(value, mode, f16_table):
    """float32 -> the nearest value of the row dtype (bf16/fp16 RNE, as torch), as float32."""
    if mode == MODE_BF16:
        return _f32_from_bits(np.int64(_bf16_bits(value)) << 16)
    if mode == MODE_F16:
        return f16_table[np.int64(_f16_bits(value))]
    return value


@_jit()
def _fp8_weight_rows(x, mode, f16_table, q, scales, row0, row1):
    """FP8 per-channel quantization of rows [row0, row1): q uint8 [R, K] (E4M3 bytes),
    scales float32 [R]. Returns the number of rows holding NaN/Inf."""
    k = x.shape[1]
    row = np.empty(k, dtype=np.float32)
    bad = 0
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        amax_bits = 0
        for c in range(k):
            amax_bits = max(amax_bits, _f32_bits(row[c]) & 0x7FFFFFFF)
        if amax_bits >= 0x7F800000:
            bad += 1
            continue
        scale = _f32_from_bits(amax_bits) / _F32_FP8_MAX
        if scale == _F32_ZERO:
            scale = _F32_EPS
        scales[r] = scale
        for c in range(k):
            q[r, c] = _fp8_e4m3_encode_signed(row[c] / scale + _F32_ZERO)
    return bad


@_jit()
def _fp8_dequantize_rows(q, scales, fp8_decode, out, mode, row0, row1):
    """E4M3 bytes q uint8 [R, K] * scales float32 [R] -> out rows [row0, row1)."""
    k = q.shape[1]
    row = np.empty(k, dtype=np.float32)
    for r in range(row0, row1):
        scale = scales[r]
        for c in range(k):
            row[c] = fp8_decode[np.int64(q[r, c])] * scale
        _store_row(row, out, r, mode)


@_jit()
def _fp8_activation_rows(x, mode, f16_table, fp8_decode, eps, out, row0, row1):
    """Per-token FP8 fake-quant of rows [row0, row1) into out (same mode as x), every step
    rounded to x's dtype as torch does (``fake_quantize_fp8_activation_per_token_reference``)."""
    k = x.shape[1]
    row = np.empty(k, dtype=np.float32)
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        amax_bits = 0
        for c in range(k):
            amax_bits = max(amax_bits, _f32_bits(row[c]) & 0x7FFFFFFF)  # NaN sorts above Inf
        scale = _round_to_mode(_f32_from_bits(amax_bits) / _F32_FP8_MAX, mode, f16_table)
        if scale == _F32_ZERO:
            scale = eps
        for c in range(k):
            scaled = _round_to_mode(row[c] / scale, mode, f16_table) + _F32_ZERO
            byte = _fp8_e4m3_encode_signed(scaled)
            row[c] = _round_to_mode(fp8_decode[byte] * scale, mode, f16_table)
        _store_row(row, out, r, mode)


# --------------------------------------------------------------------------- parallel drivers


@_jit(parallel=True)
def _amax_parallel(x, mode, f16_table, n_chunks):
    rows = x.shape[0]
    amaxes = np.zeros(n_chunks, dtype=np.float32)
    bad = 0
    for c in prange(n_chunks):
        amax, chunk_bad = _amax_rows(
            x, mode, f16_table, c * rows // n_chunks, (c + 1) * rows // n_chunks
        )
        amaxes[c] = amax
        bad += chunk_bad
    return amaxes.max(), bad


@_jit(parallel=True)
def _quantize_parallel(x, mode, f16_table, gs, fp8_decode, given, packed, scale, n_chunks):
    rows = x.shape[0]
    bad = 0
    for c in prange(n_chunks):
        bad += _quantize_rows(
            x,
            mode,
            f16_table,
            gs,
            fp8_decode,
            given,
            packed,
            scale,
            c * rows // n_chunks,
            (c + 1) * rows // n_chunks,
        )
    return bad


@_jit(parallel=True)
def _fake_quantize_parallel(x, mode, f16_table, gs, fp8_decode, given, out, n_chunks):
    rows = x.shape[0]
    bad = 0
    for c in prange(n_chunks):
        bad += _fake_quantize_rows(
            x,
            mode,
            f16_table,
            gs,
            fp8_decode,
            given,
            out,
            c * rows // n_chunks,
            (c + 1) * rows // n_chunks,
        )
    return bad


@_jit(parallel=True)
def _dequantize_parallel(packed, scale, gs, fp8_decode, e2m1_values, out, mode, n_chunks):
    rows = out.shape[0]
    for c in prange(n_chunks):
        _dequantize_rows(
            packed,
            scale,
            gs,
            fp8_decode,
            e2m1_values,
            out,
            mode,
            c * rows // n_chunks,
            (c + 1) * rows // n_chunks,
        )


@_jit(parallel=True)
def _search_parallel(x, mode, f16_table, gs, fp8_decode, weights, offsets, out, n_chunks):
    rows = x.shape[0]
    bad = 0
    for c in prange(n_chunks):
        bad += _search_rows(
            x,
            mode,
            f16_table,
            gs,
            fp8_decode,
            weights,
            offsets,
            out,
            c * rows // n_chunks,
            (c + 1) * rows // n_chunks,
        )
    return bad


@_jit(parallel=True)
def _fp8_weight_parallel(x, mode, f16_table, q, scales, n_chunks):
    rows = x.shape[0]
    bad = 0
    for c in prange(n_chunks):
        bad += _fp8_weight_rows(
            x, mode, f16_table, q, scales, c * rows // n_chunks, (c + 1) * rows // n_chunks
        )
    return bad


@_jit(parallel=True)
def _fp8_dequantize_parallel(q, scales, fp8_decode, out, mode, n_chunks):
    rows = q.shape[0]
    for c in prange(n_chunks):
        _fp8_dequantize_rows(
            q, scales, fp8_decode, out, mode, c * rows // n_chunks, (c + 1) * rows // n_chunks
        )


@_jit(parallel=True)
def _fp8_activation_parallel(x, mode, f16_table, fp8_decode, eps, out, n_chunks):
    rows = x.shape[0]
    for c in prange(n_chunks):
        _fp8_activation_rows(
            x,
            mode,
            f16_table,
            fp8_decode,
            eps,
            out,
            c * rows // n_chunks,
            (c + 1) * rows // n_chunks,
        )


# --------------------------------------------------------------------------- host side

#: float32 value of every FP8 E4M3 byte (torch's decode).
_FP8_DECODE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
_FP8_DECODE = _FP8_DECODE.to(torch.float32).numpy()
#: float32 value of every E2M1 code (code 8 is -0.0).
_E2M1_VALUES = E2M1_SIGNED_VALUES.numpy().astype(np.float32)
#: float32 value of every float16 bit pattern (torch's exact widening).
_F16_TABLE = (
    torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float().numpy()
)

# numba's threading layer: ``workqueue`` unless NUMBA_THREADING_LAYER says otherwise. Its idle
# threads sleep; the ``omp`` layer's spinning GNU OpenMP threads fight torch's own OpenMP pool on
# a busy machine (measured on 2 shared cores with the default OMP_WAIT_POLICY: quantizing the 210
# SmolLM2 weights took 10 s through omp prange kernels vs 0.25 s through workqueue or serially).
# workqueue is not thread safe: ``_Launch`` lets one thread at a time run a prange kernel.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

_IMPORT_PID = os.getpid()
_PARALLEL_LOCK = threading.Lock()


def _thread_count() -> int:
    """Threads for the prange kernels: torch's intra-op setting, capped by numba's pool."""
    return min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


class _Launch:
    """Context: decides serial vs parallel for one call and holds the parallel slot if taken."""

    def __init__(self, rows: int, elements: int) -> None:
        self.n_chunks = 0
        self._locked = False
        if rows < 2 or elements < PARALLEL_MIN_ELEMENTS or os.getpid() != _IMPORT_PID:
            return
        threads = _thread_count()
        if threads < 2 or not _PARALLEL_LOCK.acquire(blocking=False):
            return
        self._locked = True
        numba.set_num_threads(threads)
        self.n_chunks = min(rows, threads * CHUNKS_PER_THREAD)

    @property
    def parallel(self) -> bool:
        return self._locked

    def __enter__(self) -> _Launch:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._locked:
            _PARALLEL_LOCK.release()


def _as_numpy(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A contiguous CPU float32/bf16/fp16 tensor -> (numpy view of its storage, mode)."""
    mode = _NATIVE_MODES[t.dtype]
    view = t.view(torch.uint16) if mode != MODE_F32 else t
    return view.numpy(), mode


def _native_2d(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` as a contiguous [R, k] CPU tensor in a dtype the kernels read (float32 otherwise)."""
    t = t.detach()
    if t.device.type != "cpu":
        raise _not_cpu(t)
    if t.dtype not in _NATIVE_MODES:
        t = t.to(torch.float32)  # as the reference's .to(float32)
    return t.reshape(-1, k).contiguous()


def _not_cpu(t: torch.Tensor) -> NVFP4Error:
    return NVFP4Error(f"the numba backend runs on CPU tensors only, got device {t.device}")


def _tensor_amax(x: np.ndarray, mode: int) -> tuple[np.float32, int]:
    rows = x.shape[0]
    with _Launch(rows, x.size) as launch:
        if launch.parallel:
            return _amax_parallel(x, mode, _F16_TABLE, launch.n_chunks)
        return _amax_rows(x, mode, _F16_TABLE, 0, rows)


def _weight_global_scale(
    x: np.ndarray, mode: int, weight: torch.Tensor, global_scale, name: str
) -> torch.Tensor:
    """The caller's global scale, or ``448*6/amax`` from one read-only pass (raising on NaN/Inf)."""
    if global_scale is not None:
        return as_global_scale(global_scale, weight.device)
    amax, bad = _tensor_amax(x, mode)
    if bad:
        raise non_finite_error(weight, name)
    return global_scale_from_amax(torch.tensor(float(amax), dtype=torch.float32))


#: "No block scales given" for the kernels' ``given`` argument.
_NO_GIVEN_SCALES = np.empty((0, 0), dtype=np.uint8)


def _given_scales(block_scale: torch.Tensor | None, weight: torch.Tensor, name: str) -> np.ndarray:
    if block_scale is None:
        return _NO_GIVEN_SCALES
    return check_block_scale(block_scale, weight, name).view(torch.uint8).contiguous().numpy()


@torch.no_grad()
def quantize_nvfp4_numba(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
) -> NVFP4Weight:
    """Same contract and bytes as ``quantize_nvfp4_reference``: a finite 2-D CPU float weight
    [out, in] (in % 16 == 0, any float dtype/strides) -> packed triple."""
    check_weight_layout(weight, name)
    out_features, in_features = weight.shape
    x_t = _native_2d(weight, in_features)
    x, mode = _as_numpy(x_t)
    given = _given_scales(block_scale, weight, name)
    gs = _weight_global_scale(x, mode, weight, global_scale, name)
    gs_value = np.float32(gs.item())
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    scale = torch.empty(out_features, in_features // FP4_BLOCK_SIZE, dtype=torch.uint8)
    args = (x, mode, _F16_TABLE, gs_value, _FP8_DECODE, given, packed.numpy(), scale.numpy())
    with _Launch(out_features, x.size) as launch:
        if launch.parallel:
            bad = _quantize_parallel(*args, launch.n_chunks)
        else:
            bad = _quantize_rows(*args, 0, out_features)
    if bad:
        raise non_finite_error(weight, name)
    return NVFP4Weight(packed, scale.view(torch.float8_e4m3fn), gs)


def _fake_quantize_2d(
    x_t: torch.Tensor, gs_value: np.float32, given: np.ndarray = _NO_GIVEN_SCALES
) -> tuple[torch.Tensor, int]:
    """x_t contiguous [R, K] native dtype -> (fake-quantized [R, K] same dtype, non-finite count)."""
    x, mode = _as_numpy(x_t)
    out_t = torch.empty_like(x_t)
    out, _ = _as_numpy(out_t)
    args = (x, mode, _F16_TABLE, gs_value, _FP8_DECODE, given, out)
    with _Launch(x.shape[0], x.size) as launch:
        if launch.parallel:
            bad = _fake_quantize_parallel(*args, launch.n_chunks)
        else:
            bad = _fake_quantize_rows(*args, 0, x.shape[0])
    return out_t, bad


@torch.no_grad()
def fake_quantize_nvfp4_weight_numba(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype and shape, fused in one pass."""
    check_weight_layout(weight, name)
    in_features = weight.shape[1]
    x_t = _native_2d(weight, in_features)
    given = _given_scales(block_scale, weight, name)
    gs = _weight_global_scale(*_as_numpy(x_t), weight, global_scale, name)
    out, bad = _fake_quantize_2d(x_t, np.float32(gs.item()), given)
    if bad:
        raise non_finite_error(weight, name)
    return out.to(weight.dtype).reshape(weight.shape)


@torch.no_grad()
def fake_quantize_nvfp4_activation_numba(
    x: torch.Tensor, input_global_scale: torch.Tensor | float
) -> torch.Tensor:
    """W4A4 emulation of a CPU activation ``x [..., K]`` (K % 16 == 0); same shape and dtype.
    Like the reference, a block holding NaN decodes to NaN and ±Inf saturates (no error)."""
    check_block_dim(x.shape[-1], "activation")
    gs = as_global_scale(input_global_scale, x.device)
    x_t = _native_2d(x, x.shape[-1])
    out, _ = _fake_quantize_2d(x_t, np.float32(gs.item()))
    return out.to(x.dtype).reshape(x.shape)


@torch.no_grad()
def dequantize_nvfp4_numba(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Decode a CPU packed triple to ``dtype`` [out, in] (``E2M1[code] * fp32(scale) / gs``)."""
    out_features, in_features = check_packed(weight_packed, weight_scale, weight_global_scale)
    if weight_packed.device.type != "cpu":
        raise _not_cpu(weight_packed)
    packed = weight_packed.contiguous().numpy()
    scale = weight_scale.view(torch.uint8).contiguous().numpy()
    gs_value = np.float32(weight_global_scale.reshape(1).to(torch.float32).item())
    native = dtype if dtype in _NATIVE_MODES else torch.float32
    out_t = torch.empty(out_features, in_features, dtype=native)
    out, mode = _as_numpy(out_t)
    args = (packed, scale, gs_value, _FP8_DECODE, _E2M1_VALUES, out, mode)
    with _Launch(out_features, out.size) as launch:
        if launch.parallel:
            _dequantize_parallel(*args, launch.n_chunks)
        else:
            _dequantize_rows(*args, 0, out_features)
    return out_t if native == dtype else out_t.to(dtype)


@torch.no_grad()
def nvfp4_w4a16_matmul_numba(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
) -> torch.Tensor:
    """``x [..., K] @ dequant(W).T -> [..., out]`` in x's dtype (fp32 dequant + torch matmul)."""
    weight = dequantize_nvfp4_numba(
        weight_packed, weight_scale, weight_global_scale, dtype=torch.float32
    )
    check_matmul_shapes(x, weight.shape[1])
    return (x.to(torch.float32) @ weight.T).to(x.dtype)


#: The search evaluates every candidate: it goes parallel on inputs this many times smaller.
SEARCH_PARALLEL_DISCOUNT = 16


@torch.no_grad()
def search_nvfp4_block_scales_numba(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    importance: torch.Tensor | None = None,
    candidates: ScaleCandidates = DEFAULT_SCALE_CANDIDATES,
    name: str = "weight",
) -> torch.Tensor:
    """Same contract and bytes as ``search_nvfp4_block_scales_reference`` (CPU tensors)."""
    check_weight_layout(weight, name)
    out_features, in_features = weight.shape
    x_t = _native_2d(weight, in_features)
    x, mode = _as_numpy(x_t)
    gs = _weight_global_scale(x, mode, weight, global_scale, name)
    weights = resolve_importance(importance, in_features, torch.device("cpu"), name).numpy()
    offsets = np.asarray(candidates.order(), dtype=np.int64)
    out = torch.empty(out_features, in_features // FP4_BLOCK_SIZE, dtype=torch.uint8)
    args = (x, mode, _F16_TABLE, np.float32(gs.item()), _FP8_DECODE, weights, offsets, out.numpy())
    with _Launch(out_features, x.size * SEARCH_PARALLEL_DISCOUNT) as launch:
        if launch.parallel:
            bad = _search_parallel(*args, launch.n_chunks)
        else:
            bad = _search_rows(*args, 0, out_features)
    if bad:
        raise non_finite_error(weight, name)
    return out.view(torch.float8_e4m3fn)


@torch.no_grad()
def quantize_fp8_per_channel_numba(weight: torch.Tensor, *, name: str = "weight") -> FP8Weight:
    """Same contract and bytes as ``quantize_fp8_per_channel_reference`` (CPU tensors)."""
    check_matrix_layout(weight, name)  # finiteness is counted by the kernel
    out_features, in_features = weight.shape
    x, mode = _as_numpy(_native_2d(weight, in_features))
    q = torch.empty(out_features, in_features, dtype=torch.uint8)
    scales = torch.empty(out_features, 1, dtype=torch.float32)
    args = (x, mode, _F16_TABLE, q.numpy(), scales.numpy().reshape(-1))
    with _Launch(out_features, x.size) as launch:
        if launch.parallel:
            bad = _fp8_weight_parallel(*args, launch.n_chunks)
        else:
            bad = _fp8_weight_rows(*args, 0, out_features)
    if bad:
        raise non_finite_error(weight, name)
    return FP8Weight(q.view(torch.float8_e4m3fn), scales)


@torch.no_grad()
def dequantize_fp8_numba(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Same contract and bits as ``dequantize_fp8_reference`` (CPU tensors)."""
    out_features, in_features = check_fp8_weight(weight, weight_scale)
    if weight.device.type != "cpu":
        raise _not_cpu(weight)
    q = weight.view(torch.uint8).contiguous().numpy()
    scales = weight_scale.detach().to(torch.float32).reshape(-1).contiguous().numpy()
    native = dtype if dtype in _NATIVE_MODES else torch.float32
    out_t = torch.empty(out_features, in_features, dtype=native)
    out, mode = _as_numpy(out_t)
    args = (q, scales, _FP8_DECODE, out, mode)
    with _Launch(out_features, out.size) as launch:
        if launch.parallel:
            _fp8_dequantize_parallel(*args, launch.n_chunks)
        else:
            _fp8_dequantize_rows(*args, 0, out_features)
    return out_t if native == dtype else out_t.to(dtype)


@torch.no_grad()
def fake_quantize_fp8_weight_numba(weight: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """``dequantize_fp8(quantize_fp8_per_channel(weight))`` in ``weight``'s dtype and shape."""
    return dequantize_fp8_numba(*quantize_fp8_per_channel_numba(weight, name=name), weight.dtype)


@torch.no_grad()
def fake_quantize_fp8_activation_per_token_numba(x: torch.Tensor) -> torch.Tensor:
    """Same contract and bits as ``fake_quantize_fp8_activation_per_token_reference`` for a
    CPU float32/bf16/fp16 ``x`` (other dtypes: the reference)."""
    if x.dtype not in _NATIVE_MODES or x.ndim < 1 or x.shape[-1] == 0:
        return fake_quantize_fp8_activation_per_token_reference(x)
    x_t = _native_2d(x, x.shape[-1])
    x_np, mode = _as_numpy(x_t)
    out_t = torch.empty_like(x_t)
    out, _ = _as_numpy(out_t)
    eps = np.float32(torch.finfo(x.dtype).eps)
    args = (x_np, mode, _F16_TABLE, _FP8_DECODE, eps, out)
    with _Launch(x_np.shape[0], x_np.size) as launch:
        if launch.parallel:
            _fp8_activation_parallel(*args, launch.n_chunks)
        else:
            _fp8_activation_rows(*args, 0, x_np.shape[0])
    return out_t.reshape(x.shape)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel specialization; a no-op when done once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in _NATIVE_MODES:
            for rows in (1, max(2, PARALLEL_MIN_ELEMENTS // 1024)):  # serial and parallel
                weight = torch.ones(rows, 1024, dtype=dtype)
                packed = quantize_nvfp4_numba(weight)
                dequantize_nvfp4_numba(*packed, dtype=dtype)
                fake_quantize_nvfp4_weight_numba(weight)
                scales = search_nvfp4_block_scales_numba(weight[: max(1, rows // 16)])
                quantize_nvfp4_numba(weight[: scales.shape[0]], block_scale=scales)
                fake_quantize_fp8_weight_numba(weight)
                fake_quantize_fp8_activation_per_token_numba(weight)
