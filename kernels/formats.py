"""NVFP4 format constants, the E2M1 code table, errors and the packed-weight record.

Conventions (DESIGN.md, bit-compatible with compressed-tensors ``nvfp4-pack-quantized``):

* 16 consecutive elements along K (the last dim of a weight row) share one FP8 E4M3 block scale.
* ``weight_global_scale = 448 * 6 / amax(W)`` in float32, shape ``[1]``.
* E2M1 code: bit 3 = sign (set iff the scaled value is ``< 0``), low 3 bits index ``E2M1_VALUES``.
* ``byte = code[2i] | code[2i + 1] << 4`` (even element in the low nibble).

Also here: the candidate set of the MSE block-scale search (:class:`ScaleCandidates`, shared by
every backend so that all of them try the same FP8 codes in the same order) and the FP8 (W8A8)
weight record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

FP4_BLOCK_SIZE = 16
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
#: The largest finite positive FP8 E4M3 byte (0x7E = 448); 0x7F is NaN.
FP8_E4M3_MAX_BYTE = 0x7E

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


class FP8Weight(NamedTuple):
    """One FP8 (W8A8 tier) weight in compressed-tensors ``float-quantized`` names and dtypes."""

    weight: torch.Tensor  # float8_e4m3fn [out, in]
    weight_scale: torch.Tensor  # float32 [out, 1]


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
    check_matrix_layout(weight, name)
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


def global_scale_from_amax(amax: torch.Tensor | float, *, headroom: float = 1.0) -> torch.Tensor:
    """``(448 * 6 / headroom) / amax`` as float32 shape ``[1]``; with ``headroom == 1`` exactly
    compressed-tensors' ``generate_gparam``.

    ``headroom >= 1``: under round-to-nearest the block holding the tensor's amax gets FP8 scale
    ``448 / headroom`` instead of 448, so a block-scale search (or Four Over Six, which needs
    ``>= 1.5``; llm-compressor's Four Over Six observer uses 448 / 256 = 1.75) can go up to
    ``headroom`` times above round-to-nearest on every block. Computed as torch evaluates
    ``(2688 / headroom) / amax`` with a Python-float numerator (``reciprocal(amax) *
    numerator`` in float32, like compressed-tensors). vLLM loads any positive global scale (it
    only takes ``1 / weight_global_scale``).

    ``amax == 0`` (an all-zero tensor) and amax so small that the quotient overflows give 1.0,
    as compressed-tensors does; every block scale is then 0 (see ``quantize_nvfp4``).
    """
    if not headroom >= 1.0 or headroom == float("inf"):
        raise NVFP4Error(f"headroom must be finite and >= 1, got {headroom}")
    amax_t = torch.as_tensor(amax, dtype=torch.float32).detach()
    if amax_t.numel() != 1:
        raise NVFP4ShapeError(f"amax: expected one value, got shape {tuple(amax_t.shape)}")
    amax_t = amax_t.reshape(1).to(torch.float32).abs()
    if not bool(torch.isfinite(amax_t).all()):
        raise NonFiniteWeightError(f"amax: {float(amax_t)} is not finite")
    amax_t = torch.clamp(amax_t, min=torch.finfo(torch.float32).tiny)
    # a Python-float numerator, as compressed-tensors: torch computes float / tensor as
    # reciprocal(tensor) * float, which differs from a float32 division in the last bit
    global_scale = (FP8_E4M3_MAX * FP4_E2M1_MAX / headroom) / amax_t
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


def check_block_scale(
    block_scale: torch.Tensor, weight: torch.Tensor, name: str = "weight"
) -> torch.Tensor:
    """Validate caller-given NVFP4 block scales for ``weight`` [out, in]; return them as
    float8_e4m3fn ``[out, in/16]`` on the weight's device (a uint8 tensor is viewed as E4M3
    bytes).

    Every byte must be a finite, non-negative E4M3 value (0x00..0x7E): no NaN (0x7F/0xFF) and
    no sign bit (vLLM's Marlin path assumes scales >= 0).
    """
    if not isinstance(block_scale, torch.Tensor):
        raise NVFP4Error(f"{name}: block_scale must be a torch.Tensor")
    if block_scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise NVFP4Error(f"{name}: block_scale must be float8_e4m3fn, got {block_scale.dtype}")
    out_features, in_features = weight.shape
    expected = (out_features, in_features // FP4_BLOCK_SIZE)
    if tuple(block_scale.shape) != expected:
        raise NVFP4ShapeError(
            f"{name}: block_scale must have shape {expected}, got {tuple(block_scale.shape)}"
        )
    scale_bytes = block_scale.view(torch.uint8)
    if bool((scale_bytes > FP8_E4M3_MAX_BYTE).any()):
        n_bad = int((scale_bytes > FP8_E4M3_MAX_BYTE).sum())
        raise NVFP4Error(
            f"{name}: block_scale holds {n_bad} negative or NaN FP8 value(s); block scales must "
            "be finite and >= 0"
        )
    return block_scale.view(torch.float8_e4m3fn).to(weight.device)


def check_float_matrix(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise unless ``weight`` is a finite 2-D float tensor (any K: the FP8 tier has no blocks)."""
    check_matrix_layout(weight, name)
    if not bool(torch.isfinite(weight).all()):
        raise non_finite_error(weight, name)


def check_matrix_layout(weight: torch.Tensor, name: str = "weight") -> None:
    """:func:`check_float_matrix` without the finiteness check."""
    if not isinstance(weight, torch.Tensor):
        raise NVFP4Error(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise NVFP4Error(f"{name}: expected a floating-point tensor, got {weight.dtype}")
    if weight.ndim != 2:
        raise NVFP4ShapeError(
            f"{name}: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}"
        )


#: Marker in :meth:`ScaleCandidates.order` for the Four Over Six candidate
#: ``fp8(min(gs * (amax / 4), 448))`` (the block max mapped to E2M1 4 instead of 6).
FOUR_OVER_SIX_CANDIDATE = 1 << 20


@dataclass(frozen=True)
class ScaleCandidates:
    """Which FP8 E4M3 block scales the MSE block-scale search tries for each 16-block.

    Candidates are E4M3 *bytes*. With ``rtn = fp8(min(gs * (amax / 6), 448))`` (the
    round-to-nearest scale byte of the block), the search tries ``rtn`` itself, then (with
    ``four_over_six``) the byte of ``fp8(min(gs * (amax / 4), 448))``, then ``rtn - 1, rtn + 1,
    rtn - 2, rtn + 2, ...`` down to ``rtn - codes_below`` and up to ``rtn + codes_above``. A
    neighbour outside 0x01..0x7E (scale 0, or above 448) is skipped; ``rtn`` is always tried
    (an all-zero block keeps scale 0).

    Positive E4M3 bytes are ordered like their values; in the normal range 8 codes are one
    octave (a step is a factor 1.0625..1.125), so ``codes_below = codes_above = 8`` spans
    0.5x..2x of the round-to-nearest scale. The block holding the tensor's amax sits at 448
    (byte 0x7E) and cannot go above unless the global scale leaves headroom
    (``global_scale_from_amax(..., headroom=...)``).

    Tie-breaking: the first candidate in :meth:`order` with the smallest error wins (a later
    candidate must be strictly better), so round-to-nearest wins every tie, then Four Over
    Six, then the nearer neighbour, the lower one first.

    ``ScaleCandidates(codes_below=0, codes_above=0, four_over_six=True)`` is Four Over Six.
    """

    codes_below: int = 8
    codes_above: int = 8
    four_over_six: bool = False

    def __post_init__(self) -> None:
        for field_name in ("codes_below", "codes_above"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or not 0 <= value <= FP8_E4M3_MAX_BYTE:
                raise NVFP4Error(f"{field_name} must be an int in 0..126, got {value!r}")

    def order(self) -> tuple[int, ...]:
        """Byte offsets from ``rtn`` in trial order (:data:`FOUR_OVER_SIX_CANDIDATE` marks the
        Four Over Six candidate); the first entry is always 0."""
        offsets = [0]
        if self.four_over_six:
            offsets.append(FOUR_OVER_SIX_CANDIDATE)
        for step in range(1, max(self.codes_below, self.codes_above) + 1):
            if step <= self.codes_below:
                offsets.append(-step)
            if step <= self.codes_above:
                offsets.append(step)
        return tuple(offsets)


#: The search's default candidate set: 0.5x..2x of the round-to-nearest scale. Measured on
#: SmolLM2-135M's 210 Linear weights (fused groups sharing a global scale; importance = E[x^2]
#: over 32 chat prompts), mean over layers of the change in input-weighted squared error vs
#: round-to-nearest: [-8, +8] -22.8 % (unweighted objective) / -49.1 % (importance-weighted);
#: [-16, +16] -22.8 / -49.2 % at ~1.5x the time; [-3, +7] (about the 0.8x..1.8x range of
#: llm-compressor's ``nvfp4_expanded_mse``) -22.8 / -47.6 %; above only [0, +8] -19.7 / -41.8 %;
#: Four Over Six -12.4 / -25.0 %. Headroom 1.25..1.75 moves any of them by < 0.5 point.
DEFAULT_SCALE_CANDIDATES = ScaleCandidates()

#: Four Over Six (Cook et al., arXiv:2512.02010): per block, the block max mapped to 6 or to 4,
#: whichever gives the smaller error. Needs ``headroom >= 1.5`` to be open to every block.
FOUR_OVER_SIX = ScaleCandidates(codes_below=0, codes_above=0, four_over_six=True)
