"""A plan by target: which tier each fused group gets, by loss removed per extra byte.

Every group starts at the run's NVFP4 tier. Each candidate tier of a group is a point (bytes, estimated
KL contribution); the group's useful upgrades are the segments of the lower convex hull of its points,
each with a slope = estimated KL removed per extra byte. All segments of all groups are taken greedily,
steepest first (a convex hull's slopes fall, so a group's upgrades come in order): the result is one
ordered sequence of upgrades, and a plan is a prefix of it.

* **Budget** (``max_extra_bytes``): the longest prefix whose bytes fit within the budget over
  all-NVFP4 (an upgrade that does not fit is skipped; a later, cheaper one may still fit).
* **Target** (``target_kl``): the shortest prefix whose combined KL reaches the target. Estimates are
  additive approximations, so the caller measures the real combined KL of a prefix (a forward of the
  whole plan) and searches the prefix length (:func:`shortest_prefix`), never trusting the sum.
* **Floor** (the runbook rule): a group whose exact KL alone exceeds ``kl_threshold`` never stays at the
  base tier, whatever the budget; the floor comes first and counts against the budget.

Pure Python on plain records: no torch, so the decision logic is tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from calibration.groups import LinearGroup
from calibration.precision import Tier


@dataclass(frozen=True)
class TierOption:
    """One tier of one group: checkpoint bytes and estimated KL contribution (nats)."""

    tier: Tier
    bytes: int
    estimate: float


@dataclass(frozen=True)
class GroupOptions:
    """The candidate tiers of one fused group; ``options[0]`` is the base (NVFP4) tier."""

    group: str
    options: tuple[TierOption, ...]
    exact_kl: float | None = None  # measured KL of the base tier alone, where a decision needed it

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"{self.group}: no tier options")
        tiers = [o.tier for o in self.options]
        if len(set(tiers)) != len(tiers):
            raise ValueError(f"{self.group}: a tier is listed twice: {tiers}")

    @property
    def base(self) -> TierOption:
        return self.options[0]

    def option(self, tier: Tier) -> TierOption:
        for option in self.options:
            if option.tier is tier:
                return option
        raise KeyError(f"{self.group} has no {tier.value} option")


@dataclass(frozen=True)
class Upgrade:
    """Moving one group from one tier to a higher one."""

    group: str
    from_tier: Tier
    to_tier: Tier
    extra_bytes: int
    kl_removed: float  # estimated

    @property
    def slope(self) -> float:
        """Estimated nats removed per extra byte."""
        return self.kl_removed / self.extra_bytes if self.extra_bytes > 0 else math.inf


@dataclass(frozen=True)
class TierPlan:
    """Tiers chosen for every group, and how the choice was made."""

    tiers: Mapping[str, Tier]
    base_bytes: int  # every group at its base tier
    bytes: int
    estimated_kl: float  # sum of the chosen options' estimates (an approximation; measure it)
    floor: tuple[str, ...]  # groups the runbook rule forced off the base tier
    upgrades: tuple[Upgrade, ...]  # applied, in order (floor first)
    reasons: Mapping[str, str] = field(default_factory=dict)  # group -> why its tier

    @property
    def extra_bytes(self) -> int:
        return self.bytes - self.base_bytes

    @property
    def extra_fraction(self) -> float:
        return self.extra_bytes / self.base_bytes if self.base_bytes else 0.0


def hull_upgrades(options: GroupOptions) -> list[Upgrade]:
    """The group's upgrades along the lower convex hull of (bytes, estimate), cheapest first: options
    that cost more without lowering the estimate, or that lie above the hull, are never chosen."""
    points = sorted(options.options, key=lambda o: (o.bytes, o.estimate))
    hull: list[TierOption] = [options.base]
    for point in points:
        if point.bytes <= hull[-1].bytes or point.estimate >= hull[-1].estimate:
            continue
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-2], point):
            hull.pop()  # hull[-1] lies above the segment from hull[-2] to point
        hull.append(point)
    return [
        Upgrade(options.group, a.tier, b.tier, b.bytes - a.bytes, a.estimate - b.estimate)
        for a, b in zip(hull, hull[1:], strict=False)
    ]


def _slope(a: TierOption, b: TierOption) -> float:
    return (a.estimate - b.estimate) / (b.bytes - a.bytes)


def upgrade_sequence(groups: Iterable[GroupOptions], start: Mapping[str, Tier]) -> list[Upgrade]:
    """Every hull upgrade from each group's ``start`` tier on, steepest slope first (ties: group
    name, then cheaper first), so that a group's own upgrades stay in order."""
    upgrades: list[Upgrade] = []
    for options in groups:
        current = start[options.group]
        chain = hull_upgrades(options)
        # from a forced start tier, keep only the hull segments above it
        begin = next((i for i, u in enumerate(chain) if u.from_tier is current), None)
        if current is not options.base.tier and begin is None:
            continue  # the start is the top of the hull (or off it): nothing left to gain
        upgrades.extend(chain[begin or 0 :])
    # stable by construction: a group's slopes decrease along its hull
    return sorted(upgrades, key=lambda u: (-u.slope, u.group, u.extra_bytes))


def floor_tiers(groups: Iterable[GroupOptions], kl_threshold: float | None) -> dict[str, Tier]:
    """The runbook rule: a group whose exact KL alone exceeds ``kl_threshold`` moves to its cheapest
    higher tier (bf16 when it has no other)."""
    forced: dict[str, Tier] = {}
    if kl_threshold is None:
        return forced
    for options in groups:
        if options.exact_kl is not None and options.exact_kl > kl_threshold:
            higher = sorted(options.options[1:], key=lambda o: o.bytes)
            forced[options.group] = higher[0].tier if higher else Tier.BF16
    return forced


def plan_tiers(
    groups: Sequence[GroupOptions],
    *,
    max_extra_bytes: float | None,
    kl_threshold: float | None = None,
    prefix: int | None = None,
) -> TierPlan:
    """Floor first, then the upgrade sequence: within ``max_extra_bytes`` (fraction of the all-base
    bytes; None = unlimited), and at most ``prefix`` upgrades when given (the caller's target search)."""
    by_name = {g.group: g for g in groups}
    tiers = {g.group: g.base.tier for g in groups}
    base_bytes = sum(g.base.bytes for g in groups)
    applied: list[Upgrade] = []
    reasons = {g.group: "base tier" for g in groups}
    floor = floor_tiers(groups, kl_threshold)
    for name, tier in floor.items():
        options = by_name[name]
        target = options.option(tier)
        applied.append(
            Upgrade(
                name,
                options.base.tier,
                tier,
                target.bytes - options.base.bytes,
                options.base.estimate - target.estimate,
            )
        )
        tiers[name] = tier
        reasons[name] = f"runbook floor: exact KL {options.exact_kl:.4g} > {kl_threshold:g} alone"
    used = sum(u.extra_bytes for u in applied)
    budget = math.inf if max_extra_bytes is None else max_extra_bytes * base_bytes
    taken = 0
    for upgrade in upgrade_sequence(groups, tiers):
        if prefix is not None and taken >= prefix:
            break
        if tiers[upgrade.group] is not upgrade.from_tier or upgrade.kl_removed <= 0:
            continue
        if used + upgrade.extra_bytes > budget:
            continue
        tiers[upgrade.group] = upgrade.to_tier
        used += upgrade.extra_bytes
        applied.append(upgrade)
        taken += 1
        reasons[upgrade.group] = (
            f"{upgrade.kl_removed:.3g} nats removed for {upgrade.extra_bytes:,} bytes "
            f"({upgrade.slope * 1e6:.3g} nats/MB)"
        )
    total = sum(by_name[name].option(tier).bytes for name, tier in tiers.items())
    estimate = sum(by_name[name].option(tier).estimate for name, tier in tiers.items())
    return TierPlan(
        tiers=tiers,
        base_bytes=base_bytes,
        bytes=total,
        estimated_kl=estimate,
        floor=tuple(floor),
        upgrades=tuple(applied),
        reasons=reasons,
    )


def shortest_prefix(
    count: int, reaches_target: Callable[[int], bool], *, known_good: int | None = None
) -> int | None:
    """The smallest prefix length in ``0..count`` for which ``reaches_target`` holds, by bisection
    (the combined KL falls as upgrades are added; each call is a real measurement). None when even
    the whole sequence misses."""
    high = count if known_good is None else known_good
    if not reaches_target(high):
        return None
    low = -1  # reaches_target(low) is False by convention
    while high - low > 1:
        middle = (low + high) // 2
        if middle >= 0 and reaches_target(middle):
            high = middle
        else:
            low = middle
    return high


def group_tier_bytes(group: LinearGroup, tier: Tier, *, storage_itemsize: int = 2) -> int:
    """Checkpoint bytes of a fused group's weights under ``tier`` (biases excluded: every tier keeps
    them). NVFP4: packed E2M1 (½ byte per weight), FP8 block scales (1 per 16), fp32 global scale per
    member (and input global scale for W4A4); FP8: 1 byte per weight, fp32 scale per output channel;
    BF16 and other storage tiers: ``storage_itemsize`` per weight."""
    params, members = group.num_params, len(group.members)
    if tier.is_nvfp4:
        per_member = 8 if tier.quantizes_activations else 4
        return params // 2 + params // 16 + per_member * members
    if tier is Tier.FP8:
        return params + 4 * (params // group.in_features)
    return params * storage_itemsize
