"""Every Triton kernel equals the torch reference bit for bit (interpreter mode on CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import global_scale_from_amax  # noqa: E402
from kernels.reference import (  # noqa: E402
    dequantize_nvfp4_reference,
    fake_quantize_nvfp4_activation_reference,
    quantize_nvfp4_reference,
)
from kernels.triton_kernels import (  # noqa: E402
    _fp8_e4m3_encode,
    dequantize_nvfp4_triton,
    fake_quantize_nvfp4_activation_triton,
    nvfp4_w4a16_matmul_triton,
    quantize_nvfp4_triton,
)
from tests.kernels.conftest import FLOAT_DTYPES, special_weight  # noqa: E402

tl = triton.language


def assert_same_nvfp4(a, b):
    assert torch.equal(a.weight_packed, b.weight_packed)
    assert torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))
    assert torch.equal(a.weight_global_scale, b.weight_global_scale)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    assert torch.equal(a.view(int_dtype), b.view(int_dtype))  # also distinguishes -0.0 / +0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_pack_equals_reference(dtype):
    weight = special_weight(dtype)
    assert_same_nvfp4(quantize_nvfp4_triton(weight), quantize_nvfp4_reference(weight))


def test_quantize_non_contiguous_and_given_global_scale():
    weight = torch.randn(80, 37).T  # [37, 80] non-contiguous, K = 16 * 5
    gs = global_scale_from_amax(2.5)  # a fused group's shared scale (values past ±6 saturate)
    assert_same_nvfp4(quantize_nvfp4_triton(weight, gs), quantize_nvfp4_reference(weight, gs))


def test_quantize_small_block_count_per_program():
    weight = special_weight(torch.float32, rows=9, blocks=3)
    a = quantize_nvfp4_triton(weight, block_b=16)  # several programs, masked tail
    assert_same_nvfp4(a, quantize_nvfp4_reference(weight))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dequantize_equals_reference(dtype):
    packed = quantize_nvfp4_reference(special_weight(torch.float32))
    assert_bit_equal(
        dequantize_nvfp4_triton(*packed, dtype), dequantize_nvfp4_reference(*packed, dtype)
    )


def test_dequantize_non_contiguous_packed():
    packed, scale, gs = quantize_nvfp4_reference(torch.randn(48, 64))
    packed_nc = packed.T.contiguous().T  # same values, column-major strides
    scale_nc = scale.view(torch.uint8).T.contiguous().T.view(torch.float8_e4m3fn)
    assert not packed_nc.is_contiguous()
    assert_bit_equal(
        dequantize_nvfp4_triton(packed_nc, scale_nc, gs, torch.float32),
        dequantize_nvfp4_reference(packed, scale, gs, torch.float32),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activation_fake_quant_equals_reference(dtype):
    x = special_weight(dtype, rows=15).reshape(3, 5, -1)
    gs = global_scale_from_amax(4.0)  # static calibration amax below the batch max: saturates
    assert_bit_equal(
        fake_quantize_nvfp4_activation_triton(x, gs),
        fake_quantize_nvfp4_activation_reference(x, gs),
    )


def test_activation_fake_quant_non_contiguous():
    x = torch.randn(48, 7).T  # [7, 48]
    assert_bit_equal(
        fake_quantize_nvfp4_activation_triton(x, 300.0),
        fake_quantize_nvfp4_activation_reference(x, 300.0),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fused_w4a16_matmul_matches_dequantize_then_matmul(dtype):
    g = torch.Generator().manual_seed(7)
    packed = quantize_nvfp4_reference(torch.randn(37, 80, generator=g))  # N odd, K = 16 * 5
    x = torch.randn(3, 5, 80, generator=g).to(dtype)
    out = nvfp4_w4a16_matmul_triton(x, *packed)
    weight = dequantize_nvfp4_reference(*packed, torch.float32)
    expected = x.float() @ weight.T
    assert out.shape == (3, 5, 37) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        out.float(), expected, rtol=tol, atol=tol * expected.abs().max().item()
    )


def test_fused_matmul_non_contiguous_x():
    packed = quantize_nvfp4_reference(torch.randn(20, 32))
    x = torch.randn(32, 9).T  # [9, 32]
    expected = x @ dequantize_nvfp4_reference(*packed, torch.float32).T
    torch.testing.assert_close(
        nvfp4_w4a16_matmul_triton(x, *packed), expected, rtol=1e-4, atol=1e-4
    )


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    value = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, _fp8_e4m3_encode(value), mask=mask)


def test_fp8_bit_encoder_equals_torch_cast_on_all_codes_and_midpoints():
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    midpoints = (values[1:] + values[:-1]) / 2
    below = torch.nextafter(midpoints, torch.zeros(1))
    above = torch.nextafter(midpoints, torch.full((1,), 1e9))
    g = torch.Generator().manual_seed(3)
    randoms = torch.cat([torch.rand(2000, generator=g) * 448, torch.rand(2000, generator=g) / 64])
    tiny = torch.tensor([2.0**-10, 3 * 2.0**-11, 2.0**-12, 1e-30, 1e-40, 0.0])
    candidates = torch.cat([values, midpoints, below, above, randoms, tiny]).clamp(max=448.0)
    out = torch.empty(candidates.numel(), dtype=torch.int32)
    _encode_kernel[(triton.cdiv(candidates.numel(), 8192),)](
        candidates, out, candidates.numel(), BLOCK=8192
    )
    expected = candidates.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(out, expected)
