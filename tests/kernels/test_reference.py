"""The pure-torch reference codec: the spec's edge cases, packing order, SQNR."""

from __future__ import annotations

import pytest
import torch

from kernels import (
    E2M1_VALUES,
    FP4_BLOCK_SIZE,
    NonFiniteWeightError,
    NVFP4Error,
    NVFP4ShapeError,
    global_scale_from_amax,
)
from kernels.reference import (
    dequantize_nvfp4_reference,
    e2m1_codes_reference,
    fake_quantize_nvfp4_activation_reference,
    fake_quantize_nvfp4_weight_reference,
    nvfp4_w4a16_matmul_reference,
    quantize_nvfp4_reference,
    unpack_codes_reference,
)
from tests.kernels.conftest import FLOAT_DTYPES, special_weight, sqnr_db


def test_e2m1_round_to_nearest_even_and_saturation():
    values = torch.tensor(
        [0.0, -0.0, 0.25, 0.2500001, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0001, 6.0, 7.0, 1e9]
        + [-0.1, -0.25, -0.75, -5.0, -6.0, -1e9]
    )
    expected = [0, 0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 7] + [8, 8, 10, 14, 15, 15]
    assert e2m1_codes_reference(values).tolist() == expected


def test_codes_decode_to_table_values():
    codes = e2m1_codes_reference(torch.cat([E2M1_VALUES, -E2M1_VALUES[1:]]))
    assert codes.tolist() == list(range(8)) + list(range(9, 16))


def test_packing_puts_even_element_in_low_nibble():
    weight = torch.zeros(1, 16)
    weight[0, 0], weight[0, 1] = 6.0, -0.5  # codes 7 and 9 (with gs so scale_eff == 1)
    packed, scale, gs = quantize_nvfp4_reference(weight, global_scale=448.0)
    assert float(scale.float()[0, 0]) == 448.0
    assert packed[0, 0].item() == (7 | (9 << 4))
    assert unpack_codes_reference(packed)[0, :2].tolist() == [7, 9]


def test_global_scale_from_amax():
    assert global_scale_from_amax(2.0).tolist() == [1344.0]
    assert global_scale_from_amax(torch.tensor(0.0)).tolist() == [1.0]  # as compressed-tensors
    assert global_scale_from_amax(1e-40).tolist() == [1.0]  # overflow -> 1.0 as well
    assert global_scale_from_amax(3.0).dtype == torch.float32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_edge_case_blocks(dtype):
    weight = special_weight(dtype)
    packed, scale, gs = quantize_nvfp4_reference(weight)
    scale_bytes = scale.view(torch.uint8)
    codes = unpack_codes_reference(packed)
    decoded = dequantize_nvfp4_reference(packed, scale, gs, dtype=torch.float32)
    assert torch.isfinite(decoded).all()
    # all-zero and all -0.0 blocks: scale byte 0, codes 0 (-0.0 encodes as +0), decode to +0
    assert scale_bytes[0, 0] == 0 and scale_bytes[1, 0] == 0
    assert codes[0, :16].eq(0).all() and codes[1, :16].eq(0).all()
    assert not torch.signbit(decoded[1, :16]).any()
    # the tiny row: some scales are FP8 subnormals (byte 1..7) and decode without NaN
    tiny_scales = scale_bytes[3]
    assert ((tiny_scales > 0) & (tiny_scales < 8)).any() or tiny_scales.eq(0).all()
    # a row whose global amax is 100: the -100 saturates to code 15 exactly
    assert codes[2, 3] == 15
    assert decoded[2, 3].item() == pytest.approx(-100.0, rel=1e-2)


def test_subnormal_block_scale_roundtrip():
    weight = torch.zeros(1, 32)
    weight[0, 0] = 448.0 * 6 / 448  # block 0 sets amax = 6 -> gs = 448
    weight[0, 16:] = torch.linspace(-1, 1, 16) * 2**-14  # 448 * 2**-14 / 6 < 2**-6: subnormal
    packed, scale, gs = quantize_nvfp4_reference(weight)
    assert gs.item() == 448.0
    byte = scale.view(torch.uint8)[0, 1].item()
    assert 0 < byte < 8, byte
    decoded = dequantize_nvfp4_reference(packed, scale, gs, dtype=torch.float32)
    assert torch.isfinite(decoded).all()
    assert sqnr_db(weight[0, 16:], decoded[0, 16:]) > 5


def test_values_past_six_saturate_under_a_shared_global_scale():
    weight = torch.full((2, 16), 3.0)
    weight[1, 0] = 30.0  # group amax was 3 but this member (or a later batch) has 30
    packed, scale, gs = quantize_nvfp4_reference(weight, global_scale=global_scale_from_amax(3.0))
    assert float(scale.float()[1, 0]) == 448.0  # clamped at the FP8 max
    codes = unpack_codes_reference(packed)
    assert codes[1, 0] == 7
    decoded = dequantize_nvfp4_reference(packed, scale, gs, dtype=torch.float32)
    assert decoded[1, 0] == 6.0 * 448.0 / gs.item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_names_the_tensor(bad):
    weight = torch.randn(4, 32)
    weight[2, 5] = bad
    with pytest.raises(NonFiniteWeightError, match="model.layers.3.self_attn.q_proj"):
        quantize_nvfp4_reference(weight, name="model.layers.3.self_attn.q_proj")


def test_k_not_multiple_of_16_says_layer_stays_unquantized():
    with pytest.raises(NVFP4ShapeError, match=r"lm_head.*in_features=40.*unquantized"):
        quantize_nvfp4_reference(torch.randn(8, 40), name="lm_head")


@pytest.mark.parametrize("shape", [(16,), (2, 3, 16)])
def test_weight_must_be_2d(shape):
    with pytest.raises(NVFP4ShapeError, match="2-D"):
        quantize_nvfp4_reference(torch.randn(*shape))


def test_integer_weight_is_rejected():
    with pytest.raises(NVFP4Error, match="floating-point"):
        quantize_nvfp4_reference(torch.ones(2, 16, dtype=torch.int32))


def test_bad_global_scale_is_rejected():
    with pytest.raises(NVFP4Error, match="global_scale"):
        quantize_nvfp4_reference(torch.randn(2, 16), global_scale=0.0)


def test_non_contiguous_equals_contiguous():
    base = torch.randn(64, 48)
    weight_t = base.T  # [48, 64], non-contiguous
    a = quantize_nvfp4_reference(weight_t)
    b = quantize_nvfp4_reference(weight_t.contiguous())
    assert torch.equal(a.weight_packed, b.weight_packed)
    assert torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))
    assert torch.equal(a.weight_global_scale, b.weight_global_scale)


def test_packed_shapes_and_dtypes():
    packed, scale, gs = quantize_nvfp4_reference(torch.randn(5, 48, dtype=torch.bfloat16))
    assert packed.shape == (5, 24) and packed.dtype == torch.uint8
    assert scale.shape == (5, 48 // FP4_BLOCK_SIZE) and scale.dtype == torch.float8_e4m3fn
    assert gs.shape == (1,) and gs.dtype == torch.float32


def test_sqnr_gaussian_and_heavy_tailed():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(256, 512, generator=g)
    student_t = torch.distributions.StudentT(3.0).sample((256, 512))
    gaussian_db = sqnr_db(gaussian, fake_quantize_nvfp4_weight_reference(gaussian))
    student_db = sqnr_db(student_t, fake_quantize_nvfp4_weight_reference(student_t))
    assert gaussian_db > 19.5, gaussian_db  # NVFP4 on N(0,1) measures ~20.4 dB
    assert student_db > 17.0, student_db


def test_fake_quantize_keeps_dtype_and_shape():
    weight = torch.randn(6, 32, dtype=torch.bfloat16)
    out = fake_quantize_nvfp4_weight_reference(weight)
    assert out.dtype == torch.bfloat16 and out.shape == weight.shape


def test_activation_fake_quant_is_per_row_blockwise():
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    out = fake_quantize_nvfp4_activation_reference(x, 448 * 6 / 4.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    # quantizing one token alone gives the same values: scales are dynamic per block
    alone = fake_quantize_nvfp4_activation_reference(x[1, 2:3], 448 * 6 / 4.0)
    assert torch.equal(alone[0], out[1, 2])
    with pytest.raises(NVFP4ShapeError):
        fake_quantize_nvfp4_activation_reference(torch.randn(2, 20), 1.0)


def test_matmul_reference_shape_and_mismatch():
    packed = quantize_nvfp4_reference(torch.randn(10, 32))
    assert nvfp4_w4a16_matmul_reference(torch.randn(2, 3, 32), *packed).shape == (2, 3, 10)
    with pytest.raises(NVFP4ShapeError, match="in_features 32"):
        nvfp4_w4a16_matmul_reference(torch.randn(2, 48), *packed)
