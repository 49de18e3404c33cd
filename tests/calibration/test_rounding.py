"""round_model: one sequential pass, weights restored, rounded groups packed and served as emulated."""

from __future__ import annotations

import pytest
import torch

from calibration.checkpoint import export_checkpoint, load_checkpoint
from calibration.emulate import EmulationError, emulate, linear_modules, quantize_groups
from calibration.gptq import HessianAccumulator, gptq_nvfp4
from calibration.groups import select_targets
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.precision import Rounding, Tier
from calibration.rounding import (
    RoundedGroup,
    RoundingError,
    load_rounded,
    observes_every_input,
    round_and_observe,
    round_model,
    rounded_metadata,
    save_rounded,
)
from calibration.sensitivity import _forward_logits
from kernels import dequantize_nvfp4, global_scale_from_amax, quantize_nvfp4
from tests.calibration._tiny_models import PROMPTS, char_tokenizer, tiny_llama, tiny_mixtral


@pytest.fixture(scope="module")
def setup():
    """An fp32 tiny Llama (3 blocks), padded calibration batches, and every method's rounding."""
    model = tiny_llama(num_layers=3, seed=7)
    tokenizer = char_tokenizer()
    selection = select_targets(model)
    batches = tokenize_batches(tokenizer, PROMPTS, max_length=40, batch_size=5)
    assert any(not bool(b.attention_mask.all()) for b in batches)  # padding present
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rounded = {m: round_model(model, batches, selection, m, tiers=Tier.NVFP4A16) for m in Rounding}
    return model, tokenizer, selection, batches, before, rounded


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_the_pass_observes_the_input_amax_the_statistics_forward_sees(setup):
    """With nothing quantized on the way (every group BF16), the rounding pass's observed amax is the
    statistics forward's exactly; under W4A4 block 0 still matches (its inputs carry no error yet)
    and later blocks see their propagated, quantized inputs."""
    model, _, selection, batches, _, _ = setup
    stats = collect_activation_stats(model, batches, selection, progress=False)
    assert observes_every_input(selection, Rounding.GPTQ_MSE)
    assert not observes_every_input(selection, Rounding.RTN)
    rounded, amax = round_and_observe(
        model, batches, selection, Rounding.GPTQ, tiers={}, observe_input_amax=True
    )
    assert rounded == {}
    assert amax == pytest.approx(dict(stats.group_input_amax), rel=0, abs=0)
    _, w4a4 = round_and_observe(
        model, batches, selection, Rounding.GPTQ, tiers=Tier.NVFP4, observe_input_amax=True
    )
    assert list(w4a4) == [g.name for g in selection.groups]
    for group in selection.groups:
        if group.block_index == 0:
            assert w4a4[group.name] == stats.group_input_amax[group.name], group.name
    later = [g.name for g in selection.groups if g.block_index == 2]
    assert any(w4a4[n] != stats.group_input_amax[n] for n in later)
    with pytest.raises(RoundingError, match="cannot observe"):
        round_and_observe(model, batches, selection, Rounding.RTN, observe_input_amax=True)


def test_round_model_restores_the_models_weights(setup):
    model, _, _, _, before, _ = setup
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_every_group_rounded_on_its_grid_with_one_global_scale(setup):
    _, _, selection, _, _, rounded = setup
    for method, groups in rounded.items():
        assert list(groups) == [g.name for g in selection.groups], method
        for group in selection.groups:
            r = groups[group.name]
            assert r.members == group.members
            assert r.global_scale.dtype == torch.float32 and r.global_scale.shape == (1,)
            for m in group.members:
                assert r.weights[m].dtype == torch.float32
                assert r.block_scales[m].dtype == torch.float8_e4m3fn
                packed = quantize_nvfp4(r.weights[m], r.global_scale, block_scale=r.block_scales[m])
                assert torch.equal(
                    _bits(dequantize_nvfp4(*packed, torch.float32)), _bits(r.weights[m])
                ), (method, m)


def test_rtn_equals_quantize_groups_default(setup):
    """Same scales, same values; only the sign of zero may differ (round-to-nearest stores a small
    negative as code 8, -0; a rounded weight holds +0, code 0): both serve the same products."""
    model, _, selection, _, _, rounded = setup
    default = quantize_groups(model, selection.groups, Tier.NVFP4A16)
    via = quantize_groups(model, selection.groups, Tier.NVFP4A16, rounded=rounded[Rounding.RTN])
    for a, b in zip(default, via, strict=True):
        for ma, mb in zip(a.members, b.members, strict=True):
            assert ma.tensors.keys() == mb.tensors.keys()
            for key in ("weight_scale", "weight_global_scale"):
                assert torch.equal(
                    ma.tensors[key].view(torch.uint8), mb.tensors[key].view(torch.uint8)
                )
            wa, wb = ma.dequantized_weight(torch.float32), mb.dequantized_weight(torch.float32)
            assert torch.equal(wa, wb), ma.name  # -0.0 == +0.0
            same_byte = ma.tensors["weight_packed"] == mb.tensors["weight_packed"]
            sign_of_zero = (ma.tensors["weight_packed"] ^ mb.tensors["weight_packed"]) & 0x77 == 0
            assert bool((same_byte | sign_of_zero).all())


def test_methods_change_the_codes(setup):
    _, _, selection, _, _, rounded = setup
    member = selection.groups[0].members[0]
    weights = {m: rounded[m][selection.groups[0].name].weights[member] for m in Rounding}
    assert len({w.numpy().tobytes() for w in weights.values()}) == 4


def _block0_inputs(model, batches, member):
    """The real-token inputs ``member`` (in block 0, so nothing upstream is quantized) reads."""
    module = linear_modules(model)[member]
    acc = HessianAccumulator(module.in_features)
    mask = []
    handle = module.register_forward_pre_hook(lambda _m, args: acc.add(args[0][mask[0]]))
    with torch.no_grad():
        for batch in batches:
            mask[:] = [batch.attention_mask.bool()]
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    return acc


def test_block0_gptq_uses_the_hessian_of_real_tokens_only(setup):
    model, _, selection, batches, _, rounded = setup
    group = selection.groups[0]  # block 0 q/k/v
    acc = _block0_inputs(model, batches, group.members[0])
    r = rounded[Rounding.GPTQ][group.name]
    stacked = torch.cat([linear_modules(model)[m].weight for m in group.members])
    scales = torch.cat([r.block_scales[m] for m in group.members])
    expected = gptq_nvfp4(stacked, acc.hessian, scales, r.global_scale)
    got = torch.cat([r.weights[m] for m in group.members])
    assert torch.equal(got, expected)
    # pad rows in the Hessian would change the result (the oracle can fail)
    padded = HessianAccumulator(group.in_features)
    padded.add(acc.hessian[:1] * 0.0 + 1.0)
    padded._sum = padded._sum + acc._sum
    assert not torch.equal(gptq_nvfp4(stacked, padded.hessian, scales, r.global_scale), got)


def test_mse_lowers_input_weighted_error_against_rtn(setup):
    model, _, selection, batches, _, rounded = setup
    linears = linear_modules(model)
    for group in [g for g in selection.groups if g.block_index == 0]:
        importance = _block0_inputs(model, batches, group.members[0]).second_moment
        for m in group.members:
            w = linears[m].weight.detach()

            def weighted(q, w=w, importance=importance):
                return float((((w - q) ** 2) * importance).sum())

            rtn = weighted(rounded[Rounding.RTN][group.name].weights[m])
            mse = weighted(rounded[Rounding.MSE][group.name].weights[m])
            assert mse < 0.95 * rtn, (m, mse, rtn)


def test_gptq_lowers_block0_output_error_against_rtn(setup):
    model, _, selection, batches, _, rounded = setup
    linears = linear_modules(model)
    for group in [g for g in selection.groups if g.block_index == 0]:
        h = _block0_inputs(model, batches, group.members[0]).hessian
        for m in group.members:
            w = linears[m].weight.detach()

            def err(q, w=w, h=h):
                d = w - q
                return float(torch.einsum("oi,ij,oj->", d, h, d))  # ~ ||X (W - Q)^T||^2

            assert err(rounded[Rounding.GPTQ][group.name].weights[m]) < err(
                rounded[Rounding.RTN][group.name].weights[m]
            ), m
            assert err(rounded[Rounding.GPTQ_MSE][group.name].weights[m]) < err(
                rounded[Rounding.MSE][group.name].weights[m]
            ), m


@pytest.mark.parametrize("tier", [Tier.NVFP4A16, Tier.NVFP4])
def test_emulation_with_rounded_equals_reloaded_checkpoint(setup, tmp_path, tier):
    model, tokenizer, selection, batches, _, rounded = setup
    stats = collect_activation_stats(model, batches, selection, progress=False)
    chosen = rounded[Rounding.GPTQ_MSE]
    planned = quantize_groups(model, selection.groups, tier, stats.group_input_amax, chosen)
    with emulate(model, planned, storage_dtype=torch.bfloat16), torch.no_grad():
        emulated = [_forward_logits(model, b) for b in batches]
        # the emulated weights are the rounded ones (fp32 model)
        member = selection.groups[0].members[0]
        assert torch.equal(
            linear_modules(model)[member].weight, chosen[selection.groups[0].name].weights[member]
        )
    export_checkpoint(model, tmp_path / "ckpt", planned, tokenizer=tokenizer)
    reloaded, _, info = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    assert set(info.tiers.values()) == {tier}
    with torch.no_grad():
        for batch, expected in zip(batches, emulated, strict=True):
            assert torch.equal(_forward_logits(reloaded, batch), expected)
    # the default (round-to-nearest) checkpoint computes something else: the oracle can fail
    default = quantize_groups(model, selection.groups, tier, stats.group_input_amax)
    with emulate(model, default, storage_dtype=torch.bfloat16), torch.no_grad():
        assert not torch.equal(_forward_logits(model, batches[0]), emulated[0])


def test_rounded_for_fp8_and_bf16_tiers_is_ignored(setup):
    model, _, selection, _, _, rounded = setup
    tiers = {g.name: (Tier.FP8 if i % 2 else Tier.BF16) for i, g in enumerate(selection.groups)}
    plain = quantize_groups(model, selection.groups, tiers)
    via = quantize_groups(model, selection.groups, tiers, rounded=rounded[Rounding.GPTQ])
    for a, b in zip(plain, via, strict=True):
        for ma, mb in zip(a.members, b.members, strict=True):
            for key in ma.tensors:
                assert torch.equal(ma.tensors[key], mb.tensors[key])


def test_rounded_members_must_match_the_group(setup):
    model, _, selection, _, _, rounded = setup
    group = selection.groups[0]
    wrong = dict(rounded[Rounding.RTN])
    other = rounded[Rounding.RTN][selection.groups[1].name]
    wrong[group.name] = other
    with pytest.raises(EmulationError):
        quantize_groups(model, [group], Tier.NVFP4A16, rounded=wrong)


def test_save_and_load_round_trip_bit_for_bit(setup, tmp_path):
    _, _, _, _, _, rounded = setup
    groups = rounded[Rounding.GPTQ_MSE]
    path = save_rounded(tmp_path / "rounded.safetensors", groups, metadata={"method": "gptq-mse"})
    assert path.read_bytes()[:8]  # a safetensors header, not a pickle
    loaded = load_rounded(path)
    assert rounded_metadata(path)["method"] == "gptq-mse"
    assert list(loaded) == list(groups)
    for name, r in groups.items():
        assert torch.equal(loaded[name].global_scale, r.global_scale)
        for m in r.members:
            assert torch.equal(_bits(loaded[name].weights[m]), _bits(r.weights[m]))
            assert torch.equal(
                loaded[name].block_scales[m].view(torch.uint8), r.block_scales[m].view(torch.uint8)
            )
    # stored as NVFP4 codes: about an eighth of the float32 weights
    fp32_bytes = sum(w.numel() * 4 for r in groups.values() for w in r.weights.values())
    assert path.stat().st_size < fp32_bytes / 4


def test_weights_off_the_grid_are_refused(setup, tmp_path):
    _, _, selection, _, _, rounded = setup
    r = rounded[Rounding.RTN][selection.groups[0].name]
    member = r.members[0]
    off = r.weights
    off[member] = off[member] + 1e-3
    with pytest.raises(RoundingError, match="not on the NVFP4 grid"):
        RoundedGroup.from_weights(off, r.block_scales, r.global_scale)
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RoundingError):
        load_rounded(tmp_path / "other.safetensors")


def test_tiers_select_what_is_rounded_and_w4a4_propagates(setup):
    model, _, selection, batches, before, _ = setup
    stats = collect_activation_stats(model, batches, selection, progress=False)
    tiers = {g.name: Tier.NVFP4 if i % 3 else Tier.FP8 for i, g in enumerate(selection.groups)}
    out = round_model(
        model,
        batches,
        selection,
        Rounding.GPTQ,
        tiers=tiers,
        input_amax=stats.group_input_amax,
    )
    assert list(out) == [g.name for g in selection.groups if tiers[g.name] is Tier.NVFP4]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_moe_expert_groups_fall_back_to_scale_search():
    model = tiny_mixtral(num_experts=4, seed=2)
    tokenizer = char_tokenizer()
    selection = select_targets(model)
    batches = tokenize_batches(tokenizer, PROMPTS[:6], max_length=24, batch_size=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = round_model(model, batches, selection, Rounding.GPTQ_MSE, tiers=Tier.NVFP4A16)
    experts = [g for g in selection.groups if g.expert_slots]
    assert experts and all(g.name in out for g in experts)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    quantized = quantize_groups(model, selection.groups, Tier.NVFP4A16, rounded=out)
    with emulate(model, quantized), torch.no_grad():
        assert torch.isfinite(_forward_logits(model, batches[0])).all()


def test_rtn_needs_no_batches_and_gptq_does():
    model = tiny_llama(num_layers=1, seed=1)
    selection = select_targets(model)
    assert len(round_model(model, [], selection, Rounding.RTN)) == len(selection.groups)
    with pytest.raises(RoundingError):
        round_model(model, [], selection, Rounding.GPTQ)


def test_global_scale_is_shared_and_headroom_applies_to_the_search(setup):
    model, _, selection, batches, _, _ = setup
    group = selection.groups[0]
    amax = max(float(linear_modules(model)[m].weight.detach().abs().max()) for m in group.members)
    out = round_model(
        model, batches[:1], selection, Rounding.MSE, headroom=1.5, tiers=Tier.NVFP4A16
    )
    assert torch.equal(out[group.name].global_scale, global_scale_from_amax(amax, headroom=1.5))
    out = round_model(
        model, batches[:1], selection, Rounding.GPTQ, headroom=1.5, tiers=Tier.NVFP4A16
    )
    assert torch.equal(out[group.name].global_scale, global_scale_from_amax(amax))
