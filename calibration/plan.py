"""Fallback plan: which fused groups stay high precision, and why.

A group stays BF16/FP16 when its mean KL (quantized alone) exceeds ``threshold``. With a budget
(``max_fallback_param_fraction`` of the quantizable parameters), candidates are taken worst first
while they fit; a candidate that does not fit is skipped (a smaller one after it may still fit) and
stays quantized, which the plan records. ``threshold=None`` with a budget means "the worst groups
that fit the budget". Layers the target selection already skipped (``lm_head``, MoE routers, shapes
NVFP4 cannot hold) are always high precision and do not count against the budget. Routed expert groups
fall back with their whole MoE layer (``LinearGroup.tier_unit``: vLLM serves one scheme per layer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from calibration.groups import LinearGroup, TargetSelection
from calibration.sensitivity import GroupSensitivity

logger = logging.getLogger(__name__)

DEFAULT_KL_THRESHOLD = 0.05


class FallbackReason(str, Enum):
    KL_ABOVE_THRESHOLD = "kl_above_threshold"
    WORST_WITHIN_BUDGET = "worst_within_budget"
    ALWAYS_HIGH_PRECISION = "always_high_precision"  # lm_head, routers, unquantizable shapes


@dataclass(frozen=True)
class FallbackPolicy:
    """``threshold``: mean-KL limit per group (nats), None = no limit (budget only).
    ``max_fallback_param_fraction``: in [0, 1], None = no budget."""

    threshold: float | None = DEFAULT_KL_THRESHOLD
    max_fallback_param_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is None and self.max_fallback_param_fraction is None:
            raise ValueError("a fallback policy needs a threshold, a budget, or both")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        fraction = self.max_fallback_param_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"max_fallback_param_fraction must be in [0, 1], got {fraction}")


@dataclass(frozen=True)
class Fallback:
    """One group (or skipped layer) kept high precision."""

    name: str
    members: tuple[str, ...]
    reason: FallbackReason
    detail: str
    mean_kl: float | None = None
    num_params: int = 0


@dataclass(frozen=True)
class FallbackPlan:
    policy: FallbackPolicy
    quantized_groups: tuple[LinearGroup, ...]
    fallbacks: tuple[Fallback, ...]
    over_threshold_kept_quantized: tuple[str, ...]  # budget exhausted: above threshold, still NVFP4
    quantizable_params: int

    @property
    def fallback_params(self) -> int:
        return sum(
            f.num_params
            for f in self.fallbacks
            if f.reason is not FallbackReason.ALWAYS_HIGH_PRECISION
        )

    @property
    def fallback_param_fraction(self) -> float:
        return self.fallback_params / self.quantizable_params if self.quantizable_params else 0.0

    @property
    def ignore(self) -> tuple[str, ...]:
        """Every Linear left unquantized (module names), for the checkpoint's ``ignore`` list."""
        return tuple(m for f in self.fallbacks for m in f.members)


def build_fallback_plan(
    selection: TargetSelection,
    sensitivities: Sequence[GroupSensitivity],
    policy: FallbackPolicy = FallbackPolicy(),
) -> FallbackPlan:
    """Decide per group from its sweep record. Every group of ``selection`` needs exactly one record."""
    by_name = {s.group: s for s in sensitivities}
    missing = [g.name for g in selection.groups if g.name not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} group(s) have no sensitivity record: {missing[:5]}")
    extra = sorted(set(by_name) - {g.name for g in selection.groups})
    if extra:
        raise ValueError(f"sensitivity records for groups outside the selection: {extra[:5]}")

    total = sum(g.num_params for g in selection.groups)
    budget = None
    if policy.max_fallback_param_fraction is not None:
        budget = policy.max_fallback_param_fraction * total
    candidates = [
        g
        for g in selection.groups
        if policy.threshold is None or by_name[g.name].mean_kl > policy.threshold
    ]
    candidates.sort(key=lambda g: by_name[g.name].mean_kl, reverse=True)  # worst first, stable

    units: dict[str, list[LinearGroup]] = {}  # a Linear group is its own unit; experts: their layer
    for group in selection.groups:
        units.setdefault(group.tier_unit, []).append(group)
    chosen: dict[str, Fallback] = {}
    kept: list[str] = []
    used = 0
    for group in candidates:
        if group.name in chosen:
            continue  # taken along with a worse group of its MoE layer
        unit = units[group.tier_unit]
        size = sum(g.num_params for g in unit)
        kl = by_name[group.name].mean_kl
        if budget is not None and used + size > budget:
            if policy.threshold is not None:
                kept.append(group.name)
                logger.warning(
                    "group %s (mean KL %.4g > %.4g) stays quantized: fallback budget exhausted",
                    group.name,
                    kl,
                    policy.threshold,
                )
            continue
        used += size
        if policy.threshold is not None:
            reason = FallbackReason.KL_ABOVE_THRESHOLD
            detail = f"mean KL {kl:.4g} > threshold {policy.threshold:.4g}"
        else:
            reason = FallbackReason.WORST_WITHIN_BUDGET
            detail = f"mean KL {kl:.4g}, among the worst within {policy.max_fallback_param_fraction:.2%} of parameters"
        for member in unit:
            why = (
                detail
                if member is group
                else f"{detail} in {group.name} (one scheme per MoE layer)"
            )
            chosen[member.name] = Fallback(
                member.name,
                member.members,
                reason,
                why,
                by_name[member.name].mean_kl,
                member.num_params,
            )

    always = [
        Fallback(name, (name,), FallbackReason.ALWAYS_HIGH_PRECISION, why)
        for name, why in selection.skipped.items()
    ]
    group_fallbacks = [chosen[g.name] for g in selection.groups if g.name in chosen]  # model order
    plan = FallbackPlan(
        policy=policy,
        quantized_groups=tuple(g for g in selection.groups if g.name not in chosen),
        fallbacks=tuple(group_fallbacks + always),
        over_threshold_kept_quantized=tuple(kept),
        quantizable_params=total,
    )
    logger.info(
        "fallback plan: %d of %d groups high precision (%.2f%% of quantizable parameters)",
        len(group_fallbacks),
        len(selection.groups),
        100 * plan.fallback_param_fraction,
    )
    return plan
