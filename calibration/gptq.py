"""GPTQ for NVFP4 with fixed scales: error feedback column by column onto a given block-scale grid.

GPTQ (Frantar et al., arXiv:2210.17323) quantizes a Linear weight ``W [out, in]`` one input column at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
of the layer's input Hessian ``H = 2/n Σ x xᵀ``, so that ``||X Wᵀ - X Ŵᵀ||²`` (the layer's output error on
the calibration inputs) drops far below round-to-nearest's. Here the NVFP4 scales are decided first
(round-to-nearest amax scales, or the MSE block-scale search) and stay fixed: every column is rounded
with :func:`kernels.round_to_nvfp4_grid` under its own 16-block's FP8 scale and the shared global scale,
so the result lies exactly on the grid and ``quantize_nvfp4(result, gs, block_scale=S)`` packs it without
loss (tested bit for bit). Only the codes change, never the compressed-tensors format.

Numerics follow the usual implementation (everything float32): dead input channels (``H[k, k] == 0``,
never active in calibration) get ``H[k, k] = 1`` so they are plain round-to-nearest and pass no error on;
dampening adds ``damp * mean(diag(H))`` to the diagonal; the inverse comes from a Cholesky factorisation
and its upper Cholesky factor ``U`` (``Uᵀ U = H⁻¹``) drives the updates; columns are processed in lazy
batches of ``block_size`` (error inside the batch column by column, then one matmul for the rest).
Activation order permutes columns by ``diag(H)`` descending (the most active inputs first, while the most
columns are still free to absorb their error); the block scales were computed on the unpermuted weight
and each column keeps looking up its own block's scale, so the 16-blocks stay those of the checkpoint.

A fused group (``q/k/v``, ``gate/up``) reads one input: its members' weights are stacked along ``out`` and
run through one call with one Hessian (GPTQ is independent across output rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kernels import FP4_BLOCK_SIZE, round_to_nvfp4_grid

logger = logging.getLogger(__name__)

#: Columns per lazy batch (as in the GPTQ paper and llm-compressor).
DEFAULT_BLOCK_SIZE = 128
#: Dampening as a fraction of the mean of diag(H).
DEFAULT_DAMP = 0.01
#: Each failed Cholesky multiplies the dampening by this, at most this many times, before falling back
#: to round-to-nearest under the same scales.
_DAMP_RETRY_FACTOR = 10.0
_DAMP_RETRIES = 3


class GPTQError(ValueError):
    """Inputs GPTQ cannot work on (shapes, non-finite Hessian)."""


@dataclass
class HessianAccumulator:
    """``H = 2/n Σ x xᵀ`` over the rows fed to :meth:`add` (float64 sums, float32 results).

    ``diagonal_only``: keep only ``Σ x²`` (what the MSE search's importance needs), ``[in]`` instead of
    ``[in, in]``.
    """

    in_features: int
    diagonal_only: bool = False
    num_samples: int = 0
    _sum: torch.Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate ``x [..., in]`` (every leading index is one sample; pass real tokens only)."""
        if x.shape[-1] != self.in_features:
            raise GPTQError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(torch.float32)  # [n, in]
        if rows.shape[0] == 0:
            return
        # [in] (diagonal only) or [in, in]
        part = rows.square().sum(0) if self.diagonal_only else rows.T @ rows
        part = part.to(torch.float64)
        self._sum = part if self._sum is None else self._sum.add_(part)
        self.num_samples += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """float32 ``[in, in]`` (zeros before any sample). Not available with ``diagonal_only``."""
        if self.diagonal_only:
            raise GPTQError("this accumulator keeps only the diagonal")
        if self._sum is None:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float32)
        return (self._sum * (2.0 / self.num_samples)).to(torch.float32)

    @property
    def second_moment(self) -> torch.Tensor:
        """Per input channel ``E[x_k²] = diag(H)/2``, float32 ``[in]`` (the MSE search's importance)."""
        if self._sum is None:
            return torch.zeros(self.in_features, dtype=torch.float32)
        diag = self._sum if self.diagonal_only else torch.diagonal(self._sum)
        return (diag / self.num_samples).to(torch.float32)


def _inverse_cholesky_upper(hessian: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)⁻¹``; None if H stays indefinite."""
    diag_mean = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(_DAMP_RETRIES + 1):
        frac = damp * _DAMP_RETRY_FACTOR**attempt
        try:
            lower = torch.linalg.cholesky(hessian + (frac * diag_mean) * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            logger.warning("GPTQ: Hessian not positive definite at damp %.3g; retrying", frac)
    return None


@torch.no_grad()
def gptq_nvfp4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """GPTQ-rounded ``weight`` on the NVFP4 grid of fixed ``block_scale`` / ``global_scale``.

    ``weight`` finite ``[out, in]`` (in % 16 == 0, any float dtype); ``hessian`` ``[in, in]``, symmetric,
    positive semi-definite (:class:`HessianAccumulator`); ``block_scale`` float8_e4m3fn ``[out, in/16]``;
    ``global_scale`` float32 ``[1]``. ``damp`` >= 0: fraction of ``mean(diag(H))`` added to the diagonal.
    Returns float32 ``[out, in]``, every value ``E2M1 code * fp32(block scale) / gs`` (zeros are +0), so
    ``dequantize_nvfp4(*quantize_nvfp4(result, gs, block_scale=block_scale), torch.float32)`` returns it
    bit for bit. If H cannot be factorised even after raising the dampening, the result is
    round-to-nearest under the same scales (logged).
    """
    if weight.dim() != 2 or weight.shape[1] % FP4_BLOCK_SIZE:
        raise GPTQError(f"weight must be [out, in] with in % 16 == 0, got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise GPTQError(
            f"hessian must be [{in_features}, {in_features}], got {tuple(hessian.shape)}"
        )
    if block_scale.shape != (out_features, in_features // FP4_BLOCK_SIZE):
        raise GPTQError(f"block_scale shape {tuple(block_scale.shape)} does not fit the weight")
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(weight).all()):
        raise GPTQError("weight and hessian must be finite")
    if damp < 0 or block_size < 1:
        raise GPTQError(f"damp must be >= 0 and block_size >= 1, got {damp}, {block_size}")
    device = weight.device
    gs = global_scale.reshape(1).to(device=device, dtype=torch.float32)
    # each column's effective scale: its own 16-block's, in the unpermuted layout
    scale_eff = (block_scale.to(torch.float32) / gs).repeat_interleave(FP4_BLOCK_SIZE, dim=1)
    w = weight.detach().to(torch.float32).clone()  # [out, in]
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()  # [in, in]

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0  # never-active inputs: round-to-nearest, no error passed on
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h, scale_eff = w[:, perm], h[perm][:, perm], scale_eff[:, perm]

    upper = _inverse_cholesky_upper(h, damp)
    if upper is None:
        logger.warning(
            "GPTQ: Hessian cannot be factorised; round-to-nearest under the fixed scales"
        )
        q = round_to_nvfp4_grid(w, scale_eff)
    else:
        q = _lazy_batch_updates(w, upper, scale_eff, block_size)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q + 0.0  # -0.0 -> +0.0: the codec encodes -0 as code 0, which decodes to +0


def _lazy_batch_updates(
    w: torch.Tensor, upper: torch.Tensor, scale_eff: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The GPTQ loop over column batches of ``w`` [out, in]; returns the rounded [out, in].

    Works on the transpose (one weight column = one contiguous row): the per-column rounding and
    rank-1 updates then touch contiguous memory, about twice as fast on CPU as strided columns."""
    wt = w.T.contiguous()  # [in, out]
    scale_t = scale_eff.T.contiguous()  # [in, out]
    in_features = wt.shape[0]
    qt = torch.empty_like(wt)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = wt[start:stop].clone()  # [b, out]
        errors = torch.empty_like(block)  # [b, out], scaled by 1 / U[j, j]
        u_block = upper[start:stop, start:stop]  # [b, b]
        for j in range(stop - start):
            column = block[j]
            rounded = round_to_nvfp4_grid(column, scale_t[start + j])
            qt[start + j] = rounded
            error = (column - rounded) / u_block[j, j]
            block[j + 1 :] -= u_block[j, j + 1 :].unsqueeze(1) * error.unsqueeze(0)
            errors[j] = error
        wt[stop:] -= upper[start:stop, stop:].T @ errors
    return qt.T.contiguous()
