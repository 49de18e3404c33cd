"""FP8 tier (W8A8, compressed-tensors ``float-quantized``): compressed-tensors 0.20 as the oracle,
and the numba path equal to the reference bit for bit."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import FP8Weight, NonFiniteWeightError, NVFP4Error, NVFP4ShapeError
from kernels.reference import (
    fake_quantize_fp8_activation_per_token_reference,
    quantize_fp8_per_channel_reference,
)
from tests.kernels.conftest import FLOAT_DTYPES

ct_quant = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.quantization.lifecycle.forward import (  # noqa: E402
    dequantize,
    fake_quantize,
    quantize,
)
from compressed_tensors.quantization.utils.helpers import (  # noqa: E402
    calculate_qparams,
    compute_dynamic_scales_and_zp,
)

WEIGHT_ARGS = ct_quant.QuantizationArgs(
    num_bits=8, type="float", strategy="channel", symmetric=True
)
TOKEN_ARGS = ct_quant.QuantizationArgs(
    num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True
)
BACKENDS = ("reference", "torch", "triton") + (("numba",) if kernels.numba_available() else ())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def fp8_weight(dtype: torch.dtype, shape: tuple[int, int] = (37, 50), seed: int = 0):
    """Rows over a wide dynamic range, an all-zero row, -0.0, tiny values that round to
    FP8 zero or subnormals, and values on FP8 rounding midpoints."""
    g = torch.Generator().manual_seed(seed)
    rows, k = shape
    weight = torch.randn(rows, k, generator=g) * torch.exp2(
        torch.randint(-20, 10, (rows, 1), generator=g).float()
    )
    weight[0] = 0.0
    weight[1, :4] = torch.tensor([-0.0, 448.0, -1e-7, 1e-9])
    weight[2, :6] = torch.tensor([448.0, 1.0625, -1.0625, 3.25, 2.0**-9, 3 * 2.0**-10])
    return weight.to(dtype)


def ct_weight(weight: torch.Tensor):
    """compressed-tensors' calibration + compression of one float32 weight (with the zero
    point it always initializes)."""
    x = weight.float()
    scale, zero_point = calculate_qparams(
        x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True), WEIGHT_ARGS
    )
    q = quantize(x, scale, zero_point, WEIGHT_ARGS, dtype=torch.float8_e4m3fn)
    return q, scale, zero_point


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(37, 50), (3, 16), (130, 272)])
def test_weight_equals_compressed_tensors(force_backend, dtype, shape):
    weight = fp8_weight(dtype, shape)
    q_ct, scale_ct, _ = ct_weight(weight)
    for backend in BACKENDS:
        force_backend(backend)
        q, scale = kernels.quantize_fp8_per_channel(weight)
        assert q.dtype == torch.float8_e4m3fn and q.shape == shape, backend
        assert scale.dtype == torch.float32 and scale.shape == (shape[0], 1), backend
        assert torch.equal(_bits(scale), _bits(scale_ct)), backend
        assert torch.equal(_bits(q), _bits(q_ct)), backend
    assert float(scale[0]) == torch.finfo(torch.float32).eps  # zero row: compressed-tensors' eps


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
def test_dequantize_equals_compressed_tensors(force_backend, dtype):
    weight = fp8_weight(torch.float32)
    q_ct, scale_ct, zero_point = ct_weight(weight)
    # compressed-tensors 0.20 ignores ``dtype`` for the channel strategy (returns float32);
    # the loaded parameter is then cast to the model's dtype
    expected = dequantize(q_ct, scale_ct, zero_point, WEIGHT_ARGS, dtype=dtype).to(dtype)
    for backend in BACKENDS:
        force_backend(backend)
        got = kernels.dequantize_fp8(q_ct, scale_ct, dtype)
        assert got.dtype == dtype and torch.equal(got, expected), backend
        fake = kernels.fake_quantize_fp8_weight(weight.to(dtype))
        q_low, scale_low, zp_low = ct_weight(weight.to(dtype))
        expected_fake = dequantize(q_low, scale_low, zp_low, WEIGHT_ARGS).to(dtype)
        assert fake.dtype == dtype and torch.equal(fake, expected_fake), backend


def test_weight_non_contiguous_and_never_modified(force_backend):
    base = fp8_weight(torch.bfloat16, (50, 37))
    weight = base.T  # [37, 50] view
    before = base.clone()
    want = quantize_fp8_per_channel_reference(weight.contiguous())
    for backend in BACKENDS:
        force_backend(backend)
        got = kernels.quantize_fp8_per_channel(weight)
        assert torch.equal(_bits(got.weight), _bits(want.weight)), backend
        assert torch.equal(got.weight_scale, want.weight_scale), backend
    assert torch.equal(_bits(base), _bits(before))


def test_negative_zero_and_tiny_negatives():
    weight = torch.tensor([[-0.0, 1.0, -1e-12, 0.0]])
    q, scale = quantize_fp8_per_channel_reference(weight)
    # -0.0 encodes as +0 (compressed-tensors adds its zero point); a tiny negative keeps its sign
    assert _bits(q).tolist() == [[0x00, 0x7E, 0x80, 0x00]]
    assert torch.equal(scale, torch.tensor([[1.0]]) / 448)


def test_weight_errors_name_the_tensor(force_backend):
    bad = torch.randn(4, 20)
    bad[2, 3] = float("nan")
    for backend in BACKENDS:
        force_backend(backend)
        with pytest.raises(NonFiniteWeightError, match="mlp.down_proj"):
            kernels.quantize_fp8_per_channel(bad, name="mlp.down_proj")
        with pytest.raises(NVFP4ShapeError, match="2-D"):
            kernels.quantize_fp8_per_channel(torch.randn(3, 4, 5))
        with pytest.raises(NVFP4Error, match="floating-point"):
            kernels.quantize_fp8_per_channel(torch.ones(2, 2, dtype=torch.int32))
        with pytest.raises(NVFP4ShapeError, match="weight_scale"):
            kernels.dequantize_fp8(torch.zeros(3, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 1))


def ct_activation(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic per-token forward (what ``forward_quantize`` does)."""
    scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=TOKEN_ARGS, module=None)
    return fake_quantize(x, scale, zero_point, TOKEN_ARGS)


def activation(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 96, generator=g) * torch.exp2(
        torch.randint(-12, 12, (3, 7, 1), generator=g).float()
    )
    x[0, 0] = 0.0  # a zero token: compressed-tensors' eps scale
    x[0, 1, :3] = torch.tensor([-0.0, 1e-6, -1e-6])
    x[1, 2, :2] = torch.tensor([448.0, -448.0])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activation_equals_compressed_tensors(force_backend, dtype):
    x = activation(dtype)
    expected = ct_activation(x)
    assert expected.dtype == dtype
    for backend in BACKENDS:
        force_backend(backend)
        got = kernels.fake_quantize_fp8_activation_per_token(x)
        assert got.dtype == dtype and got.shape == x.shape, backend
        assert torch.equal(_bits(got), _bits(expected)), backend


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activation_numba_equals_reference_on_many_tokens(force_backend, dtype):
    x = (torch.randn(4, 301, 576, generator=torch.Generator().manual_seed(8)) * 3).to(dtype)
    expected = fake_quantize_fp8_activation_per_token_reference(x)
    for backend in BACKENDS:
        force_backend(backend)
        assert torch.equal(
            _bits(kernels.fake_quantize_fp8_activation_per_token(x)), _bits(expected)
        )
        noncontiguous = x.transpose(0, 1).contiguous().transpose(0, 1)
        got = kernels.fake_quantize_fp8_activation_per_token(noncontiguous)
        assert torch.equal(_bits(got), _bits(expected)), backend


def test_activation_non_finite_tokens_propagate_like_compressed_tensors(force_backend):
    x = activation(torch.float32)
    x[2, 3, 5] = float("nan")
    x[2, 4, 6] = float("inf")
    expected = ct_activation(x)
    for backend in BACKENDS:
        force_backend(backend)
        got = kernels.fake_quantize_fp8_activation_per_token(x)
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), backend
        finite = ~torch.isnan(expected)
        assert torch.equal(got[finite], expected[finite]), backend


def test_activation_is_per_token_on_2d_input():
    x = activation(torch.float32)
    flat = kernels.fake_quantize_fp8_activation_per_token(x.reshape(-1, 96))
    assert torch.equal(flat.reshape(x.shape), fake_quantize_fp8_activation_per_token_reference(x))


def test_fp8_weight_record():
    record = kernels.quantize_fp8_per_channel(torch.randn(4, 8))
    assert isinstance(record, FP8Weight)
    assert record.weight.shape == (4, 8) and record.weight_scale.shape == (4, 1)
