"""Canary judge: per-metric verdicts, a Kayenta-style stage score, and the rollout decision.

Pure Python + numpy + scipy. Input: per-request samples of baseline and candidate per metric (plain
lists or arrays). Output: a :class:`StageVerdict` whose :meth:`StageVerdict.as_records` rows go into
the rollout ledger unchanged.

Rules (see :mod:`registry.policy` for the thresholds):

* a metric with no data, too few finite samples or too many non-finite ones is Inconclusive;
* two-sample metrics run a one-sided Mann–Whitney U test "candidate is worse than baseline"; an
  effect limit counts when the test is significant (or the metric does not require significance);
* absolute ceilings are checked on the candidate's statistic, without a test;
* stage: any critical failure → Fail; if even counting every Inconclusive metric as passing the
  score would stay under ``marginal_score`` → Fail; any Inconclusive metric → Inconclusive;
  score ≥ ``pass_score`` → Pass; ≥ ``marginal_score`` → Inconclusive (marginal); else Fail.
  Never Pass with missing data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from registry.policy import Comparison, Direction, Effect, GatePolicy, MetricGate, Statistic

logger = logging.getLogger(__name__)

Samples = Sequence[float] | np.ndarray


class Outcome(str, Enum):
    """Verdict of one metric or one stage."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class Decision(str, Enum):
    """What the rollout driver does after a stage analysis."""

    ADVANCE = "advance"  # stage passed, go to the next traffic step
    PROMOTE = "promote"  # last stage passed
    HOLD = "hold"  # do not advance; analyse this stage again with more data
    ROLLBACK = "rollback"  # traffic back to the champion


@dataclass(frozen=True)
class MetricResult:
    """One metric of one stage analysis (one ledger row)."""

    metric: str
    direction: Direction
    comparison: Comparison
    statistic: Statistic
    n_baseline: int
    n_candidate: int
    baseline_statistic: float | None
    candidate_statistic: float | None
    effect: float | None
    u_statistic: float | None
    p_value: float | None
    verdict: Outcome
    critical: bool
    reason: str
    enforced: bool = True  # False: recorded only, the stage outcome ignores it

    def as_record(self) -> dict[str, Any]:
        """Plain JSON-ready dict (enums as their values)."""
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, Enum):
                record[key] = value.value
        return record


@dataclass(frozen=True)
class StageVerdict:
    """Result of one stage analysis."""

    stage_index: int
    traffic_percent: float
    outcome: Outcome
    score: float
    critical_failure: bool
    metrics: tuple[MetricResult, ...]
    reason: str

    @property
    def failed_metrics(self) -> tuple[str, ...]:
        """Enforced metrics that failed (reported-only ones never count)."""
        return tuple(m.metric for m in self.metrics if m.verdict is Outcome.FAIL and m.enforced)

    @property
    def inconclusive_metrics(self) -> tuple[str, ...]:
        return tuple(
            m.metric for m in self.metrics if m.verdict is Outcome.INCONCLUSIVE and m.enforced
        )

    def metric(self, name: str) -> MetricResult:
        for result in self.metrics:
            if result.metric == name:
                return result
        raise KeyError(f"no metric {name!r} in this verdict")

    def as_records(self) -> list[dict[str, Any]]:
        """One dict per metric, with the stage fields repeated (ledger rows)."""
        stage = {
            "stage_index": self.stage_index,
            "traffic_percent": self.traffic_percent,
            "stage_outcome": self.outcome.value,
            "stage_score": self.score,
        }
        return [{**stage, **m.as_record()} for m in self.metrics]


@dataclass(frozen=True)
class RolloutProgress:
    """Where a rollout stands between analyses (kept by the driver / ledger)."""

    stage_index: int = 0
    failed_analyses: int = 0
    consecutive_inconclusive: int = 0


def _statistic(values: np.ndarray, kind: Statistic) -> float:
    if kind is Statistic.MEAN:
        return float(np.mean(values))
    if kind is Statistic.MEDIAN:
        return float(np.median(values))
    if kind is Statistic.P95:
        return float(np.percentile(values, 95))
    if kind is Statistic.P99:
        return float(np.percentile(values, 99))
    raise ValueError(f"unknown statistic {kind!r}")


def _effect(baseline: float, candidate: float, kind: Effect) -> float:
    if kind is Effect.DIFFERENCE:
        return candidate - baseline
    if kind is Effect.EXP_DIFFERENCE:
        return math.exp(min(candidate - baseline, 700.0))
    # RATIO
    if baseline == 0.0:
        return 1.0 if candidate == 0.0 else math.copysign(math.inf, candidate)
    return candidate / baseline


def _clean(values: Samples | None) -> tuple[np.ndarray | None, int]:
    """Finite float64 samples and the number of non-finite ones dropped."""
    if values is None:
        return None, 0
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = array[np.isfinite(array)]
    return finite, int(array.size - finite.size)


def judge_metric(
    gate: MetricGate,
    baseline: Samples | None,
    candidate: Samples | None,
    policy: GatePolicy,
) -> MetricResult:
    """Verdict for one metric. ``baseline`` may be ``None`` for candidate-only metrics."""
    needed = policy.min_samples_for(gate)
    base, base_dropped = _clean(baseline)
    cand, cand_dropped = _clean(candidate)
    two_sample = gate.comparison is Comparison.TWO_SAMPLE
    n_base = 0 if base is None else int(base.size)
    n_cand = 0 if cand is None else int(cand.size)

    def result(verdict: Outcome, reason: str, **fields: Any) -> MetricResult:
        values = {
            "baseline_statistic": None,
            "candidate_statistic": None,
            "effect": None,
            "u_statistic": None,
            "p_value": None,
            "critical": False,
        }
        values.update(fields)
        return MetricResult(
            metric=gate.name,
            direction=gate.direction,
            comparison=gate.comparison,
            statistic=gate.statistic,
            n_baseline=n_base,
            n_candidate=n_cand,
            verdict=verdict,
            reason=reason,
            **values,
        )

    if cand is None:
        return result(Outcome.INCONCLUSIVE, "no candidate data")
    if two_sample and base is None:
        return result(Outcome.INCONCLUSIVE, "no baseline data")
    sides = [("candidate", cand, cand_dropped)]
    if two_sample:
        sides.insert(0, ("baseline", base, base_dropped))
    for side, values, dropped in sides:
        total = values.size + dropped
        if total and dropped / total > policy.max_missing_fraction:
            return result(
                Outcome.INCONCLUSIVE,
                f"{side}: {dropped} of {total} samples missing/non-finite "
                f"(> {policy.max_missing_fraction:.0%})",
            )
        if values.size < needed:
            return result(
                Outcome.INCONCLUSIVE,
                f"{side}: {values.size} samples < minimum {needed}",
            )

    candidate_stat = _statistic(cand, gate.statistic)
    fields: dict[str, Any] = {"candidate_statistic": candidate_stat}
    significant = False
    effect = None
    if two_sample:
        baseline_stat = _statistic(base, gate.statistic)
        effect = _effect(baseline_stat, candidate_stat, gate.effect)
        # one-sided: is the candidate stochastically worse than the baseline?
        alternative = "greater" if gate.direction is Direction.LOWER_IS_BETTER else "less"
        test = mannwhitneyu(cand, base, alternative=alternative)
        p_value = float(test.pvalue)
        if not math.isfinite(p_value):
            p_value = 1.0  # degenerate (e.g. all values equal): no evidence of a regression
        significant = p_value < policy.alpha
        fields.update(
            baseline_statistic=baseline_stat,
            effect=effect,
            u_statistic=float(test.statistic),
            p_value=p_value,
        )

    failures: list[str] = []
    critical_failures: list[str] = []
    sign = ">" if gate.direction is Direction.LOWER_IS_BETTER else "<"
    effect_counts = effect is not None and (significant or not gate.require_significance)
    if effect_counts:
        label = f"{gate.statistic.value} {gate.effect.value} {effect:.4g}"
        if gate.critical_effect is not None and gate.breaches(effect, gate.critical_effect):
            critical_failures.append(f"{label} {sign} critical limit {gate.critical_effect:g}")
        if gate.max_effect is not None and gate.breaches(effect, gate.max_effect):
            failures.append(f"{label} {sign} allowed {gate.max_effect:g}")
    label = f"{gate.statistic.value} {candidate_stat:.4g}"
    if gate.critical_ceiling is not None and gate.breaches(candidate_stat, gate.critical_ceiling):
        critical_failures.append(f"{label} {sign} critical ceiling {gate.critical_ceiling:g}")
    if gate.ceiling is not None and gate.breaches(candidate_stat, gate.ceiling):
        failures.append(f"{label} {sign} ceiling {gate.ceiling:g}")

    test_note = ""
    if two_sample:
        test_note = (
            f" (Mann–Whitney p={fields['p_value']:.3g}, "
            f"{'significant' if significant else 'not significant'} at {policy.confidence:g})"
        )
    if critical_failures or failures:
        critical = bool(critical_failures) or gate.critical
        reasons = critical_failures + [f for f in failures if f not in critical_failures]
        return result(
            Outcome.FAIL,
            ("CRITICAL: " if critical else "") + "; ".join(reasons) + test_note,
            critical=critical,
            **fields,
        )
    if effect is not None:
        within = "within limits" if effect_counts else "not a significant regression"
        note = f"{gate.statistic.value} {gate.effect.value} {effect:.4g} {within}"
    else:
        note = f"{gate.statistic.value} {candidate_stat:.4g} within ceiling"
    return result(Outcome.PASS, note + test_note, **fields)


def judge_stage(
    baseline: Mapping[str, Samples],
    candidate: Mapping[str, Samples],
    policy: GatePolicy | None = None,
    *,
    stage_index: int = 0,
) -> StageVerdict:
    """Judge one stage: every metric of ``policy`` against the given samples.

    ``baseline`` / ``candidate`` map metric names to per-request samples; a metric of the policy
    missing from the mappings is Inconclusive. Unknown metric names are ignored with a warning.
    """
    policy = policy or GatePolicy()
    if not 0 <= stage_index < len(policy.plan.steps):
        raise ValueError(
            f"stage_index {stage_index} outside the plan's {len(policy.plan.steps)} steps"
        )
    known = {g.name for g in policy.metrics}
    unknown = (set(baseline) | set(candidate)) - known
    if unknown:
        logger.warning("ignoring samples for metrics not in the policy: %s", sorted(unknown))

    results = tuple(
        judge_metric(gate, baseline.get(gate.name), candidate.get(gate.name), policy)
        for gate in policy.metrics
    )
    # Reported-only metrics (``enforced=False``) are judged and recorded but never decide the stage.
    enforced = {g.name for g in policy.metrics if g.enforced}
    results = tuple(r if r.metric in enforced else replace(r, enforced=False) for r in results)
    counted = [r for r in results if r.enforced]
    weights = {g.name: g.weight for g in policy.metrics}
    total = sum(weights[r.metric] for r in counted)
    passed = sum(weights[r.metric] for r in counted if r.verdict is Outcome.PASS)
    undecided = sum(weights[r.metric] for r in counted if r.verdict is Outcome.INCONCLUSIVE)
    score = 100.0 * passed / total
    best_case = 100.0 * (passed + undecided) / total
    critical = [r.metric for r in counted if r.critical]
    failed = [r.metric for r in counted if r.verdict is Outcome.FAIL]
    inconclusive = [r.metric for r in counted if r.verdict is Outcome.INCONCLUSIVE]

    if critical:
        outcome, reason = Outcome.FAIL, f"critical failure: {', '.join(critical)}"
    elif best_case < policy.marginal_score:
        outcome = Outcome.FAIL
        reason = f"score {score:.1f} (at best {best_case:.1f}) < marginal {policy.marginal_score:g}"
    elif inconclusive:
        outcome, reason = Outcome.INCONCLUSIVE, f"not enough data: {', '.join(inconclusive)}"
    elif score >= policy.pass_score:
        outcome, reason = Outcome.PASS, f"score {score:.1f} >= pass {policy.pass_score:g}"
    elif score >= policy.marginal_score:
        outcome = Outcome.INCONCLUSIVE
        reason = f"marginal: score {score:.1f} < pass {policy.pass_score:g} (failed: {', '.join(failed)})"
    else:  # pragma: no cover - covered by best_case above when nothing is inconclusive
        outcome, reason = Outcome.FAIL, f"score {score:.1f} < marginal {policy.marginal_score:g}"
    verdict = StageVerdict(
        stage_index=stage_index,
        traffic_percent=policy.plan.steps[stage_index],
        outcome=outcome,
        score=score,
        critical_failure=bool(critical),
        metrics=results,
        reason=reason,
    )
    logger.info(
        "stage %d (%g%%): %s, score %.1f: %s",
        stage_index,
        verdict.traffic_percent,
        outcome.value,
        score,
        reason,
    )
    return verdict


#: Separator of per-route metric names in a combined verdict: ``route:code-help/task_quality``.
ROUTE_METRIC_PREFIX = "route:"


def route_metric_name(route: str, metric: str) -> str:
    return f"{ROUTE_METRIC_PREFIX}{route}/{metric}"


def judge_stage_with_routes(
    pool: StageVerdict,
    routes: Mapping[str, StageVerdict],
) -> StageVerdict:
    """The stage verdict from the pooled verdict and one verdict per route (judged with the
    route's own policy and minimum samples, e.g. by :func:`judge_stage` on that route's samples).

    * the pool fails → Fail (as before);
    * any route fails → Fail, critical when that route's failure is critical: one route
      regressing fails the stage even when the pool passes;
    * a route without enough data is Inconclusive for that route only: recorded, never a pass for
      it, but it does not hold the stage (small routes would otherwise stall every 1 % stage);
    * otherwise the pool's outcome.
    Route metrics join the verdict's ``metrics`` as ``route:<route>/<metric>`` rows (ledger rows).
    """
    failed = {name: v for name, v in routes.items() if v.outcome is Outcome.FAIL}
    undecided = sorted(name for name, v in routes.items() if v.outcome is Outcome.INCONCLUSIVE)
    metrics = list(pool.metrics)
    for name, verdict in sorted(routes.items()):
        metrics += [replace(m, metric=route_metric_name(name, m.metric)) for m in verdict.metrics]
    outcome, reason, critical = pool.outcome, pool.reason, pool.critical_failure
    if pool.outcome is not Outcome.FAIL and failed:
        outcome = Outcome.FAIL
        critical = any(v.critical_failure for v in failed.values())
        reason = "route regression: " + "; ".join(
            f"{name} ({', '.join(v.failed_metrics)}: {v.reason})"
            for name, v in sorted(failed.items())
        )
    if undecided:
        reason += f" [routes without enough data: {', '.join(undecided)}]"
    return replace(
        pool, outcome=outcome, reason=reason, critical_failure=critical, metrics=tuple(metrics)
    )


def decide(
    verdict: StageVerdict, progress: RolloutProgress, policy: GatePolicy | None = None
) -> tuple[Decision, RolloutProgress]:
    """Next step of the rollout after ``verdict`` and the updated progress counters.

    Fail → roll back (a critical failure at once; otherwise once ``failure_limit`` failed analyses
    accumulated, HOLD before that). Inconclusive → HOLD, roll back after ``inconclusive_limit``
    consecutive ones at the same stage. Pass → ADVANCE, or PROMOTE after the last step.
    """
    policy = policy or GatePolicy()
    plan = policy.plan
    if verdict.stage_index != progress.stage_index:
        raise ValueError(
            f"verdict is for stage {verdict.stage_index}, rollout is at stage "
            f"{progress.stage_index}"
        )
    if verdict.outcome is Outcome.FAIL:
        progress = replace(progress, failed_analyses=progress.failed_analyses + 1)
        if verdict.critical_failure or progress.failed_analyses >= plan.failure_limit:
            return Decision.ROLLBACK, progress
        return Decision.HOLD, progress
    if verdict.outcome is Outcome.INCONCLUSIVE:
        progress = replace(progress, consecutive_inconclusive=progress.consecutive_inconclusive + 1)
        if progress.consecutive_inconclusive >= plan.inconclusive_limit:
            return Decision.ROLLBACK, progress
        return Decision.HOLD, progress
    if progress.stage_index + 1 >= len(plan.steps):
        return Decision.PROMOTE, replace(progress, consecutive_inconclusive=0)
    return Decision.ADVANCE, replace(
        progress, stage_index=progress.stage_index + 1, consecutive_inconclusive=0
    )
