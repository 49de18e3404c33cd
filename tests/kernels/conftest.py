"""Shared fixtures for the kernels tests (small shapes: the Triton interpreter is slow)."""

from __future__ import annotations

import pytest
import torch

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sqnr_db(original: torch.Tensor, decoded: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64)."""
    signal = original.double().pow(2).sum()
    noise = (original.double() - decoded.double()).pow(2).sum()
    return float(10 * torch.log10(signal / noise))


def special_weight(dtype: torch.dtype, rows: int = 37, blocks: int = 5) -> torch.Tensor:
    """Odd row count, K = 16 * odd, with zero / -0.0 / ±6 / beyond-±6 / tiny blocks."""
    g = torch.Generator().manual_seed(1234)
    weight = torch.randn(rows, 16 * blocks, generator=g)
    weight[0, :16] = 0.0  # all-zero block
    weight[1, :16] = -0.0  # all negative-zero block
    weight[2, :8] = torch.tensor([6.0, -6.0, 7.0, -100.0, 1e-3, -1e-3, -0.0, 3.0])
    weight[3] *= 1e-6  # tiny row: subnormal / underflowing block scales
    weight[4, 16:32] = torch.linspace(-6, 6, 16)
    return weight.to(dtype)


@pytest.fixture
def force_backend(monkeypatch):
    """Call ``force_backend("triton")`` to pin FP4ROLL_KERNEL_BACKEND for one test."""

    def _force(name: str) -> None:
        monkeypatch.setenv("FP4ROLL_KERNEL_BACKEND", name)

    return _force


#: Odd shapes for the block-scale search and the given-scale codec (rows x K).
SEARCH_SHAPES = [(17, 48), (3, 16), (130, 272)]


def search_weight(
    dtype: torch.dtype, shape: tuple[int, int] = (17, 48), seed: int = 0
) -> torch.Tensor:
    """Random blocks over a wide dynamic range (FP8 block scales from subnormal to saturated)
    plus an all-zero block, an all -0.0 block, exact E2M1 ties and table values (±6) under
    scale_eff 1 (amax 6 -> gs 448), and a lone-value block."""
    g = torch.Generator().manual_seed(seed)
    rows, k = shape
    magnitude = torch.exp2(torch.randint(-24, 6, (rows, k // 16, 1), generator=g).float())
    weight = torch.randn(rows, k // 16, 16, generator=g) * magnitude
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    weight[0, 0] = torch.cat([ties, -ties.flip(0)])
    if rows > 1:
        weight[1, 0] = 0.0
    if rows > 2:
        weight[2, 0] = -0.0
        weight[2, -1] = 0.0
        weight[2, -1, 3] = -6.0 * 2.0**-3  # a lone value on the grid
    return weight.reshape(rows, k).to(dtype)
