"""NVFP4 format constants, the E2M1 code table, errors and the packed-weight record.

Conventions (DESIGN.md, bit-compatible with compressed-tensors ``nvfp4-pack-quantized``):

* 16 consecutive elements along K (the last dim of a weight row) share one FP8 E4M3 block scale.
* ``weight_global_scale = 448 * 6 / amax(W)`` in float32, shape ``[1]``.
* E2M1 code: bit 3 = sign (set iff the scaled value is ``< 0``), low 3 bits index ``E2M1_VALUES``.
* ``byte = code[2i] | code[2i + 1] << 4`` (even element in the low nibble).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP4_BLOCK_SIZE = 16
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0

#: Magnitudes of the 8 non-negative E2M1 codes, indexed by the low 3 bits of a code.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)

#: All 16 codes decoded (code 8 is -0.0), float32.
E2M1_SIGNED_VALUES = torch.cat([E2M1_VALUES, -E2M1_VALUES])

#: Round-to-nearest-even decision points on |x| for E2M1. A magnitude maps to the number of
#: thresholds it passes. Ties at 0.25, 1.25, 2.5, 5.0 go down (to the even code), ties at 0.75,
#: 1.75, 3.5 go up; the strict ``>`` comparisons below use the float32 just below those three.
E2M1_RNE_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_RNE_STRICT_THRESHOLDS = torch.tensor(
    [
        0.25,
        float(torch.nextafter(torch.tensor(0.75), torch.tensor(0.0))),
        1.25,
        float(torch.nextafter(torch.tensor(1.75), torch.tensor(0.0))),
        2.5,
        float(torch.nextafter(torch.tensor(3.5), torch.tensor(0.0))),
        5.0,
    ],
    dtype=torch.float32,
)


class NVFP4Error(ValueError):
    """Base class for NVFP4 codec errors."""


class NVFP4ShapeError(NVFP4Error):
    """A tensor cannot be NVFP4-quantized because of its shape (ndim, K not a multiple of 16...)."""


class NonFiniteWeightError(NVFP4Error):
    """A tensor to quantize contains NaN or Inf."""


class NVFP4Weight(NamedTuple):
    """One quantized weight in compressed-tensors' tensor names and dtypes."""

    weight_packed: torch.Tensor  # uint8 [out, in/2], even element in the low nibble
    weight_scale: torch.Tensor  # float8_e4m3fn [out, in/16]
    weight_global_scale: torch.Tensor  # float32 [1]


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise a specific :class:`NVFP4Error` unless ``weight`` is a finite 2-D float tensor with
    K (last dim) a multiple of 16."""
    check_weight_layout(weight, name)
    if not bool(torch.isfinite(weight).all()):
        raise non_finite_error(weight, name)


def check_weight_layout(weight: torch.Tensor, name: str = "weight") -> None:
    """:func:`check_weight` without the finiteness check (for kernels that count non-finite
    values in their own pass and then raise :func:`non_finite_error`)."""
    if not isinstance(weight, torch.Tensor):
        raise NVFP4Error(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise NVFP4Error(f"{name}: expected a floating-point tensor, got {weight.dtype}")
    if weight.ndim != 2:
        raise NVFP4ShapeError(
            f"{name}: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}"
        )
    check_block_dim(weight.shape[-1], name)


def non_finite_error(weight: torch.Tensor, name: str) -> NonFiniteWeightError:
    """The error for a weight holding NaN/Inf, naming the tensor and counting the bad values."""
    n_bad = int((~torch.isfinite(weight)).sum())
    return NonFiniteWeightError(
        f"{name}: {n_bad} non-finite value(s) (NaN/Inf) in a tensor of shape "
        f"{tuple(weight.shape)}; it cannot be NVFP4-quantized"
    )


def check_block_dim(k: int, name: str) -> None:
    """Raise :class:`NVFP4ShapeError` unless ``k`` is a positive multiple of 16."""
    if k <= 0 or k % FP4_BLOCK_SIZE != 0:
        raise NVFP4ShapeError(
            f"{name}: in_features={k} is not a multiple of {FP4_BLOCK_SIZE}; NVFP4 needs whole "
            f"blocks of {FP4_BLOCK_SIZE} along K, so this layer must stay unquantized"
        )


def check_packed(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_global_scale: torch.Tensor
) -> tuple[int, int]:
    """Validate a packed triple; return ``(out_features, in_features)``."""
    if weight_packed.dtype != torch.uint8 or weight_packed.ndim != 2:
        raise NVFP4ShapeError(
            f"weight_packed: expected uint8 [out, in/2], got {weight_packed.dtype} "
            f"{tuple(weight_packed.shape)}"
        )
    out_features, half_k = weight_packed.shape
    in_features = 2 * half_k
    check_block_dim(in_features, "weight_packed")
    expected = (out_features, in_features // FP4_BLOCK_SIZE)
    if tuple(weight_scale.shape) != expected:
        raise NVFP4ShapeError(
            f"weight_scale: expected shape {expected} for weight_packed "
            f"{tuple(weight_packed.shape)}, got {tuple(weight_scale.shape)}"
        )
    if weight_scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise NVFP4Error(f"weight_scale: expected float8_e4m3fn, got {weight_scale.dtype}")
    if weight_global_scale.numel() != 1:
        raise NVFP4ShapeError(
            f"weight_global_scale: expected one value, got shape {tuple(weight_global_scale.shape)}"
        )
    return out_features, in_features


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """``448 * 6 / amax`` as float32 shape ``[1]``, exactly as compressed-tensors' ``generate_gparam``.

    ``amax == 0`` (an all-zero tensor) and amax so small that the quotient overflows give 1.0,
    as compressed-tensors does; every block scale is then 0 (see ``quantize_nvfp4``).
    """
    amax_t = torch.as_tensor(amax, dtype=torch.float32).detach()
    if amax_t.numel() != 1:
        raise NVFP4ShapeError(f"amax: expected one value, got shape {tuple(amax_t.shape)}")
    amax_t = amax_t.reshape(1).to(torch.float32).abs()
    if not bool(torch.isfinite(amax_t).all()):
        raise NonFiniteWeightError(f"amax: {float(amax_t)} is not finite")
    amax_t = torch.clamp(amax_t, min=torch.finfo(torch.float32).tiny)
    global_scale = (FP8_E4M3_MAX * FP4_E2M1_MAX) / amax_t
    return torch.nan_to_num(global_scale, nan=1.0, posinf=1.0, neginf=1.0)


def as_global_scale(global_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A caller-supplied global scale as float32 ``[1]`` on ``device``; must be finite and > 0."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32)
    if gs.numel() != 1:
        raise NVFP4ShapeError(f"global_scale: expected one value, got shape {tuple(gs.shape)}")
    gs = gs.reshape(1).to(device=device, dtype=torch.float32)
    value = float(gs)
    if not (value > 0.0 and value != float("inf")):
        raise NVFP4Error(f"global_scale must be finite and > 0, got {value}")
    return gs
