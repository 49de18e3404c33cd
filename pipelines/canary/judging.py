"""Judge a canary window: pooled samples, per-route samples, the endpoint gate policy.

:func:`replay_samples` extends :func:`pipelines.canary.replay.judge_samples` with what an endpoint
evaluator measures (TTFT, time per output token, task metrics of the generations);
:func:`judge_window` judges the pool with the stage policy and every route with its own policy
(quality guards + the task metrics of its family, ``route_min_samples``) and combines them with
:func:`registry.judge.judge_stage_with_routes`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from calibration.evaluate import ReplayRecord, ReplayResult
from pipelines.canary.replay import judge_samples
from pipelines.canary.tasks import TASK_JUDGE_METRICS, family_judge_metrics, route_family
from registry.judge import StageVerdict, judge_stage, judge_stage_with_routes
from registry.policy import (
    GatePolicy,
    GatePolicyOverrides,
    default_metric_gates,
    endpoint_metric_gates,
    load_gate_policy,
)

#: Pool metrics that only make sense per route (families mix in the pool).
TASK_METRICS = tuple(TASK_JUDGE_METRICS)
#: Metrics judged per route besides the task metrics: the quality guards and the error rate.
ROUTE_GUARD_METRICS = ("nll", "top1_agreement", "kl_mean", "kl_p99", "error_rate")


def is_endpoint_result(result: ReplayResult) -> bool:
    return result.metadata.get("evaluator") == "endpoints"


def record_samples(
    records: Sequence[ReplayRecord], *, endpoints: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``(baseline, candidate)`` per-metric samples of ``records`` (see :func:`replay_samples`)."""
    proxy = ReplayResult(
        records=tuple(records), baseline_name="", candidate_name="", seed=0, max_len=0, batch_size=1
    )
    base, cand = judge_samples(proxy)
    if not endpoints:
        return base, cand
    for rec in records:
        ok = rec.ok
        nan = math.nan
        for metric, (b, c) in (
            ("ttft_ms", (rec.ttft_baseline_s, rec.ttft_candidate_s)),
            ("tpot_ms", (rec.tpot_baseline_s, rec.tpot_candidate_s)),
        ):
            base.setdefault(metric, []).append(b * 1000.0 if ok else nan)
            cand.setdefault(metric, []).append(c * 1000.0 if ok else nan)
        for metric, (b_key, c_key) in TASK_JUDGE_METRICS.items():
            task = rec.task if ok else {}
            cand.setdefault(metric, []).append(float(task.get(c_key, nan)))
            base.setdefault(metric, []).append(
                float(task.get(b_key, nan)) if b_key else (nan if not ok else _self_value(metric))
            )
    return base, cand


def _self_value(metric: str) -> float:
    return 1.0 if metric == "task_agreement" else 0.0


def replay_samples(result: ReplayResult) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Pooled per-metric samples; endpoint results add ``ttft_ms``, ``tpot_ms`` and task metrics.

    ``error_rate`` is 1.0 per failed request of a side (never NaN): failed requests are counted."""
    return record_samples(result.records, endpoints=is_endpoint_result(result))


#: Token-level guards of the endpoint path, set from measured variants (README "Canary gates"): an
#: 8-bit requantization of the served model (Q8_0: top-1 0.885 to 0.98 over windows of
#: 12-30 requests, KL 0.004-0.006, perplexity ratio 1.02 on the baseline's responses) passes; a
#: damaged one (Q2_K: top-1 0.68, KL 0.37) and SmolLM2's W4A16/W4A4 NVFP4 (top-1 0.74 / 0.66,
#: KL ~0.45) fail. They guard against large regressions; task quality per route is the "1 %" gate.
ENDPOINT_GUARDS: dict[str, dict[str, float]] = {
    "top1_agreement": {"ceiling": 0.85},
    "kl_mean": {"ceiling": 0.05},
    "kl_p99": {"ceiling": 0.5},
    "nll": {"max_effect": 1.05},
}


def endpoint_gate_policy(policy: GatePolicy) -> GatePolicy:
    """``policy`` for live endpoints: latency enforced (it is real), the token guards of
    :data:`ENDPOINT_GUARDS`, the endpoint gates added
    (TTFT / TPOT, and the task gates, which :func:`judge_window` applies per route only), the
    outlier gate dropped (servers do not report it)."""
    extra = {g.name: g for g in endpoint_metric_gates()}
    metrics = []
    for gate in policy.metrics:
        if gate.name == "outlier_fallback_rate":
            continue
        if gate.name in ("latency_ms",):
            gate = dataclasses.replace(gate, enforced=True)
        if gate.name in ENDPOINT_GUARDS:
            gate = dataclasses.replace(gate, **ENDPOINT_GUARDS[gate.name])
        metrics.append(gate)
    names = {g.name for g in metrics}
    metrics += [gate for name, gate in extra.items() if name not in names]
    return dataclasses.replace(policy, metrics=tuple(metrics))


def route_gate_policy(
    policy: GatePolicy, family_metrics: Sequence[str], route_min_samples: int
) -> GatePolicy:
    """The policy of one route: its quality guards and task metrics, ``route_min_samples``."""
    extra = {g.name: g for g in (*endpoint_metric_gates(), *default_metric_gates())}
    have = {g.name: g for g in policy.metrics}
    wanted = [*ROUTE_GUARD_METRICS, *family_metrics]
    metrics = tuple(
        dataclasses.replace(have.get(name, extra[name]), min_samples=None, enforced=True)
        for name in wanted
        if name in have or name in extra
    )
    return dataclasses.replace(policy, metrics=metrics, min_samples=max(2, route_min_samples))


def judge_window(
    result: ReplayResult,
    policy: GatePolicy,
    *,
    stage_index: int = 0,
    route_min_samples: int = 20,
    route_families: Mapping[str, Any] | None = None,
) -> StageVerdict:
    """Pool verdict (``policy``, task metrics excluded) combined with one verdict per route.

    Records without a route are judged in the pool only. In-process results (no generations) get
    the route guards only."""
    endpoints = is_endpoint_result(result)
    base, cand = record_samples(result.records, endpoints=endpoints)
    pool_policy = dataclasses.replace(
        policy, metrics=tuple(g for g in policy.metrics if g.name not in TASK_METRICS)
    )
    pool_names = {g.name for g in pool_policy.metrics}
    pool = judge_stage(
        {k: v for k, v in base.items() if k in pool_names},
        {k: v for k, v in cand.items() if k in pool_names},
        pool_policy,
        stage_index=stage_index,
    )
    by_route: dict[str, list[ReplayRecord]] = defaultdict(list)
    for rec in result.records:
        if rec.route is not None:
            by_route[rec.route].append(rec)
    if not by_route:
        return pool
    verdicts = {}
    for route, records in by_route.items():
        family = route_family(route, route_families)
        metrics = family_judge_metrics(family) if endpoints else ()
        route_policy = route_gate_policy(policy, metrics, route_min_samples)
        r_base, r_cand = record_samples(records, endpoints=endpoints)
        verdicts[route] = judge_stage(
            {k: r_base[k] for k in r_base if k in {g.name for g in route_policy.metrics}},
            {k: r_cand[k] for k in r_cand if k in {g.name for g in route_policy.metrics}},
            route_policy,
            stage_index=stage_index,
        )
    return judge_stage_with_routes(pool, verdicts)


def build_endpoint_policy(
    stages: Sequence[float],
    min_samples: int,
    overrides: Mapping[str, Any] | GatePolicyOverrides | None = None,
) -> GatePolicy:
    """The default gates (:mod:`registry.policy`) for live endpoints, ``stages``, ``min_samples``,
    then ``overrides`` as :func:`registry.policy.load_gate_policy` takes them (``metric_overrides``
    changes fields of named gates), or as the canary flow's ``gate_policy`` parameter
    (:class:`~registry.policy.GatePolicyOverrides`: only the fields given apply)."""
    base = endpoint_gate_policy(GatePolicy())
    if isinstance(overrides, GatePolicyOverrides):
        overrides = overrides.model_dump(mode="json", exclude_unset=True)
    overrides = dict(overrides or {})
    per_metric = dict(overrides.pop("metric_overrides", None) or {})
    unknown = sorted(set(per_metric) - {g.name for g in base.metrics})
    if unknown:
        raise ValueError(f"metric_overrides names unknown metrics: {unknown}")
    data: dict[str, Any] = {
        "metrics": [{**dataclasses.asdict(g), **per_metric.get(g.name, {})} for g in base.metrics],
        "min_samples": min_samples,
        **overrides,
    }
    plan = dict(data.pop("plan", {}) or {})
    plan["steps"] = list(stages)
    data["plan"] = plan
    return load_gate_policy(data)
