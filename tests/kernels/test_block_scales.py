"""NVFP4 beyond round-to-nearest: given block scales, grid rounding, the MSE block-scale search
(reference vs torch vs numba vs Triton interpreter, bit for bit), headroom and Four Over Six."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from kernels import (
    E2M1_VALUES,
    FOUR_OVER_SIX,
    NVFP4Error,
    NVFP4ShapeError,
    ScaleCandidates,
    global_scale_from_amax,
)
from kernels.formats import FOUR_OVER_SIX_CANDIDATE
from kernels.reference import (
    dequantize_nvfp4_reference,
    quantize_nvfp4_reference,
    unpack_codes_reference,
)
from tests.kernels.conftest import FLOAT_DTYPES, SEARCH_SHAPES, search_weight

BACKENDS = ("reference", "torch", "triton") + (("numba",) if kernels.numba_available() else ())
CANDIDATE_SETS = [
    ScaleCandidates(),
    FOUR_OVER_SIX,
    ScaleCandidates(codes_below=2, codes_above=11, four_over_six=True),
]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _per_backend(force_backend, fn) -> dict[str, object]:
    results = {}
    for backend in BACKENDS:
        force_backend(backend)
        results[backend] = fn()
    return results


def _importance(k: int, seed: int = 3) -> torch.Tensor:
    """Heavy-tailed per-channel second moments (a few channels dominate, some are 0)."""
    g = torch.Generator().manual_seed(seed)
    importance = torch.exp(3 * torch.randn(k, generator=g))
    importance[::7] = 0.0
    return importance


# --------------------------------------------------------------------------- given block scales


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_given_rtn_scales_reproduce_rtn_bytes_in_every_backend(force_backend, dtype):
    weight = search_weight(dtype, (130, 272))
    rtn = quantize_nvfp4_reference(weight)
    for backend, packed in _per_backend(
        force_backend,
        lambda: kernels.quantize_nvfp4(
            weight, rtn.weight_global_scale, block_scale=rtn.weight_scale
        ),
    ).items():
        for got, want in zip(packed, rtn, strict=True):
            assert torch.equal(_bits(got), _bits(want)), backend


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SEARCH_SHAPES)
def test_arbitrary_block_scales_same_bytes_everywhere(force_backend, dtype, shape):
    weight = search_weight(dtype, shape, seed=1)
    g = torch.Generator().manual_seed(2)
    block_scale = torch.randint(0, 127, (shape[0], shape[1] // 16), generator=g).to(torch.uint8)
    block_scale[0, 0] = 0  # a zero scale: codes 0
    block_scale = block_scale.view(torch.float8_e4m3fn)
    gs = global_scale_from_amax(weight.float().abs().amax())
    quantized = _per_backend(
        force_backend, lambda: kernels.quantize_nvfp4(weight, gs, block_scale=block_scale)
    )
    faked = _per_backend(
        force_backend,
        lambda: kernels.fake_quantize_nvfp4_weight(weight, gs, block_scale=block_scale),
    )
    ref = quantized["reference"]
    assert torch.equal(_bytes(ref.weight_scale), _bytes(block_scale))
    assert unpack_codes_reference(ref.weight_packed)[0, :16].eq(0).all()
    for backend in BACKENDS:
        for got, want in zip(quantized[backend], ref, strict=True):
            assert torch.equal(_bits(got), _bits(want)), backend
        assert torch.equal(_bits(faked[backend]), _bits(faked["reference"])), backend
    assert torch.equal(
        _bits(faked["reference"]), _bits(dequantize_nvfp4_reference(*ref, dtype=dtype))
    )


def test_given_scales_non_contiguous_weight_and_scales(force_backend):
    base = search_weight(torch.float32, (17, 48), seed=4)
    weight = base.T.contiguous().T  # same values, column-major strides
    assert not weight.is_contiguous()
    scales = quantize_nvfp4_reference(base).weight_scale
    scales_nc = _bytes(scales).T.contiguous().T.view(torch.float8_e4m3fn)
    want = quantize_nvfp4_reference(base, 3.0, block_scale=scales)
    for backend, got in _per_backend(
        force_backend, lambda: kernels.quantize_nvfp4(weight, 3.0, block_scale=scales_nc)
    ).items():
        assert torch.equal(got.weight_packed, want.weight_packed), backend


def test_values_beyond_six_scales_saturate():
    weight = torch.tensor([[1.0, -1.0, 5.9, 100.0] + [0.0] * 12])
    block_scale = torch.tensor([[1.0]]).to(torch.float8_e4m3fn)  # scale_eff = 1 with gs 1
    packed = quantize_nvfp4_reference(weight, 1.0, block_scale=block_scale)
    assert unpack_codes_reference(packed.weight_packed)[0, :4].tolist() == [2, 10, 7, 7]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (torch.full((2, 2), 0x7F, dtype=torch.uint8), "negative or NaN"),
        (torch.full((2, 2), 0x80, dtype=torch.uint8), "negative or NaN"),  # -0.0
        (torch.tensor([[-1.0, 1.0], [1.0, 1.0]]).to(torch.float8_e4m3fn), "negative or NaN"),
        (torch.ones(2, 3).to(torch.float8_e4m3fn), "shape"),
        (torch.ones(2, 2), "float8_e4m3fn"),
    ],
)
def test_bad_block_scales_are_rejected_by_every_backend(force_backend, bad, error):
    weight = torch.randn(2, 32)
    for backend in BACKENDS:
        force_backend(backend)
        with pytest.raises(NVFP4Error, match=error):
            kernels.quantize_nvfp4(weight, 1.0, block_scale=bad, name="layers.0.up_proj")
        with pytest.raises(NVFP4Error, match="layers.0.up_proj"):
            kernels.fake_quantize_nvfp4_weight(
                weight, 1.0, block_scale=bad, name="layers.0.up_proj"
            )


# --------------------------------------------------------------------------- grid rounding


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_to_grid_equals_dequantize_of_quantize_column_by_column(
    force_backend, backend, dtype
):
    weight = search_weight(dtype, (130, 272), seed=5)
    gs = global_scale_from_amax(weight.float().abs().amax() / 3)  # some values saturate
    scales = kernels.search_nvfp4_block_scales(weight, gs)
    expected = dequantize_nvfp4_reference(
        *quantize_nvfp4_reference(weight, gs, block_scale=scales), dtype=torch.float32
    )
    scale_eff = scales.to(torch.float32) / gs  # [out, nb]
    force_backend(backend)
    for start, width in ((0, 1), (1, 16), (17, 47), (64, 128), (271, 1)):
        columns = slice(start, start + width)
        block = torch.arange(272)[columns] // 16
        got = kernels.round_to_nvfp4_grid(weight[:, columns].float(), scale_eff[:, block])
        assert got.dtype == torch.float32
        assert torch.equal(_bits(got), _bits(expected[:, columns])), (start, width)
    # one scale per row broadcasts over a slice inside one block (GPTQ's inner loop)
    got = kernels.round_to_nvfp4_grid(weight[:, 32:40], scale_eff[:, 2:3])
    assert torch.equal(_bits(got), _bits(expected[:, 32:40]))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_round_to_grid_signs_zero_scale_and_saturation(force_backend, backend):
    force_backend(backend)
    values = torch.tensor([-0.0, 0.0, -0.1, 0.1, 0.25, -0.75, 5.0, 7.0, -100.0, 3.0])
    scale = torch.tensor([1.0] * 9 + [0.0])
    got = kernels.round_to_nvfp4_grid(values, scale)
    expected = torch.tensor([0.0, 0.0, -0.0, 0.0, 0.0, -1.0, 4.0, 6.0, -6.0, 0.0])
    assert torch.equal(_bits(got), _bits(expected))


# --------------------------------------------------------------------------- the search


def _e2m1_rne(value: float) -> float:
    """Independent E2M1 oracle: the nearest table value, ties to the even code, saturating."""
    table = E2M1_VALUES.tolist()
    magnitude = min(abs(value), 6.0)
    index = min(range(8), key=lambda i: (abs(magnitude - table[i]), i % 2))
    return -table[index] if value < 0 else table[index]


def _fp8(value: float) -> tuple[int, float]:
    byte = int(torch.tensor([value], dtype=torch.float32).to(torch.float8_e4m3fn).view(torch.uint8))
    return byte, float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


def search_oracle(weight, gs, importance, candidates) -> list[list[int]]:
    """Scalar restatement of the search (numpy float32 steps, Python float64 error)."""
    gs32 = np.float32(float(gs))
    x = weight.float().numpy()
    w = np.ones(x.shape[1]) if importance is None else importance.float().numpy()
    chosen = []
    for row in x:
        row_choice = []
        for b in range(len(row) // 16):
            block = row[16 * b : 16 * b + 16]
            amax = np.float32(np.abs(block).max())
            rtn, _ = _fp8(float(min(gs32 * np.float32(amax / np.float32(6)), np.float32(448))))
            best_byte, best_error = rtn, None
            for offset in candidates.order():
                if offset == FOUR_OVER_SIX_CANDIDATE:
                    byte, _ = _fp8(float(min(gs32 * np.float32(amax / np.float32(4)), 448)))
                else:
                    byte = rtn + offset
                    if offset and not 1 <= byte <= 126:
                        continue
                scale_eff = np.float32(_fp8_value(byte) / gs32)
                error = 0.0
                for k, value in enumerate(block):
                    decoded = (
                        np.float32(0)
                        if scale_eff == 0
                        else np.float32(_e2m1_rne(float(np.float32(value / scale_eff)))) * scale_eff
                    )
                    diff = float(value) - float(decoded)
                    error = error + (diff * diff) * float(np.float32(w[16 * b + k]))
                if best_error is None or error < best_error:
                    best_byte, best_error = byte, error
            row_choice.append(best_byte)
        chosen.append(row_choice)
    return chosen


def _fp8_value(byte: int) -> np.float32:
    return np.float32(
        float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
    )


def test_oracle_rounds_like_the_codec():
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2, 5.5, 7.0, -0.75])
    assert [_e2m1_rne(v) for v in values.tolist()] == [
        0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, 6.0, 6.0, -1.0
    ]  # fmt: skip


@pytest.mark.parametrize("candidates", CANDIDATE_SETS, ids=["wide", "4over6", "asym"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
def test_reference_search_equals_scalar_oracle(candidates, weighted):
    weight = search_weight(torch.float32, (9, 48), seed=7)
    gs = global_scale_from_amax(weight.abs().amax(), headroom=1.75)
    importance = _importance(48) if weighted else None
    got = kernels.reference.search_nvfp4_block_scales_reference(
        weight, gs, importance=importance, candidates=candidates
    )
    assert _bytes(got).tolist() == search_oracle(weight, gs, importance, candidates)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SEARCH_SHAPES)
@pytest.mark.parametrize("candidates", CANDIDATE_SETS, ids=["wide", "4over6", "asym"])
def test_search_bit_exact_across_backends(force_backend, dtype, shape, candidates):
    weight = search_weight(dtype, shape, seed=11)
    amax = weight.float().abs().amax()
    for gs, importance in (
        (None, None),
        (global_scale_from_amax(amax, headroom=1.75), _importance(shape[1])),
        (global_scale_from_amax(amax / 4), None),  # values past 448 * 6 saturate
    ):
        results = _per_backend(
            force_backend,
            lambda gs=gs, importance=importance: kernels.search_nvfp4_block_scales(
                weight, gs, importance=importance, candidates=candidates
            ),
        )
        for backend in BACKENDS:
            assert results[backend].dtype == torch.float8_e4m3fn
            assert results[backend].shape == (shape[0], shape[1] // 16)
            assert torch.equal(_bytes(results[backend]), _bytes(results["reference"])), backend


def test_search_non_contiguous_and_float64(force_backend):
    base = search_weight(torch.float32, (130, 272), seed=12).T.contiguous()  # [272, 130]
    weight = base.T  # a transposed view [130, 272]
    assert not weight.is_contiguous()
    importance = _importance(272).to(torch.float64)
    want = kernels.reference.search_nvfp4_block_scales_reference(
        weight.contiguous(), importance=importance
    )
    for backend, got in _per_backend(
        force_backend,
        lambda: kernels.search_nvfp4_block_scales(weight, importance=importance),
    ).items():
        assert torch.equal(_bytes(got), _bytes(want)), backend
    got64 = kernels.search_nvfp4_block_scales(weight.to(torch.float64), importance=importance)
    assert torch.equal(_bytes(got64), _bytes(want))


@pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")
def test_numba_search_parallel_path_equals_serial(monkeypatch):
    from kernels import numba_kernels as nk

    if torch.get_num_threads() < 2 or nk.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread: the parallel kernels are never used")
    weight = search_weight(torch.bfloat16, (130, 272), seed=13)
    monkeypatch.setattr(nk, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    serial = nk.search_nvfp4_block_scales_numba(weight, candidates=CANDIDATE_SETS[2])
    monkeypatch.setattr(nk, "PARALLEL_MIN_ELEMENTS", 0)
    parallel = nk.search_nvfp4_block_scales_numba(weight, candidates=CANDIDATE_SETS[2])
    assert torch.equal(_bytes(serial), _bytes(parallel))


def test_ties_go_to_round_to_nearest():
    # a lone 12 with gs 1: scales 2, 3, 4, 6, 8, 12, 24 all encode it exactly (error 0)
    weight = torch.zeros(2, 16)
    weight[0, 5] = 12.0
    got = kernels.reference.search_nvfp4_block_scales_reference(weight, 1.0)
    assert _bytes(got).tolist() == [[_fp8(2.0)[0]], [0]]  # zero block keeps scale 0


def test_tie_between_neighbours_goes_to_the_lower_one(force_backend):
    # [6.0, 6.5, 0, ...] with gs 1: round-to-nearest scale 1.125 errs 0.625; scales 1.0 (one code
    # below) and 1.5 (three above) both err exactly 0.25: the lower one comes first in the order
    weight = torch.zeros(1, 16)
    weight[0, :2] = torch.tensor([6.0, 6.5])
    candidates = ScaleCandidates(codes_below=3, codes_above=3)
    for backend, got in _per_backend(
        force_backend,
        lambda: kernels.search_nvfp4_block_scales(weight, 1.0, candidates=candidates),
    ).items():
        assert float(got.float()) == 1.0, backend
    assert _bytes(got).tolist() == search_oracle(weight, 1.0, None, candidates)
    above_only = ScaleCandidates(codes_below=0, codes_above=3)
    got = kernels.reference.search_nvfp4_block_scales_reference(weight, 1.0, candidates=above_only)
    assert float(got.float()) == 1.5


def test_search_never_worse_than_rtn_and_usually_better():
    g = torch.Generator().manual_seed(31)
    gaussian = torch.randn(256, 512, generator=g)
    chi2 = (torch.randn(3, 256, 512, generator=g) ** 2).sum(0)
    student = torch.randn(256, 512, generator=g) / (chi2 / 3).sqrt()  # Student-t, 3 dof
    importance = _importance(512)
    for weight in (gaussian, student):
        gs = global_scale_from_amax(weight.abs().amax())
        rtn = dequantize_nvfp4_reference(*quantize_nvfp4_reference(weight, gs), torch.float32)
        for w in (None, importance):
            scales = kernels.search_nvfp4_block_scales(weight, gs, importance=w)
            found = dequantize_nvfp4_reference(
                *quantize_nvfp4_reference(weight, gs, block_scale=scales), torch.float32
            )
            per_channel = torch.ones(512) if w is None else w
            rtn_err = ((weight - rtn).double() ** 2 * per_channel).reshape(256, 32, 16).sum(-1)
            err = ((weight - found).double() ** 2 * per_channel).reshape(256, 32, 16).sum(-1)
            assert (err <= rtn_err * (1 + 1e-12)).all()  # per block, never worse
            # measured: -27 % (Gaussian), -15 % (Student-t) unweighted; -77 to -83 % weighted
            assert err.sum() < (0.9 if w is None else 0.5) * rtn_err.sum()


def test_importance_weighting_lowers_the_weighted_error():
    g = torch.Generator().manual_seed(32)
    weight = torch.randn(256, 512, generator=g)
    importance = _importance(512)
    plain = kernels.search_nvfp4_block_scales(weight)
    weighted = kernels.search_nvfp4_block_scales(weight, importance=importance)

    def weighted_error(scales):
        decoded = dequantize_nvfp4_reference(
            *quantize_nvfp4_reference(weight, block_scale=scales), torch.float32
        )
        return float(((weight - decoded).double() ** 2 * importance).sum())

    assert weighted_error(weighted) < 0.95 * weighted_error(plain)


def test_four_over_six_picks_the_six_or_the_four_scale():
    weight = search_weight(torch.float32, (130, 272), seed=41)
    amax = weight.abs().amax()
    gs = global_scale_from_amax(amax, headroom=1.75)
    got = _bytes(kernels.search_nvfp4_block_scales(weight, gs, candidates=FOUR_OVER_SIX))
    blocks = weight.reshape(130, 17, 16).abs().amax(-1)
    six = (gs * (blocks / 6)).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
    four = (gs * (blocks / 4)).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert ((got == six) | (got == four)).all()
    assert (got == four).any() and (got == six).any()
    # with headroom the block holding the amax can take the 4 scale (448 / 1.75 * 1.5 = 384)
    top = (blocks == amax).nonzero()[0]
    assert float(four[top[0], top[1]].view(torch.float8_e4m3fn).float()) == 384.0


def test_without_headroom_the_amax_block_cannot_go_above_448():
    weight = search_weight(torch.float32, (17, 48), seed=42)
    got = kernels.search_nvfp4_block_scales(weight, candidates=ScaleCandidates(0, 8))
    assert int(_bytes(got).max()) <= 0x7E


def test_headroom_global_scale():
    amax = torch.tensor([3.25])
    assert torch.equal(global_scale_from_amax(amax, headroom=1.0), global_scale_from_amax(amax))
    assert torch.equal(global_scale_from_amax(amax, headroom=1.75), 1536.0 / amax)
    weight = torch.full((1, 16), 3.25)
    packed = quantize_nvfp4_reference(weight, global_scale_from_amax(amax, headroom=1.75))
    assert float(packed.weight_scale.float()) == 256.0
    with pytest.raises(NVFP4Error, match="headroom"):
        global_scale_from_amax(amax, headroom=0.5)


def test_candidate_order_and_validation():
    assert ScaleCandidates(2, 3).order() == (0, -1, 1, -2, 2, 3)
    assert FOUR_OVER_SIX.order() == (0, FOUR_OVER_SIX_CANDIDATE)
    assert ScaleCandidates(1, 0, True).order() == (0, FOUR_OVER_SIX_CANDIDATE, -1)
    with pytest.raises(NVFP4Error, match="codes_below"):
        ScaleCandidates(codes_below=-1)


def test_search_input_errors_name_the_tensor(force_backend):
    for backend in BACKENDS:
        force_backend(backend)
        with pytest.raises(NVFP4ShapeError, match="q_proj"):
            kernels.search_nvfp4_block_scales(torch.randn(4, 24), name="q_proj")
        bad = torch.randn(4, 32)
        bad[1, 3] = float("inf")
        with pytest.raises(kernels.NonFiniteWeightError, match="k_proj"):
            kernels.search_nvfp4_block_scales(bad, name="k_proj")
        with pytest.raises(NVFP4ShapeError, match="importance"):
            kernels.search_nvfp4_block_scales(torch.randn(4, 32), importance=torch.ones(16))
        with pytest.raises(NVFP4Error, match="importance"):
            kernels.search_nvfp4_block_scales(
                torch.randn(4, 32), importance=-torch.ones(32), name="v_proj"
            )


def test_search_and_given_scale_quantize_never_modify_inputs(force_backend):
    weight = search_weight(torch.bfloat16, (17, 48), seed=51)
    importance = _importance(48)
    before = (weight.clone(), importance.clone())
    for backend in BACKENDS:
        force_backend(backend)
        scales = kernels.search_nvfp4_block_scales(weight, importance=importance)
        scale_copy = scales.clone()
        kernels.quantize_nvfp4(weight, block_scale=scales)
        kernels.fake_quantize_nvfp4_weight(weight, block_scale=scales)
        assert torch.equal(_bytes(scales), _bytes(scale_copy)), backend
    assert torch.equal(_bits(weight), _bits(before[0])) and torch.equal(importance, before[1])
