"""Fused single-pass CPU NVFP4 kernels (numba). Must equal ``kernels.reference`` bit for bit.

Each op reads its input once per row into a float32 row buffer (bf16 -> fp32 is a 16-bit shift,
fp16 -> fp32 a table lookup, both exact, as torch's casts), then does the reference's float32
arithmetic in the reference's order, block by block: ``amax``, ``gs * (amax / 6)``, clamp at 448,
FP8 E4M3 encode with integer ops (RNE, subnormals), ``scale_eff = fp32(fp8) / gs``,
``x / scale_eff`` and E2M1 rounding by comparisons. Outputs are written straight into torch-owned
buffers (numpy views); fp32 -> bf16/fp16 stores round to nearest even with integer ops, as torch.

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
    E2M1_SIGNED_VALUES,
    FP4_BLOCK_SIZE,
    NVFP4Error,
    NVFP4Weight,
    as_global_scale,
    check_block_dim,
    check_packed,
    check_weight_layout,
    global_scale_from_amax,
    non_finite_error,
)
from kernels.reference import check_matmul_shapes

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
_F32_SIX = np.float32(6.0)
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


@_jit()
def _quantize_rows(x, mode, f16_table, gs, fp8_decode, packed, scale, row0, row1):
    """Quantize+pack rows [row0, row1): packed uint8 [R, K/2], scale bytes uint8 [R, K/16].
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
def _fake_quantize_rows(x, mode, f16_table, gs, fp8_decode, out, row0, row1):
    """dequant(quant(x)) for rows [row0, row1) into out (same mode as x). A block holding NaN
    decodes to NaN, ±Inf saturates (as the reference); returns the number of such blocks."""
    k = x.shape[1]
    n_blocks = k // FP4_BLOCK_SIZE
    row = np.empty(k, dtype=np.float32)
    scale_bytes = np.empty(n_blocks, dtype=np.int64)
    scale_eff = np.empty(n_blocks, dtype=np.float32)
    bad = 0
    for r in range(row0, row1):
        _load_row(x, r, mode, f16_table, row)
        bad += _row_block_scales(row, gs, fp8_decode, scale_bytes, scale_eff)
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
def _quantize_parallel(x, mode, f16_table, gs, fp8_decode, packed, scale, n_chunks):
    rows = x.shape[0]
    bad = 0
    for c in prange(n_chunks):
        bad += _quantize_rows(
            x,
            mode,
            f16_table,
            gs,
            fp8_decode,
            packed,
            scale,
            c * rows // n_chunks,
            (c + 1) * rows // n_chunks,
        )
    return bad


@_jit(parallel=True)
def _fake_quantize_parallel(x, mode, f16_table, gs, fp8_decode, out, n_chunks):
    rows = x.shape[0]
    bad = 0
    for c in prange(n_chunks):
        bad += _fake_quantize_rows(
            x,
            mode,
            f16_table,
            gs,
            fp8_decode,
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


@torch.no_grad()
def quantize_nvfp4_numba(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
) -> NVFP4Weight:
    """Same contract and bytes as ``quantize_nvfp4_reference``: a finite 2-D CPU float weight
    [out, in] (in % 16 == 0, any float dtype/strides) -> packed triple."""
    check_weight_layout(weight, name)
    out_features, in_features = weight.shape
    x_t = _native_2d(weight, in_features)
    x, mode = _as_numpy(x_t)
    if global_scale is None:
        amax, bad = _tensor_amax(x, mode)
        if bad:
            raise non_finite_error(weight, name)
        gs = global_scale_from_amax(torch.tensor(float(amax), dtype=torch.float32))
    else:
        gs = as_global_scale(global_scale, weight.device)
    gs_value = np.float32(gs.item())
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    scale = torch.empty(out_features, in_features // FP4_BLOCK_SIZE, dtype=torch.uint8)
    args = (x, mode, _F16_TABLE, gs_value, _FP8_DECODE, packed.numpy(), scale.numpy())
    with _Launch(out_features, x.size) as launch:
        if launch.parallel:
            bad = _quantize_parallel(*args, launch.n_chunks)
        else:
            bad = _quantize_rows(*args, 0, out_features)
    if bad:
        raise non_finite_error(weight, name)
    return NVFP4Weight(packed, scale.view(torch.float8_e4m3fn), gs)


def _fake_quantize_2d(x_t: torch.Tensor, gs_value: np.float32) -> tuple[torch.Tensor, int]:
    """x_t contiguous [R, K] native dtype -> (fake-quantized [R, K] same dtype, non-finite count)."""
    x, mode = _as_numpy(x_t)
    out_t = torch.empty_like(x_t)
    out, _ = _as_numpy(out_t)
    args = (x, mode, _F16_TABLE, gs_value, _FP8_DECODE, out)
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
) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype and shape, fused in one pass."""
    check_weight_layout(weight, name)
    in_features = weight.shape[1]
    x_t = _native_2d(weight, in_features)
    if global_scale is None:
        amax, bad = _tensor_amax(*_as_numpy(x_t))
        if bad:
            raise non_finite_error(weight, name)
        gs = global_scale_from_amax(torch.tensor(float(amax), dtype=torch.float32))
    else:
        gs = as_global_scale(global_scale, weight.device)
    out, bad = _fake_quantize_2d(x_t, np.float32(gs.item()))
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
