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
