"""The fused numba CPU kernels equal the torch reference bit for bit (serial and parallel paths)."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import torch

nk = pytest.importorskip("kernels.numba_kernels", reason="numba is not installed")

from kernels import NonFiniteWeightError, global_scale_from_amax  # noqa: E402
from kernels.reference import (  # noqa: E402
    dequantize_nvfp4_reference,
    fake_quantize_nvfp4_activation_reference,
    fake_quantize_nvfp4_weight_reference,
    quantize_nvfp4_reference,
)
from tests.kernels.conftest import FLOAT_DTYPES, special_weight  # noqa: E402


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Run a test through the serial kernels, then through the prange kernels (any size)."""
    if request.param == "parallel":
        if torch.get_num_threads() < 2 or nk.numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("one thread: the parallel kernels are never used")
        monkeypatch.setattr(nk, "PARALLEL_MIN_ELEMENTS", 0)
    else:
        monkeypatch.setattr(nk, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    return request.param


def assert_same_nvfp4(a, b):
    assert torch.equal(a.weight_packed, b.weight_packed)
    assert torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))
    assert torch.equal(a.weight_global_scale, b.weight_global_scale)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor):
    """Same dtype, shape and bits (-0.0 differs from +0.0); NaNs only need to be at the same
    places (their payload is not part of the contract)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.view(int_dtype)[~nan_a], b.view(int_dtype)[~nan_b])


def fuzz_weights(dtype: torch.dtype, seed: int):
    """Random weights over a wide dynamic range, with exact ties and per-block magnitudes
    spanning subnormal FP8 scales to saturated ones."""
    g = torch.Generator().manual_seed(seed)
    rows, k = 23, 16 * 9
    magnitude = torch.exp2(torch.randint(-30, 12, (rows, k // 16, 1), generator=g).float())
    weight = torch.randn(rows, k // 16, 16, generator=g) * magnitude
    # exact E2M1 midpoints (ties) and table values, scaled so that scale_eff == 1 (gs = 448)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    weight[0, 0] = torch.cat([ties, -ties.flip(0)])
    weight[0, 1] = torch.cat([ties + 0.5, -(ties - 0.125)]).clamp(max=6.0)
    return weight.reshape(rows, k).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_equals_reference_on_edge_cases(path, dtype):
    weight = special_weight(dtype)
    assert_same_nvfp4(nk.quantize_nvfp4_numba(weight), quantize_nvfp4_reference(weight))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("global_scale", [None, 448.0, 1e-30, 3.0e37, 0.7])
def test_quantize_fuzz_equals_reference(path, dtype, global_scale):
    for seed in range(3):
        weight = fuzz_weights(dtype, seed)
        assert_same_nvfp4(
            nk.quantize_nvfp4_numba(weight, global_scale),
            quantize_nvfp4_reference(weight, global_scale),
        )


def test_quantize_ties_at_e2m1_midpoints_round_to_even():
    weight = fuzz_weights(torch.float32, 0)[:1, :16]  # amax 6 -> gs 448 -> scale_eff 1
    packed = nk.quantize_nvfp4_numba(weight, 448.0)
    assert float(packed.weight_scale.float()[0, 0]) == 448.0
    assert_same_nvfp4(packed, quantize_nvfp4_reference(weight, 448.0))
    codes = [(b >> s) & 15 for b in packed.weight_packed[0].tolist() for s in (0, 4)]
    assert codes[:8] == [0, 2, 2, 4, 4, 6, 6, 7]  # 0.25->0, 0.75->1.0, 1.25->1.0, ... 5->4


def test_quantize_non_contiguous_float64_and_large_rows(path):
    weight = torch.randn(80, 37, dtype=torch.float64).T  # [37, 80] non-contiguous, fp64
    gs = global_scale_from_amax(2.5)  # values past ±6 saturate
    assert_same_nvfp4(nk.quantize_nvfp4_numba(weight, gs), quantize_nvfp4_reference(weight, gs))
    wide = (torch.randn(65, 16 * 129) * 0.02).to(torch.bfloat16)
    assert_same_nvfp4(nk.quantize_nvfp4_numba(wide), quantize_nvfp4_reference(wide))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
def test_dequantize_equals_reference(path, dtype):
    for weight in (special_weight(torch.float32), fuzz_weights(torch.float32, 4)):
        for gs in (None, 1e-30, 3.0e37):  # fp16 overflow to inf / fp16 and bf16 subnormals
            packed = quantize_nvfp4_reference(weight, gs)
            assert_bit_equal(
                nk.dequantize_nvfp4_numba(*packed, dtype),
                dequantize_nvfp4_reference(*packed, dtype),
            )


def test_dequantize_non_contiguous_packed_and_uint8_scales():
    packed, scale, gs = quantize_nvfp4_reference(torch.randn(48, 64))
    packed_nc = packed.T.contiguous().T
    scale_nc = scale.view(torch.uint8).T.contiguous().T
    assert not packed_nc.is_contiguous()
    assert_bit_equal(
        nk.dequantize_nvfp4_numba(packed_nc, scale_nc, gs, torch.float32),
        dequantize_nvfp4_reference(packed, scale, gs, torch.float32),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fake_quantize_weight_equals_reference(path, dtype):
    for weight in (special_weight(dtype), fuzz_weights(dtype, 5)):
        for gs in (None, 448.0, 0.7):
            assert_bit_equal(
                nk.fake_quantize_nvfp4_weight_numba(weight, gs),
                fake_quantize_nvfp4_weight_reference(weight, gs),
            )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activation_fake_quant_equals_reference(path, dtype):
    x = special_weight(dtype, rows=15).reshape(3, 5, -1)
    gs = global_scale_from_amax(4.0)  # static calibration amax below the batch max: saturates
    assert_bit_equal(
        nk.fake_quantize_nvfp4_activation_numba(x, gs),
        fake_quantize_nvfp4_activation_reference(x, gs),
    )


def test_activation_non_finite_blocks_behave_like_the_reference():
    x = torch.randn(4, 48)
    x[0, 3] = float("nan")  # whole block -> NaN
    x[1, 20] = float("inf")  # saturates; the rest of the block is scaled by 448 / gs
    x[2, 40] = float("-inf")
    for dtype in FLOAT_DTYPES:
        xd = x.to(dtype)
        assert_bit_equal(
            nk.fake_quantize_nvfp4_activation_numba(xd, 300.0),
            fake_quantize_nvfp4_activation_reference(xd, 300.0),
        )


def test_activation_non_contiguous():
    x = torch.randn(48, 7).T  # [7, 48]
    assert_bit_equal(
        nk.fake_quantize_nvfp4_activation_numba(x, 300.0),
        fake_quantize_nvfp4_activation_reference(x, 300.0),
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("global_scale", [None, 10.0])
def test_non_finite_weight_names_the_tensor(path, bad, global_scale):
    weight = torch.randn(64, 1024).to(torch.bfloat16)
    weight[37, 5] = bad
    with pytest.raises(NonFiniteWeightError, match=r"layers\.3\.q_proj: 1 non-finite"):
        nk.quantize_nvfp4_numba(weight, global_scale, name="layers.3.q_proj")
    with pytest.raises(NonFiniteWeightError, match=r"layers\.3\.q_proj"):
        nk.fake_quantize_nvfp4_weight_numba(weight, global_scale, name="layers.3.q_proj")


def test_inputs_are_never_modified(path):
    for dtype in FLOAT_DTYPES:
        weight = special_weight(dtype)
        before = weight.clone()
        packed = nk.quantize_nvfp4_numba(weight)
        nk.fake_quantize_nvfp4_weight_numba(weight)
        nk.fake_quantize_nvfp4_activation_numba(weight, 100.0)
        assert torch.equal(
            weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
            before.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
        copies = [t.clone() for t in packed]
        nk.dequantize_nvfp4_numba(*packed, dtype)
        for a, b in zip(packed, copies, strict=True):
            assert torch.equal(
                a.view(torch.uint8) if a.element_size() == 1 else a,
                b.view(torch.uint8) if b.element_size() == 1 else b,
            )


def test_fp8_encoder_equals_torch_cast_on_all_codes_and_midpoints():
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    midpoints = (values[1:] + values[:-1]) / 2
    below = torch.nextafter(midpoints, torch.zeros(1))
    above = torch.nextafter(midpoints, torch.full((1,), 1e9))
    g = torch.Generator().manual_seed(3)
    randoms = torch.cat([torch.rand(1000, generator=g) * 448, torch.rand(1000, generator=g) / 64])
    tiny = torch.tensor([2.0**-10, 3 * 2.0**-11, 2.0**-12, 1e-30, 1e-40, 0.0])
    candidates = torch.cat([values, midpoints, below, above, randoms, tiny]).clamp(max=448.0)
    expected = candidates.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    got = [nk._fp8_e4m3_encode(np.float32(v)) for v in candidates.tolist()]
    assert got == expected


def _float16_boundaries() -> torch.Tensor:
    """float32 values around every float16 rounding boundary (normal, subnormal, overflow)."""
    halves = torch.arange(0, 0x7C01, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves.float()
    mids = (halves[1:].double() + halves[:-1].double()).div(2).float()
    up = torch.nextafter(mids, torch.full((1,), float("inf")))
    down = torch.nextafter(mids, torch.zeros(1))
    extra = torch.tensor([65519.0, 65520.0, 1e6, float("inf"), 2.0**-25, 2.0**-26, 1e-30])
    pos = torch.cat([halves, mids, up, down, extra])
    return torch.cat([pos, -pos])


def test_float16_and_bfloat16_stores_equal_torch_casts():
    values = _float16_boundaries()
    g = torch.Generator().manual_seed(9)
    values = torch.cat(
        [
            values,
            torch.randn(20000, generator=g)
            * torch.exp2(torch.randint(-140, 127, (20000,), generator=g).float()),
        ]
    )
    out16 = torch.empty(1, values.numel(), dtype=torch.float16)
    outbf = torch.empty(1, values.numel(), dtype=torch.bfloat16)
    nk._store_row(values.numpy(), out16.view(torch.uint16).numpy(), 0, nk.MODE_F16)
    nk._store_row(values.numpy(), outbf.view(torch.uint16).numpy(), 0, nk.MODE_BF16)
    assert torch.equal(out16[0].view(torch.int16), values.to(torch.float16).view(torch.int16))
    assert torch.equal(outbf[0].view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


def test_concurrent_calls_from_a_thread_pool_agree(monkeypatch):
    """Only one thread at a time runs the prange kernels (numba's workqueue layer aborts on
    concurrent launches); the others run serially (nogil)."""
    monkeypatch.setattr(nk, "PARALLEL_MIN_ELEMENTS", 0)
    weights = [(torch.randn(64, 1024) * (i + 1)).to(torch.bfloat16) for i in range(6)]
    expected = [quantize_nvfp4_reference(w) for w in weights]
    results: list = [None] * len(weights)

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = nk.quantize_nvfp4_numba(weights[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(weights))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        assert_same_nvfp4(got, want)


def _quantize_in_child(queue) -> None:
    # torch's own OpenMP pool is not fork safe either (as for DataLoader workers: one thread)
    torch.set_num_threads(1)
    nk._thread_count = lambda: 2  # would take the prange kernels but for the fork guard
    weight = torch.ones(64, 1024)
    queue.put(int(nk.quantize_nvfp4_numba(weight).weight_packed.sum()))


def test_forked_child_takes_the_serial_kernels(monkeypatch):
    """GNU OpenMP is not fork safe (numba's omp layer kills a forked child that launches a
    parallel region): a child forked after the parent ran prange kernels runs serially."""
    monkeypatch.setattr(nk, "PARALLEL_MIN_ELEMENTS", 0)
    nk.quantize_nvfp4_numba(torch.ones(64, 1024))  # parent: parallel kernels launched
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_quantize_in_child, args=(queue,), daemon=True)
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 64 * 512 * (7 | 7 << 4)
