"""GPTQ for NVFP4 under fixed scales: lower layer output error than round-to-nearest, exactly on the grid."""

from __future__ import annotations

import pytest
import torch

from calibration.emulate import linear_modules
from calibration.gptq import GPTQError, HessianAccumulator, gptq_nvfp4
from calibration.groups import select_targets
from calibration.observers import tokenize_batches
from kernels import (
    dequantize_nvfp4,
    global_scale_from_amax,
    quantize_nvfp4,
    search_nvfp4_block_scales,
)
from tests.calibration._tiny_models import PROMPTS, char_tokenizer, tiny_llama


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _repacked(q: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    return dequantize_nvfp4(*quantize_nvfp4(q, gs, block_scale=scale), torch.float32)


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations as LLMs have them: a few strong shared directions, uneven channel scales and a
    couple of outlier channels. ``[n, k]`` float32."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)
    x = latent + 0.3 * torch.randn(n, k, generator=g)
    x = x * torch.exp(0.5 * torch.randn(k, generator=g))
    x[:, :2] *= 20.0
    return x


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ (w - q).T))


@pytest.fixture(scope="module")
def layer_inputs():
    """Every targeted Linear of a tiny Llama with correlated (low-rank + outlier) embeddings, and the
    real-token inputs each one reads on the prompts."""
    model = tiny_llama(num_layers=2, seed=5)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(_correlated_inputs(emb.shape[0], emb.shape[1], seed=1) * 0.05)
    batches = tokenize_batches(char_tokenizer(), PROMPTS, max_length=48, batch_size=4)
    selection = select_targets(model)
    linears = linear_modules(model)
    inputs: dict[str, list[torch.Tensor]] = {m: [] for m in selection.quantized_layers}
    mask: list[torch.Tensor] = []

    def recorder(name):
        def hook(_module, args):
            inputs[name].append(args[0][mask[0]].detach().clone())

        return hook

    handles = [linears[m].register_forward_pre_hook(recorder(m)) for m in inputs]
    with torch.no_grad():
        for batch in batches:
            mask[:] = [batch.attention_mask.bool()]
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    return {m: (linears[m].weight.detach().clone(), torch.cat(xs)) for m, xs in inputs.items()}


@pytest.mark.parametrize("mse_scales", [False, True], ids=["rtn-scales", "mse-scales"])
def test_gptq_reduces_layer_output_error_on_every_layer(layer_inputs, mse_scales):
    assert len(layer_inputs) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name, (w, x) in layer_inputs.items():
        acc = HessianAccumulator(w.shape[1])
        acc.add(x)
        gs = global_scale_from_amax(w.abs().max())
        if mse_scales:
            scale = search_nvfp4_block_scales(w, gs, importance=acc.second_moment)
        else:
            scale = quantize_nvfp4(w, gs).weight_scale
        nearest = _repacked(w, scale, gs)  # round-to-nearest under the same scales
        q = gptq_nvfp4(w, acc.hessian, scale, gs)
        assert torch.equal(_bits(_repacked(q, scale, gs)), _bits(q)), name
        rtn_err, gptq_err = _output_error(x, w, nearest), _output_error(x, w, q)
        assert gptq_err < 0.97 * rtn_err, f"{name}: GPTQ {gptq_err:.4g} vs RTN {rtn_err:.4g}"


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_result_packs_losslessly_and_beats_rtn(act_order):
    torch.manual_seed(0)
    x = _correlated_inputs(2048, 256)
    w = torch.randn(96, 256) * 0.02
    w[:, 48:64] = 0.0  # an all-zero 16-block in every row: scale 0
    w[3] = 0.0  # an all-zero row
    w[:, 7] = 0.0  # a zero column inside a live block
    acc = HessianAccumulator(256)
    acc.add(x)
    gs = global_scale_from_amax(w.abs().max())
    scale = quantize_nvfp4(w, gs).weight_scale
    q = gptq_nvfp4(w, acc.hessian, scale, gs, act_order=act_order, block_size=64)
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert torch.equal(_bits(_repacked(q, scale, gs)), _bits(q))  # bit for bit, +0 never -0
    assert not torch.signbit(q[q == 0]).any()
    assert torch.equal(q[:, 48:64], torch.zeros(96, 16))  # zero scale: zero codes
    assert _output_error(x, w, q) < 0.9 * _output_error(x, w, _repacked(w, scale, gs))


def test_act_order_changes_the_result_but_keeps_each_columns_block_scale():
    torch.manual_seed(1)
    x = _correlated_inputs(1024, 128, seed=3)
    w = torch.randn(32, 128) * torch.linspace(0.2, 3.0, 128)  # block scales differ along K
    acc = HessianAccumulator(128)
    acc.add(x)
    gs = global_scale_from_amax(w.abs().max())
    scale = quantize_nvfp4(w, gs).weight_scale
    plain = gptq_nvfp4(w, acc.hessian, scale, gs, act_order=False)
    ordered = gptq_nvfp4(w, acc.hessian, scale, gs, act_order=True)
    assert not torch.equal(plain, ordered)
    for q in (plain, ordered):  # on the grid of its own block's scale, column by column
        assert torch.equal(_bits(_repacked(q, scale, gs)), _bits(q))


def test_dead_inputs_round_to_nearest_and_pass_no_error():
    torch.manual_seed(2)
    x = _correlated_inputs(1024, 64, seed=4)
    dead = [5, 17, 40]
    x[:, dead] = 0.0
    w = torch.randn(16, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    h = acc.hessian
    assert torch.all(torch.diagonal(h)[dead] == 0)
    gs = global_scale_from_amax(w.abs().max())
    scale = quantize_nvfp4(w, gs).weight_scale
    nearest = _repacked(w, scale, gs)
    for act_order in (False, True):
        q = gptq_nvfp4(w, h, scale, gs, act_order=act_order)
        assert torch.isfinite(q).all()
        assert torch.equal(q[:, dead], nearest[:, dead])  # dead columns keep their weight, rounded
        # and their (irrelevant) error reached no live column: same as GPTQ without the dead columns
        live = [k for k in range(64) if k not in dead]
        assert _output_error(x, w, q) < _output_error(x, w, nearest)
        assert torch.isfinite(q[:, live]).all()


def test_no_calibration_token_is_round_to_nearest():
    w = torch.randn(8, 32)
    gs = global_scale_from_amax(w.abs().max())
    scale = quantize_nvfp4(w, gs).weight_scale
    q = gptq_nvfp4(w, HessianAccumulator(32).hessian, scale, gs)
    assert torch.equal(q, _repacked(w, scale, gs) + 0.0)


def test_hessian_accumulator_is_two_over_n_xtx():
    x = torch.randn(3, 50, 32, dtype=torch.float32)
    acc, diag = HessianAccumulator(32), HessianAccumulator(32, diagonal_only=True)
    for chunk in (x[0], x[1:]):
        acc.add(chunk)
        diag.add(chunk)
    flat = x.reshape(-1, 32).double()
    assert acc.num_samples == diag.num_samples == 150
    torch.testing.assert_close(
        acc.hessian.double(), 2.0 / 150 * flat.T @ flat, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(acc.second_moment.double(), (flat**2).mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(diag.second_moment, acc.second_moment, rtol=1e-6, atol=0)
    with pytest.raises(GPTQError):
        diag.hessian  # noqa: B018
    with pytest.raises(GPTQError):
        acc.add(torch.randn(4, 31))


def test_shape_mismatches_are_refused():
    w = torch.randn(8, 32)
    gs = global_scale_from_amax(w.abs().max())
    scale = quantize_nvfp4(w, gs).weight_scale
    with pytest.raises(GPTQError):
        gptq_nvfp4(w, torch.eye(16), scale, gs)
    with pytest.raises(GPTQError):
        gptq_nvfp4(w, torch.eye(32), scale[:, :1], gs)
    with pytest.raises(GPTQError):
        gptq_nvfp4(torch.randn(8, 30), torch.eye(30), scale, gs)
    with pytest.raises(GPTQError):
        gptq_nvfp4(w, torch.full((32, 32), float("nan")), scale, gs)
