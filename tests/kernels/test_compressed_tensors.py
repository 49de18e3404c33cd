"""compressed-tensors 0.20 as an oracle (not as our codec).

Its encoder, given the same global scale and fp32 block min/max (what an fp32 observer gives it),
agrees with ours on >= 99.99 % of codes (measured: 100 %) and on every block-scale byte; its
decoder applied to our bytes gives our dequantized values exactly.
"""

from __future__ import annotations

import pytest
import torch

ct_helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")

from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

import kernels  # noqa: E402
from kernels.reference import unpack_codes_reference  # noqa: E402

NVFP4_ARGS = preset_name_to_scheme("NVFP4", ["Linear"]).weights


def ct_encode(weight: torch.Tensor, global_scale: torch.Tensor):
    blocks = weight.float().reshape(weight.shape[0], -1, 16)
    scale, _ = calculate_qparams(
        blocks.amin(-1), blocks.amax(-1), NVFP4_ARGS, global_scale=global_scale
    )
    packed = ct_helpers.quantize_and_pack_fp4(weight, scale, global_scale)
    return packed, scale.to(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ct_encoder_agrees_with_ours(dtype):
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(512, 1024, generator=g) * 0.03).to(dtype)
    ours = kernels.quantize_nvfp4(weight)
    ct_packed, ct_scale = ct_encode(weight, ours.weight_global_scale)
    assert torch.equal(ct_scale.view(torch.uint8), ours.weight_scale.view(torch.uint8))
    agreement = (
        (unpack_codes_reference(ct_packed) == unpack_codes_reference(ours.weight_packed))
        .float()
        .mean()
        .item()
    )
    assert agreement >= 0.9999, agreement


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ct_decoder_on_our_bytes_gives_our_values(dtype):
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(64, 256, generator=g).to(dtype)
    packed, scale, gs = kernels.quantize_nvfp4(weight)
    unpacked = ct_helpers.unpack_fp4_from_uint8(packed, 64, 256, dtype=dtype)
    theirs = dequantize(
        x_q=unpacked, scale=scale.to(dtype), args=NVFP4_ARGS, global_scale=gs, dtype=dtype
    )
    ours = kernels.dequantize_nvfp4(packed, scale, gs, dtype=dtype)
    assert torch.equal(theirs, ours)


def test_global_scale_matches_ct_generate_gparam():
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    for amax in (0.0, 1e-3, 0.75, 3.0, 1234.5):
        t = torch.tensor([amax])
        assert torch.equal(kernels.global_scale_from_amax(amax), generate_gparam(-t, t))
