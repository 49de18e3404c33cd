"""Canary judge on synthetic samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from registry.judge import (
    Decision,
    Outcome,
    RolloutProgress,
    decide,
    judge_metric,
    judge_stage,
)
from registry.policy import GatePolicy, MetricGate, StagePlan

N = 400
SEEDS = range(5)


def _latency(rng: np.random.Generator, n: int = N, scale: float = 1.0) -> np.ndarray:
    # log-normal per-request latency around 80 ms
    return scale * rng.lognormal(mean=math.log(80.0), sigma=0.15, size=n)


def _healthy_samples(rng: np.random.Generator, n: int = N, latency_scale: float = 1.0):
    """Baseline and candidate samples for every default metric; candidate as good as baseline."""
    nll = rng.normal(2.5, 0.4, size=n)
    baseline = {"latency_ms": _latency(rng, n), "nll": nll}
    candidate = {
        "latency_ms": _latency(rng, n, latency_scale),
        "nll": nll + rng.normal(0.0, 0.002, size=n),  # paired prompts, tiny noise
        "top1_agreement": rng.uniform(0.995, 1.0, size=n),
        "kl_mean": rng.uniform(0.0, 0.01, size=n),
        "kl_p99": rng.uniform(0.0, 0.1, size=n),
        "outlier_fallback_rate": rng.uniform(0.0, 0.002, size=n),
        "error_rate": np.zeros(n),  # 1.0 per failed request
    }
    return baseline, candidate


@pytest.mark.parametrize("seed", SEEDS)
def test_identical_distributions_pass(seed):
    rng = np.random.default_rng(seed)
    baseline, candidate = _healthy_samples(rng)
    verdict = judge_stage(baseline, candidate)
    assert verdict.outcome is Outcome.PASS, verdict.reason
    assert verdict.score == 100.0
    assert not verdict.critical_failure


def test_a_a_with_the_very_same_samples_passes():
    rng = np.random.default_rng(0)
    baseline, candidate = _healthy_samples(rng)
    candidate = {**candidate, "latency_ms": baseline["latency_ms"], "nll": baseline["nll"]}
    verdict = judge_stage(baseline, candidate)
    assert verdict.outcome is Outcome.PASS
    assert verdict.metric("latency_ms").effect == 1.0
    assert verdict.metric("nll").effect == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_p99_latency_regression_1_6x_fails_and_is_critical(seed):
    rng = np.random.default_rng(seed)
    baseline, candidate = _healthy_samples(rng, latency_scale=1.6)
    verdict = judge_stage(baseline, candidate)
    latency = verdict.metric("latency_ms")
    assert latency.verdict is Outcome.FAIL
    assert latency.critical
    assert latency.effect > 1.5
    assert latency.p_value < 1e-6
    assert verdict.outcome is Outcome.FAIL
    assert verdict.critical_failure
    decision, _ = decide(verdict, RolloutProgress())
    assert decision is Decision.ROLLBACK


@pytest.mark.parametrize("seed", SEEDS)
def test_1_1x_latency_shift_passes_the_1_2x_gate(seed):
    rng = np.random.default_rng(seed)
    baseline, candidate = _healthy_samples(rng, latency_scale=1.1)
    verdict = judge_stage(baseline, candidate)
    latency = verdict.metric("latency_ms")
    # the shift is real (significant) but within the allowed effect size
    assert latency.p_value < 0.02
    assert 1.0 < latency.effect < 1.2
    assert latency.verdict is Outcome.PASS, latency.reason
    assert verdict.outcome is Outcome.PASS


def test_1_3x_latency_fails_the_metric_not_critical_and_does_not_advance():
    rng = np.random.default_rng(0)
    baseline, candidate = _healthy_samples(rng, latency_scale=1.3)
    verdict = judge_stage(baseline, candidate)
    latency = verdict.metric("latency_ms")
    assert latency.verdict is Outcome.FAIL and not latency.critical
    # 6 of 7 metrics pass: score 86 is marginal -> inconclusive, never pass
    assert verdict.outcome is Outcome.INCONCLUSIVE
    assert verdict.score == pytest.approx(600 / 7)
    decision, progress = decide(verdict, RolloutProgress())
    assert decision is Decision.HOLD
    assert progress.stage_index == 0


def test_too_few_samples_is_inconclusive_never_pass():
    rng = np.random.default_rng(1)
    baseline, candidate = _healthy_samples(rng, n=20)
    verdict = judge_stage(baseline, candidate)
    assert verdict.outcome is Outcome.INCONCLUSIVE
    assert set(verdict.inconclusive_metrics) == {g.name for g in GatePolicy().metrics}
    assert "20 samples < minimum 50" in verdict.metric("latency_ms").reason


def test_missing_metric_is_inconclusive():
    rng = np.random.default_rng(2)
    baseline, candidate = _healthy_samples(rng)
    del candidate["outlier_fallback_rate"]
    verdict = judge_stage(baseline, candidate)
    assert verdict.outcome is Outcome.INCONCLUSIVE
    assert verdict.inconclusive_metrics == ("outlier_fallback_rate",)
    assert verdict.metric("outlier_fallback_rate").reason == "no candidate data"


def test_non_finite_samples_count_as_missing():
    rng = np.random.default_rng(3)
    baseline, candidate = _healthy_samples(rng)
    latency = candidate["latency_ms"].copy()
    latency[: N // 5] = np.nan  # 20 % missing > 10 % allowed
    verdict = judge_stage(baseline, {**candidate, "latency_ms": latency})
    assert verdict.metric("latency_ms").verdict is Outcome.INCONCLUSIVE
    assert "missing" in verdict.metric("latency_ms").reason
    assert verdict.outcome is Outcome.INCONCLUSIVE


def test_quality_drop_over_one_percent_is_critical():
    rng = np.random.default_rng(4)
    baseline, candidate = _healthy_samples(rng)
    worse = {**candidate, "nll": baseline["nll"] + 0.02}  # perplexity x1.0202
    verdict = judge_stage(baseline, worse)
    nll = verdict.metric("nll")
    assert nll.verdict is Outcome.FAIL and nll.critical
    assert nll.effect == pytest.approx(math.exp(0.02))
    assert verdict.outcome is Outcome.FAIL

    within = {**candidate, "nll": baseline["nll"] + 0.005}  # perplexity x1.005
    assert judge_stage(baseline, within).outcome is Outcome.PASS


@pytest.mark.parametrize(
    ("metric", "bad_value"),
    [("top1_agreement", 0.97), ("kl_mean", 0.2), ("outlier_fallback_rate", 0.01)],
)
def test_candidate_only_ceilings_fail_critically(metric, bad_value):
    rng = np.random.default_rng(5)
    baseline, candidate = _healthy_samples(rng)
    verdict = judge_stage(baseline, {**candidate, metric: np.full(N, bad_value)})
    result = verdict.metric(metric)
    assert result.verdict is Outcome.FAIL and result.critical
    assert result.p_value is None and result.n_baseline == 0
    assert verdict.outcome is Outcome.FAIL


def test_many_non_critical_failures_fail_the_stage_by_score():
    gates = tuple(
        MetricGate(name=f"m{i}", direction="lower", max_effect=1.1, require_significance=False)
        for i in range(4)
    )
    policy = GatePolicy(metrics=gates, min_samples=10)
    base = {f"m{i}": np.ones(20) for i in range(4)}
    cand = {"m0": np.ones(20), **{f"m{i}": np.full(20, 2.0) for i in range(1, 4)}}
    verdict = judge_stage(base, cand, policy)
    assert verdict.score == 25.0
    assert not verdict.critical_failure
    assert verdict.outcome is Outcome.FAIL


def test_higher_is_better_two_sample_direction():
    gate = MetricGate(name="throughput", direction="higher", max_effect=0.9)
    policy = GatePolicy(metrics=(gate,), min_samples=10)
    rng = np.random.default_rng(6)
    base = rng.normal(100, 5, 200)
    slower = judge_metric(gate, base, rng.normal(70, 5, 200), policy)
    assert slower.verdict is Outcome.FAIL and slower.p_value < 1e-6
    faster = judge_metric(gate, base, rng.normal(130, 5, 200), policy)
    assert faster.verdict is Outcome.PASS and faster.p_value > 0.5


def test_records_are_plain_and_complete():
    rng = np.random.default_rng(7)
    verdict = judge_stage(*_healthy_samples(rng), stage_index=1)
    records = verdict.as_records()
    assert len(records) == len(GatePolicy().metrics)
    latency = next(r for r in records if r["metric"] == "latency_ms")
    assert latency["traffic_percent"] == 10.0
    assert latency["verdict"] == "pass" and latency["direction"] == "lower"
    for key in ("n_baseline", "n_candidate", "baseline_statistic", "u_statistic", "p_value"):
        assert latency[key] is not None


def test_decide_walks_the_plan_and_promotes():
    rng = np.random.default_rng(8)
    progress = RolloutProgress()
    decisions = []
    for stage in range(4):
        verdict = judge_stage(*_healthy_samples(rng), stage_index=stage)
        decision, progress = decide(verdict, progress)
        decisions.append(decision)
    assert decisions == [Decision.ADVANCE] * 3 + [Decision.PROMOTE]


def test_decide_limits():
    policy = GatePolicy(plan=StagePlan(failure_limit=2, inconclusive_limit=2))
    rng = np.random.default_rng(9)
    inconclusive = judge_stage(*_healthy_samples(rng, n=5), policy)
    decision, progress = decide(inconclusive, RolloutProgress(), policy)
    assert decision is Decision.HOLD
    decision, progress = decide(inconclusive, progress, policy)
    assert decision is Decision.ROLLBACK

    baseline, candidate = _healthy_samples(rng)
    non_critical_fail = judge_stage(
        {"latency_ms": baseline["latency_ms"]},
        {"latency_ms": baseline["latency_ms"] * 1.3},
        GatePolicy(
            metrics=(GatePolicy().metric("latency_ms"),),
            plan=StagePlan(failure_limit=2),
        ),
    )
    assert non_critical_fail.outcome is Outcome.FAIL and not non_critical_fail.critical_failure
    decision, progress = decide(non_critical_fail, RolloutProgress(), policy)
    assert decision is Decision.HOLD and progress.failed_analyses == 1
    decision, progress = decide(non_critical_fail, progress, policy)
    assert decision is Decision.ROLLBACK

    with pytest.raises(ValueError, match="stage"):
        decide(non_critical_fail, RolloutProgress(stage_index=2), policy)


def test_reported_only_metric_never_decides_the_stage():
    """A metric with ``enforced=False`` is judged and recorded, but a failure does not fail the stage."""
    import dataclasses

    import numpy as np

    from registry.judge import Outcome, judge_stage
    from registry.policy import GatePolicy, default_metric_gates

    rng = np.random.default_rng(0)
    gates = tuple(
        dataclasses.replace(g, enforced=False) if g.name == "latency_ms" else g
        for g in default_metric_gates()
    )
    policy = GatePolicy(metrics=gates)
    n = 200
    baseline = {"latency_ms": rng.gamma(4, 25, n), "nll": rng.normal(2.0, 0.3, n)}
    candidate = {
        "latency_ms": rng.gamma(4, 25, n) * 3.0,  # 3x slower: a critical failure if enforced
        "nll": baseline["nll"],
        "top1_agreement": np.ones(n),
        "kl_mean": np.full(n, 0.001),
        "kl_p99": np.full(n, 0.01),
        "outlier_fallback_rate": np.zeros(n),
        "error_rate": np.zeros(n),
    }
    verdict = judge_stage(baseline, candidate, policy)
    assert verdict.outcome is Outcome.PASS and verdict.score == 100.0
    latency = verdict.metric("latency_ms")
    assert latency.verdict is Outcome.FAIL and not latency.enforced
    assert judge_stage(baseline, candidate, GatePolicy()).outcome is Outcome.FAIL


@pytest.mark.parametrize("failed", [0, 1, 2, 3])
def test_error_rate_gate_counts_failed_requests(failed):
    """100 requests, ``failed`` of them failed: 1 % passes (ceiling), 2 % and 3 % fail critically;
    failures are 1.0 samples, never NaN, so they cannot be dropped as missing data."""
    rng = np.random.default_rng(0)
    baseline, candidate = _healthy_samples(rng, n=100)
    errors = np.zeros(100)
    errors[:failed] = 1.0
    verdict = judge_stage(baseline, {**candidate, "error_rate": errors})
    result = verdict.metric("error_rate")
    assert result.candidate_statistic == pytest.approx(failed / 100)
    if failed <= 1:
        assert result.verdict is Outcome.PASS
    else:
        assert result.verdict is Outcome.FAIL and result.critical
        assert verdict.outcome is Outcome.FAIL and verdict.critical_failure


def test_route_regression_fails_the_stage_while_the_pool_passes():
    from registry.judge import judge_stage_with_routes

    rng = np.random.default_rng(1)
    baseline, candidate = _healthy_samples(rng)
    pool = judge_stage(baseline, candidate)
    assert pool.outcome is Outcome.PASS
    bad = {**candidate, "top1_agreement": rng.uniform(0.5, 0.6, size=N)}
    routes = {"chat": judge_stage(baseline, candidate), "code": judge_stage(baseline, bad)}
    combined = judge_stage_with_routes(pool, routes)
    assert combined.outcome is Outcome.FAIL and combined.critical_failure
    assert "code" in combined.reason and "route:code/top1_agreement" in combined.failed_metrics
    few = judge_stage({k: v[:3] for k, v in baseline.items()}, {k: v[:3] for k, v in bad.items()})
    assert few.outcome is Outcome.INCONCLUSIVE
    combined = judge_stage_with_routes(pool, {"chat": routes["chat"], "rare": few})
    assert combined.outcome is Outcome.PASS and "rare" in combined.reason
