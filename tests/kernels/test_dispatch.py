"""Public ops: backend selection, and every CPU backend giving identical bytes."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import KernelBackend, NVFP4Error, resolve_backend
from tests.kernels.conftest import special_weight

BACKENDS = ("reference", "torch", "triton") + (("numba",) if kernels.numba_available() else ())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return (
        t.view(torch.uint8)
        if t.element_size() == 1
        else t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    )


def test_auto_uses_fast_cpu_path_on_cpu(force_backend):
    force_backend("auto")
    expected = KernelBackend.NUMBA if kernels.numba_available() else KernelBackend.TORCH
    assert resolve_backend(torch.zeros(1)) is expected


def test_auto_falls_back_to_torch_without_numba(force_backend, monkeypatch):
    force_backend("auto")
    monkeypatch.setattr("kernels.dispatch.numba_available", lambda: False)
    assert resolve_backend(torch.zeros(1)) is KernelBackend.TORCH


def test_unknown_backend_is_a_clear_error(force_backend):
    force_backend("gpu-please")
    with pytest.raises(NVFP4Error, match="FP4ROLL_KERNEL_BACKEND"):
        kernels.quantize_nvfp4(torch.randn(2, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_backends_agree_bit_for_bit(force_backend, dtype):
    weight = special_weight(dtype)
    x = torch.randn(2, 3, weight.shape[1]).to(dtype)
    results = {}
    for backend in BACKENDS:
        force_backend(backend)
        packed = kernels.quantize_nvfp4(weight, name="w")
        results[backend] = (
            packed,
            kernels.dequantize_nvfp4(*packed, dtype=dtype),
            kernels.fake_quantize_nvfp4_weight(weight),
            kernels.fake_quantize_nvfp4_activation(x, 200.0),
            kernels.nvfp4_w4a16_matmul(x, *packed),
        )
    ref = results["reference"]
    for backend in BACKENDS[1:]:
        got = results[backend]
        for a, b in zip(got[0], ref[0], strict=True):
            assert torch.equal(_as_bytes(a), _as_bytes(b)), backend
        for a, b in zip(got[1:4], ref[1:4], strict=True):
            assert torch.equal(_as_bytes(a), _as_bytes(b)), backend
        torch.testing.assert_close(got[4].float(), ref[4].float(), rtol=2e-2, atol=2e-2)


def test_cpu_fast_path_equals_reference_on_larger_random_weights(force_backend):
    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(300, 1024, generator=g) * 0.02).to(torch.bfloat16)
    weight[7, 100:116] = 0.0
    force_backend("reference")
    ref = kernels.quantize_nvfp4(weight)
    for backend in BACKENDS[1:]:
        if backend == "triton":
            continue
        force_backend(backend)
        fast = kernels.quantize_nvfp4(weight)
        assert torch.equal(fast.weight_packed, ref.weight_packed), backend
        assert torch.equal(
            fast.weight_scale.view(torch.uint8), ref.weight_scale.view(torch.uint8)
        ), backend


def test_public_errors_name_the_tensor(force_backend):
    force_backend("auto")
    with pytest.raises(kernels.NVFP4ShapeError, match="down_proj"):
        kernels.quantize_nvfp4(torch.randn(4, 24), name="down_proj")
    bad = torch.randn(4, 16)
    bad[0, 0] = float("nan")
    with pytest.raises(kernels.NonFiniteWeightError, match="up_proj"):
        kernels.fake_quantize_nvfp4_weight(bad, name="up_proj")


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_never_modifies_the_input(force_backend, backend):
    force_backend(backend)
    weight = torch.randn(8, 32)
    before = weight.clone()
    kernels.quantize_nvfp4(weight)
    kernels.fake_quantize_nvfp4_weight(weight)
    assert torch.equal(weight, before)
