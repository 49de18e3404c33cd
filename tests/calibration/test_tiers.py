"""calibration.tiers: the plan by target on plain records (no model)."""

from __future__ import annotations

import pytest

from calibration.precision import Tier
from calibration.tiers import (
    GroupOptions,
    TierOption,
    group_tier_bytes,
    hull_upgrades,
    plan_tiers,
    shortest_prefix,
    upgrade_sequence,
)


def _group(name: str, base: float, fp8: float, bytes_base: int = 100, exact=None) -> GroupOptions:
    return GroupOptions(
        name,
        (
            TierOption(Tier.NVFP4, bytes_base, base),
            TierOption(Tier.FP8, 2 * bytes_base, fp8),
            TierOption(Tier.BF16, 4 * bytes_base, 0.0),
        ),
        exact_kl=exact,
    )


def test_hull_drops_points_above_it_and_dominated_ones():
    # FP8 removes little (0.10 -> 0.09) for 100 bytes, BF16 removes 0.10 for 300: going straight to
    # BF16 is the better slope, so FP8 is above the hull
    chain = hull_upgrades(_group("g", 0.10, 0.09))
    assert [(u.from_tier, u.to_tier) for u in chain] == [(Tier.NVFP4, Tier.BF16)]
    # FP8 removes almost everything: NVFP4 -> FP8 -> BF16, slopes falling
    chain = hull_upgrades(_group("g", 0.10, 0.01))
    assert [(u.from_tier, u.to_tier) for u in chain] == [
        (Tier.NVFP4, Tier.FP8),
        (Tier.FP8, Tier.BF16),
    ]
    assert chain[0].slope > chain[1].slope
    # an option costing more without lowering the estimate is never an upgrade
    worse = GroupOptions("w", (TierOption(Tier.NVFP4, 100, 0.1), TierOption(Tier.FP8, 200, 0.2)))
    assert hull_upgrades(worse) == []


def test_greedy_takes_the_steepest_upgrades_within_the_budget():
    groups = [_group("a", 0.50, 0.05), _group("b", 0.05, 0.01), _group("c", 0.30, 0.29)]
    plan = plan_tiers(groups, max_extra_bytes=0.34)  # 102 extra bytes over 300
    assert plan.tiers == {"a": Tier.FP8, "b": Tier.NVFP4, "c": Tier.NVFP4}
    assert plan.extra_bytes == 100 and plan.estimated_kl == pytest.approx(0.05 + 0.05 + 0.30)
    unlimited = plan_tiers(groups, max_extra_bytes=None)
    assert set(unlimited.tiers.values()) == {Tier.BF16} and unlimited.estimated_kl == 0
    nothing = plan_tiers(groups, max_extra_bytes=0.0)
    assert nothing.tiers == {g.group: Tier.NVFP4 for g in groups} and not nothing.upgrades


def test_an_upgrade_that_does_not_fit_is_skipped_for_a_cheaper_one():
    big = _group("big", 0.50, 0.40, bytes_base=1000)  # its cheapest step costs 1000 bytes
    small = _group("small", 0.02, 0.00, bytes_base=10)
    plan = plan_tiers([big, small], max_extra_bytes=10 / 1010)
    assert plan.tiers == {"big": Tier.NVFP4, "small": Tier.FP8}


def test_floor_forces_a_group_off_the_base_tier_whatever_the_budget():
    groups = [_group("hot", 0.02, 0.001, exact=0.08), _group("cold", 0.5, 0.1, exact=0.01)]
    plan = plan_tiers(groups, max_extra_bytes=0.0, kl_threshold=0.05)
    assert plan.floor == ("hot",) and plan.tiers["hot"] is Tier.FP8
    assert plan.tiers["cold"] is Tier.NVFP4  # no budget left for the rest
    assert "runbook floor" in plan.reasons["hot"]
    # the floor group may still be upgraded further when the budget allows
    rich = plan_tiers(groups, max_extra_bytes=None, kl_threshold=0.05)
    assert rich.tiers == {"hot": Tier.BF16, "cold": Tier.BF16}
    assert plan_tiers(groups, max_extra_bytes=0.0, kl_threshold=None).floor == ()


def test_prefix_limits_the_upgrades_in_sequence_order():
    groups = [_group(n, kl, kl / 10) for n, kl in (("a", 0.4), ("b", 0.2), ("c", 0.1))]
    sequence = upgrade_sequence(groups, {g.group: Tier.NVFP4 for g in groups})
    assert [u.group for u in sequence[:3]] == ["a", "b", "c"]
    for n in range(len(sequence) + 1):
        plan = plan_tiers(groups, max_extra_bytes=None, prefix=n)
        assert len(plan.upgrades) == n
    estimates = [plan_tiers(groups, max_extra_bytes=None, prefix=n).estimated_kl for n in range(7)]
    assert estimates == sorted(estimates, reverse=True)


@pytest.mark.parametrize("answer", [0, 1, 5, 17, 30, None])
def test_shortest_prefix_bisects_with_few_measurements(answer):
    calls = []

    def reaches(n: int) -> bool:
        calls.append(n)
        return answer is not None and n >= answer

    assert shortest_prefix(30, reaches) == answer
    assert len(calls) <= 7  # log2(31) + 1


def test_group_tier_bytes_are_what_the_tiers_write(tiny_llama_dir):
    """The planner's byte counts equal the checkpoint tensors each tier writes (biases aside)."""
    import torch

    from calibration.emulate import linear_modules, quantize_group
    from calibration.groups import select_targets
    from calibration.models import load_causal_lm

    model = load_causal_lm(tiny_llama_dir, dtype="fp32").model
    linears = linear_modules(model)
    for group in select_targets(model).groups:
        for tier in (Tier.NVFP4A16, Tier.FP8):
            written = quantize_group(linears, group, tier).weight_bytes
            assert group_tier_bytes(group, tier) == written, (group.name, tier)
        nvfp4 = quantize_group(linears, group, Tier.NVFP4, input_amax=1.0).weight_bytes
        assert group_tier_bytes(group, Tier.NVFP4) == nvfp4
        bf16 = sum(linears[m].weight.to(torch.bfloat16).nbytes for m in group.members)
        assert group_tier_bytes(group, Tier.BF16) == bf16
