"""Per-group KL sweep on a tiny random Llama: block-input cache vs full forwards, workers, scoring."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from calibration.emulate import emulate, quantize_groups
from calibration.groups import select_targets
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.precision import Tier
from calibration.sensitivity import (
    blocks_to_cache,
    compute_baseline,
    merge_sensitivities,
    score_quantized,
    sweep_groups,
)
from kernels import fake_quantize_nvfp4_weight, global_scale_from_amax
from tests.calibration._tiny_models import PROMPTS, char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(num_layers=3)
    tok = char_tokenizer()
    selection = select_targets(model)
    calib = tokenize_batches(tok, PROMPTS[:8], max_length=24, batch_size=4)
    stats = collect_activation_stats(model, calib, selection, progress=False)
    evals = tokenize_batches(tok, PROMPTS[6:], max_length=24, batch_size=4)
    baseline = compute_baseline(
        model, evals, cache_blocks=blocks_to_cache(selection.groups), progress=False
    )
    return model, tok, selection, stats, baseline


def _fields(records):
    return [dataclasses.astuple(r) for r in records]


@pytest.mark.parametrize("scheme", [Tier.NVFP4, Tier.NVFP4A16])
def test_block_cache_matches_full_forward(setup, scheme):
    model, _, selection, stats, baseline = setup
    assert baseline.cached_blocks == (1, 2)
    cached = sweep_groups(model, baseline, selection.groups, stats, scheme, progress=False)
    naive = sweep_groups(
        model, baseline, selection.groups, stats, scheme, use_block_cache=False, progress=False
    )
    assert [r.group for r in cached] == [g.name for g in selection.groups]
    for a, b in zip(cached, naive, strict=True):
        assert a.mean_kl == pytest.approx(b.mean_kl, rel=1e-5, abs=1e-9), a.group
        assert a.p99_kl == pytest.approx(b.p99_kl, rel=1e-5, abs=1e-9), a.group
        assert a.top1_agreement == b.top1_agreement
        assert a.mean_kl > 0
    assert sum(r.mean_kl for r in cached) > 0


def test_model_restored_after_sweep(setup):
    model, _, selection, stats, baseline = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers_before = list(model.model.layers)
    sweep_groups(model, baseline, selection.groups[-3:], stats, progress=False)
    assert list(model.model.layers) == layers_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())
    unquantized = score_quantized(model, baseline, [], stats)
    assert unquantized.mean_kl == 0.0 and unquantized.top1_agreement == 1.0
    assert unquantized.delta_perplexity == pytest.approx(0.0, abs=1e-9)


def test_thread_pool_and_subsets_merge_to_same_result(setup):
    model, _, selection, stats, baseline = setup
    serial = sweep_groups(model, baseline, selection.groups, stats, progress=False)
    pooled = sweep_groups(model, baseline, selection.groups, stats, num_workers=2, progress=False)
    assert _fields(pooled) == _fields(serial)
    groups = list(selection.groups)
    part_b = sweep_groups(model, baseline, groups[1::2], stats, progress=False)
    part_a = sweep_groups(model, baseline, groups[0::2], stats, progress=False)
    assert _fields(merge_sensitivities([part_b, part_a], selection)) == _fields(serial)
    with pytest.raises(ValueError, match="twice"):
        merge_sensitivities([part_a, part_a], selection)


def test_emulated_group_shares_weight_global_scale_and_w4a4_needs_stats(setup):
    model, _, selection, stats, _ = setup
    qkv = selection.groups[0]
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules[qkv.members[0]].weight[0, 0] = 5.0  # q has the group's largest weight
    try:
        v_weight = modules[qkv.members[2]].weight.detach().clone()
        shared = fake_quantize_nvfp4_weight(v_weight, global_scale_from_amax(5.0))
        own = fake_quantize_nvfp4_weight(v_weight)
        assert not torch.equal(shared, own)
        with emulate(model, quantize_groups(model, [qkv], Tier.NVFP4A16)):
            assert torch.equal(modules[qkv.members[2]].weight, shared)
        assert torch.equal(modules[qkv.members[2]].weight, v_weight)
        with pytest.raises(ValueError, match="activation stats"):
            score_quantized(model, setup[4], [qkv], None, Tier.NVFP4)
    finally:
        with torch.no_grad():
            modules[qkv.members[0]].weight[0, 0] = 0.0


def test_combined_score_over_all_groups_both_schemes(setup):
    model, _, selection, stats, baseline = setup
    w4a16 = score_quantized(model, baseline, selection.groups, stats, Tier.NVFP4A16)
    w4a4 = score_quantized(model, baseline, selection.groups, stats, Tier.NVFP4)
    assert w4a4.mean_kl > 0 and w4a16.mean_kl > 0
    assert w4a4.num_tokens == w4a16.num_tokens == baseline.num_tokens
    assert 0 <= w4a4.top1_agreement <= 1
