"""Public NVFP4 ops: one function per op, dispatched to the Triton kernels, the fused numba CPU
kernels, the vectorized-torch CPU path or the pure-torch reference.

``FP4ROLL_KERNEL_BACKEND`` (read at every call) forces a path: ``reference`` | ``torch``
(vectorized torch, also valid on CUDA) | ``numba`` (fused CPU kernels; CPU tensors only) |
``triton`` (on CPU only through Triton's interpreter, ``TRITON_INTERPRET=1`` set before
``kernels`` is imported) | ``auto`` (default: CUDA tensors -> Triton when it is importable; CPU
tensors -> numba when it is importable, else torch). All paths give identical bytes; see
``kernels.reference`` for the numerics and the decided edge cases.
"""

from __future__ import annotations

import functools
import logging
import os
from enum import Enum

import torch

from kernels import cpu, reference
from kernels.formats import NVFP4Error, NVFP4Weight

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


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """``448*6/amax`` float32 [1]; amax == 0 -> 1.0 (as compressed-tensors)."""
    return reference.global_scale_from_amax(amax)


def quantize_nvfp4(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
) -> NVFP4Weight:
    """Quantize a finite 2-D weight [out, in] (in % 16 == 0; any float dtype, any strides).

    ``global_scale`` None -> ``448*6/amax(weight)``. Raises NVFP4ShapeError /
    NonFiniteWeightError naming ``name``.
    """
    backend = resolve_backend(weight)
    if backend is KernelBackend.TRITON:
        return _triton().quantize_nvfp4_triton(weight, global_scale, name=name)
    if backend is KernelBackend.NUMBA:
        return _numba().quantize_nvfp4_numba(weight, global_scale, name=name)
    if backend is KernelBackend.TORCH:
        return cpu.quantize_nvfp4_cpu(weight, global_scale, name=name)
    return reference.quantize_nvfp4_reference(weight, global_scale, name=name)


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
        return cpu.dequantize_nvfp4_cpu(weight_packed, weight_scale, weight_global_scale, dtype)
    return reference.dequantize_nvfp4_reference(
        weight_packed, weight_scale, weight_global_scale, dtype
    )


def fake_quantize_nvfp4_weight(
    weight: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str = "weight",
) -> torch.Tensor:
    """``dequantize(quantize(weight))``, same dtype and shape (used by the KL sweep)."""
    backend = resolve_backend(weight)
    if backend is KernelBackend.TRITON:
        packed = _triton().quantize_nvfp4_triton(weight, global_scale, name=name)
        return _triton().dequantize_nvfp4_triton(*packed, weight.dtype)
    if backend is KernelBackend.NUMBA:
        return _numba().fake_quantize_nvfp4_weight_numba(weight, global_scale, name=name)
    if backend is KernelBackend.TORCH:
        return cpu.fake_quantize_nvfp4_weight_cpu(weight, global_scale, name=name)
    return reference.fake_quantize_nvfp4_weight_reference(weight, global_scale, name=name)


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
        return cpu.fake_quantize_nvfp4_activation_cpu(x, input_global_scale)
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
        return cpu.nvfp4_w4a16_matmul_cpu(x, weight_packed, weight_scale, weight_global_scale)
    return reference.nvfp4_w4a16_matmul_reference(
        x, weight_packed, weight_scale, weight_global_scale
    )
