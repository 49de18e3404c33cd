"""Fallback plan: threshold, budget, always-high-precision layers, and the pathological group."""

from __future__ import annotations

import pytest
import torch

from calibration.groups import GroupKind, LinearGroup, TargetSelection, select_targets
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.plan import FallbackPolicy, FallbackReason, build_fallback_plan
from calibration.sensitivity import (
    GroupSensitivity,
    blocks_to_cache,
    compute_baseline,
    score_quantized,
    sweep_groups,
)
from tests.calibration._tiny_models import PROMPTS, char_tokenizer, tiny_llama


def _selection(sizes: dict[str, int]) -> TargetSelection:
    groups = tuple(
        LinearGroup(name, (name + ".w",), GroupKind.OTHER, i, 16, n)
        for i, (name, n) in enumerate(sizes.items())
    )
    return TargetSelection(groups=groups, skipped={"lm_head": "ignored by pattern"})


def _records(kls: dict[str, float], selection: TargetSelection) -> list[GroupSensitivity]:
    return [
        GroupSensitivity(
            g.name, "other", g.block_index, g.members, g.num_params, kls[g.name], 0, 1, 0, 10
        )
        for g in selection.groups
    ]


def test_threshold_only():
    selection = _selection({"a": 100, "b": 100, "c": 100})
    plan = build_fallback_plan(selection, _records({"a": 0.01, "b": 0.2, "c": 0.06}, selection))
    assert [f.name for f in plan.fallbacks] == ["b", "c", "lm_head"]
    assert plan.fallbacks[0].reason is FallbackReason.KL_ABOVE_THRESHOLD
    assert "0.2 > threshold 0.05" in plan.fallbacks[0].detail
    assert plan.fallbacks[-1].reason is FallbackReason.ALWAYS_HIGH_PRECISION
    assert [g.name for g in plan.quantized_groups] == ["a"]
    assert plan.ignore == ("b.w", "c.w", "lm_head")
    assert plan.fallback_param_fraction == pytest.approx(2 / 3)


def test_budget_takes_worst_first_and_skips_what_does_not_fit():
    selection = _selection({"a": 500, "b": 300, "c": 100, "d": 100})
    kls = {"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.01}
    plan = build_fallback_plan(
        selection, _records(kls, selection), FallbackPolicy(0.05, max_fallback_param_fraction=0.4)
    )
    assert [f.name for f in plan.fallbacks if f.name != "lm_head"] == ["b", "c"]
    assert plan.over_threshold_kept_quantized == ("a",)
    assert plan.fallback_param_fraction == pytest.approx(0.4)

    budget_only = build_fallback_plan(
        selection, _records(kls, selection), FallbackPolicy(None, max_fallback_param_fraction=0.25)
    )
    assert [f.name for f in budget_only.fallbacks if f.name != "lm_head"] == ["c", "d"]
    assert budget_only.fallbacks[0].reason is FallbackReason.WORST_WITHIN_BUDGET


def test_policy_and_record_validation():
    with pytest.raises(ValueError, match="threshold, a budget"):
        FallbackPolicy(None, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FallbackPolicy(max_fallback_param_fraction=1.5)
    selection = _selection({"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no sensitivity record"):
        build_fallback_plan(selection, _records({"a": 0, "b": 0}, selection)[:1])


def test_pathological_group_is_the_one_marked_for_fallback():
    model = tiny_llama(num_layers=2)
    tok = char_tokenizer()
    selection = select_targets(model)
    victim = "model.layers.1.mlp.gate_up"
    modules = dict(model.named_modules())
    with torch.no_grad():
        # A huge outlier in input channel 5 of up_proj: the shared global scale 448*6/1e5 pushes every
        # other block scale of gate/up below FP8's smallest subnormal, so quantizing the group zeroes
        # it. The norm feeding channel 5 is zeroed, so the unquantized model is unaffected.
        modules["model.layers.1.post_attention_layernorm"].weight[5] = 0.0
        modules["model.layers.1.mlp.up_proj"].weight[3, 5] = 1e5
        modules["model.layers.1.mlp.down_proj"].weight.mul_(
            5.0
        )  # random MLPs barely matter otherwise
    calib = tokenize_batches(tok, PROMPTS[:6], max_length=24, batch_size=3)
    stats = collect_activation_stats(model, calib, selection, progress=False)
    evals = tokenize_batches(tok, PROMPTS[6:], max_length=24, batch_size=3)
    baseline = compute_baseline(
        model, evals, cache_blocks=blocks_to_cache(selection.groups), progress=False
    )
    records = sweep_groups(model, baseline, selection.groups, stats, progress=False)
    worst = max(records, key=lambda r: r.mean_kl)
    assert worst.group == victim
    plan = build_fallback_plan(selection, records, FallbackPolicy(threshold=0.05))
    assert [f.name for f in plan.fallbacks] == [victim, "lm_head"]
    assert set(plan.ignore) == {
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "lm_head",
    }
    everything = score_quantized(model, baseline, selection.groups, stats)
    with_plan = score_quantized(model, baseline, plan.quantized_groups, stats)
    assert with_plan.mean_kl < everything.mean_kl
