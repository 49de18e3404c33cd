"""Public ops: one function per op, dispatched to the Triton kernels, the fused numba CPU
kernels, the vectorized-torch path (``kernels.torch_backend``) or the pure-torch reference.

``FP4ROLL_KERNEL_BACKEND`` (read at every call) forces a path: ``reference`` | ``torch``
(vectorized torch, also valid on CUDA) | ``numba`` (fused CPU kernels; CPU tensors only) |
``triton`` (on CPU only through Triton's interpreter, ``TRITON_INTERPRET=1`` set before
``kernels`` is imported) | ``auto`` (default: CUDA tensors -> Triton when it is importable; CPU
tensors -> numba when it is importable, else torch). All paths give identical bytes; see
``kernels.reference`` for the numerics and the decided edge cases.

Ops without a kernel in a backend run its nearest path: ``round_to_nvfp4_grid`` is vectorized
torch everywhere but ``reference`` (it is called on [out, 1..128] column slices); the FP8 ops
have no Triton kernel (``triton`` runs them in torch, which also works on CUDA tensors).
"""

from __future__ import annotations

import functools
import logging
import os
from enum import Enum

import torch

from kernels import reference, torch_backend
from kernels.formats import (
    DEFAULT_SCALE_CANDIDATES,
    FP8Weight,
    NVFP4Error,
    NVFP4Weight,
    ScaleCandidates,
)

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "FP4ROLL_KERNEL_BACKEND"


class KernelBackend(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    TORCH = "torch"
    NUMBA = "numba"
    TRITON = "triton"


def requested_backend() -> KernelBackend:
    """The backend forced by ``FP4ROLL_KERNEL_BACKEND`` (default ``auto``)."""
    raw = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    try:
        return KernelBackend(raw)
    except ValueError:
        allowed = ", ".join(b.value for b in KernelBackend)
        raise NVFP4Error(f"{BACKEND_ENV_VAR}={raw!r} is not one of: {allowed}") from None


def triton_available() -> bool:
    """True when the Triton kernels can be imported (they are imported lazily)."""
    try:
        from kernels import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def numba_available() -> bool:
    """True when the numba kernels can be imported (imported lazily, once: ~0.5 s for numba)."""
    try:
        from kernels import numba_kernels  # noqa: F401
    except ImportError as exc:
        logger.info("numba kernels unavailable (%s); CPU ops use vectorized torch", exc)
        return False
    return True


def resolve_backend(tensor: torch.Tensor) -> KernelBackend:
    """The concrete backend that will run an op on ``tensor``."""
    backend = requested_backend()
    if backend is KernelBackend.AUTO:
        if tensor.is_cuda:
            return KernelBackend.TRITON if triton_available() else KernelBackend.TORCH
        if tensor.device.type == "cpu" and numba_available():
            return KernelBackend.NUMBA
        return KernelBackend.TORCH
    return backend


def _numba():
    try:
        from kernels import numba_kernels
    except ImportError as exc:
        raise NVFP4Error(f"{BACKEND_ENV_VAR}=numba but numba is not importable: {exc}") from exc
    return numba_kernels


def _triton():
    try:
        from kernels import triton_kernels
    except ImportError as exc:
        raise NVFP4Error(f"{BACKEND_ENV_VAR}=triton but Triton is not importable: {exc}") from exc
    return triton_kernels


def global_scale_from_amax(amax: torch.Tensor | float, *, headroom: float = 1.0) -> torch.Tensor:
    """``(448*6/headroom)/amax`` float32 [1]; amax == 0 -> 1.0 (as compressed-tensors).
    ``headroom > 1`` lets the block-scale search go above round-to-nearest on every block."""
    return reference.global_scale_from_amax(amax, headroom=headroom)


def quantize_nvfp4(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
) -> NVFP4Weight:
    """Quantize a finite 2-D weight [out, in] (in % 16 == 0; any float dtype, any strides).

    ``global_scale`` None -> ``448*6/amax(weight)``. ``block_scale`` (float8_e4m3fn
    [out, in/16], finite, >= 0, e.g. from ``search_nvfp4_block_scales``): encode under these
    scales instead of the amax ones (values beyond ``±6 * scale`` saturate). Raises
    NVFP4ShapeError / NonFiniteWeightError naming ``name``.
    """
    kwargs = {"name": name, "block_scale": block_scale}
    backend = resolve_backend(weight)
    if backend is KernelBackend.TRITON:
        return _triton().quantize_nvfp4_triton(weight, global_scale, **kwargs)
    if backend is KernelBackend.NUMBA:
        return _numba().quantize_nvfp4_numba(weight, global_scale, **kwargs)
    if backend is KernelBackend.TORCH:
        return torch_backend.quantize_nvfp4_torch(weight, global_scale, **kwargs)
    return reference.quantize_nvfp4_reference(weight, global_scale, **kwargs)


def dequantize_nvfp4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Decode uint8 [out, in/2] + fp8 [out, in/16] + fp32 [1] to ``dtype`` [out, in]."""
    backend = resolve_backend(weight_packed)
    if backend is KernelBackend.TRITON:
        return _triton().dequantize_nvfp4_triton(
            weight_packed, weight_scale, weight_global_scale, dtype
        )
    if backend is KernelBackend.NUMBA:
        return _numba().dequantize_nvfp4_numba(
            weight_packed, weight_scale, weight_global_scale, dtype
        )
    if backend is KernelBackend.TORCH:
        return torch_backend.dequantize_nvfp4_torch(
            weight_packed, weight_scale, weight_global_scale, dtype
        )
    return reference.dequantize_nvfp4_reference(
        weight_packed, weight_scale, weight_global_scale, dtype
    )


def fake_quantize_nvfp4_weight(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
    block_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(weight))``, same dtype and shape (used by the KL sweep);
    ``block_scale`` as in ``quantize_nvfp4``."""
    kwargs = {"name": name, "block_scale": block_scale}
    backend = resolve_backend(weight)
    if backend is KernelBackend.TRITON:
        packed = _triton().quantize_nvfp4_triton(weight, global_scale, **kwargs)
        return _triton().dequantize_nvfp4_triton(*packed, weight.dtype)
    if backend is KernelBackend.NUMBA:
        return _numba().fake_quantize_nvfp4_weight_numba(weight, global_scale, **kwargs)
    if backend is KernelBackend.TORCH:
        return torch_backend.fake_quantize_nvfp4_weight_torch(weight, global_scale, **kwargs)
    return reference.fake_quantize_nvfp4_weight_reference(weight, global_scale, **kwargs)


def round_to_nvfp4_grid(values: torch.Tensor, scale_eff: torch.Tensor) -> torch.Tensor:
    """Each value rounded onto its block's NVFP4 grid, float32: ``E2M1[code(v / s)] * s``
    (RNE, saturating at ``±6 s``, ``s == 0`` -> 0), where ``scale_eff = fp32(block scale) / gs``
    broadcasts against ``values``. Bit-identical with ``dequantize_nvfp4(*quantize_nvfp4(w, gs,
    block_scale=S), float32)`` under the same scales; GPTQ calls it column by column."""
    if resolve_backend(values) is KernelBackend.REFERENCE:
        return reference.round_to_nvfp4_grid_reference(values, scale_eff)
    return torch_backend.round_to_nvfp4_grid_torch(values, scale_eff)


def search_nvfp4_block_scales(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    importance: torch.Tensor | None = None,
    candidates: ScaleCandidates = DEFAULT_SCALE_CANDIDATES,
    name: str = "weight",
) -> torch.Tensor:
    """MSE block-scale search: per 16-block, the FP8 E4M3 scale among ``candidates`` (around
    the round-to-nearest scale ``fp8(gs * amax_block / 6)``) minimising
    ``sum_k w_k (x_k - dq(x_k))**2``. Returns float8_e4m3fn [out, in/16] for
    ``quantize_nvfp4(weight, global_scale, block_scale=...)``.

    ``weight`` finite 2-D [out, in] (in % 16 == 0); ``global_scale`` None -> ``448*6/amax``
    (a fused group passes its shared one, with ``headroom`` to let the largest blocks go
    above round-to-nearest); ``importance`` float [in], finite, >= 0: the input's per-channel
    second moment E[x_k^2] from calibration (None = unweighted). Ties go to the first
    candidate in ``candidates.order()`` (round-to-nearest first). All backends give the same
    bytes (``kernels.reference``: float64 error summed in a fixed order).
    """
    kwargs = {"importance": importance, "candidates": candidates, "name": name}
    backend = resolve_backend(weight)
    if backend is KernelBackend.TRITON:
        return _triton().search_nvfp4_block_scales_triton(weight, global_scale, **kwargs)
    if backend is KernelBackend.NUMBA:
        return _numba().search_nvfp4_block_scales_numba(weight, global_scale, **kwargs)
    if backend is KernelBackend.TORCH:
        return torch_backend.search_nvfp4_block_scales_torch(weight, global_scale, **kwargs)
    return reference.search_nvfp4_block_scales_reference(weight, global_scale, **kwargs)


def quantize_fp8_per_channel(weight: torch.Tensor, *, name: str = "weight") -> FP8Weight:
    """FP8 (W8A8 tier) weight: float8_e4m3fn [out, in] and one float32 scale per output channel
    [out, 1], as compressed-tensors ``float-quantized`` (channel, symmetric) computes on the
    float32 weight. ``weight`` finite 2-D, any K. Raises NonFiniteWeightError naming ``name``."""
    if resolve_backend(weight) is KernelBackend.NUMBA:
        return _numba().quantize_fp8_per_channel_numba(weight, name=name)
    return reference.quantize_fp8_per_channel_reference(weight, name=name)


def dequantize_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``float32(weight) * weight_scale`` cast to ``dtype`` [out, in] (compressed-tensors'
    decompression of a ``float-quantized`` weight)."""
    if resolve_backend(weight) is KernelBackend.NUMBA:
        return _numba().dequantize_fp8_numba(weight, weight_scale, dtype)
    return reference.dequantize_fp8_reference(weight, weight_scale, dtype)


def fake_quantize_fp8_weight(weight: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """``dequantize_fp8(*quantize_fp8_per_channel(weight), weight.dtype)``."""
    if resolve_backend(weight) is KernelBackend.NUMBA:
        return _numba().fake_quantize_fp8_weight_numba(weight, name=name)
    return reference.fake_quantize_fp8_weight_reference(weight, name=name)


def fake_quantize_fp8_activation_per_token(x: torch.Tensor) -> torch.Tensor:
    """W8A8 emulation of ``x [..., K]``: dynamic FP8 E4M3 scale per token (``amax / 448``),
    arithmetic in x's dtype as compressed-tensors' ``token``/``dynamic`` forward; same shape
    and dtype."""
    if resolve_backend(x) is KernelBackend.NUMBA:
        return _numba().fake_quantize_fp8_activation_per_token_numba(x)
    return reference.fake_quantize_fp8_activation_per_token_reference(x)


def fake_quantize_nvfp4_activation(
    x: torch.Tensor, input_global_scale: torch.Tensor | float
) -> torch.Tensor:
    """W4A4 emulation of ``x [..., K]``: dynamic FP8 scale per 16 along K under the static
    ``input_global_scale``; same shape and dtype."""
    backend = resolve_backend(x)
    if backend is KernelBackend.TRITON:
        return _triton().fake_quantize_nvfp4_activation_triton(x, input_global_scale)
    if backend is KernelBackend.NUMBA:
        return _numba().fake_quantize_nvfp4_activation_numba(x, input_global_scale)
    if backend is KernelBackend.TORCH:
        return torch_backend.fake_quantize_nvfp4_activation_torch(x, input_global_scale)
    return reference.fake_quantize_nvfp4_activation_reference(x, input_global_scale)


def nvfp4_w4a16_matmul(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
) -> torch.Tensor:
    """``x [..., K] @ dequant(W).T -> [..., out]`` in x's dtype."""
    backend = resolve_backend(x)
    if backend is KernelBackend.TRITON:
        return _triton().nvfp4_w4a16_matmul_triton(
            x, weight_packed, weight_scale, weight_global_scale
        )
    if backend is KernelBackend.NUMBA:
        return _numba().nvfp4_w4a16_matmul_numba(
            x, weight_packed, weight_scale, weight_global_scale
        )
    if backend is KernelBackend.TORCH:
        return torch_backend.nvfp4_w4a16_matmul_torch(
            x, weight_packed, weight_scale, weight_global_scale
        )
    return reference.nvfp4_w4a16_matmul_reference(
        x, weight_packed, weight_scale, weight_global_scale
    )
