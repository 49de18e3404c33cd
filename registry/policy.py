"""Canary gate policy: what the judge measures, how strictly, and how a rollout advances.

Plain frozen dataclasses (validated in ``__post_init__``). At the edges: a flow parameter holds a
:class:`GatePolicyOverrides` (pydantic; :func:`build_gate_policy` applies it to the defaults), a JSON
policy file goes through :func:`load_gate_policy` (pydantic's ``TypeAdapter``), so a typo in a config
is a clear error, not a silently ignored key. Metric names: :class:`Metric`.

Defaults follow DESIGN.md "Gates":

* quality: mean and p99 token KL, top-1 agreement, Δ perplexity; a quality drop above 1 % fails
  (critical: the rollout is rolled back);
* latency: Mann–Whitney U on per-request latency; a significant p99 regression of ≥ 1.2× fails the
  metric (the stage does not pass, so no promotion), ≥ 1.5× is a critical failure (roll back);
* outlier fallback rate < 0.5 % of tokens (critical);
* error rate: failed requests are counted (1 per failed request, never NaN), > 1 % is critical;
* at least ``min_samples`` samples per side and metric, otherwise Inconclusive, never Pass;
* staged plan 1 % → 10 % → 50 % → 100 % with a failure limit and an inconclusive limit
  (Flagger ``threshold`` / Argo Rollouts ``failureLimit`` / ``inconclusiveLimit``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class Metric(str, Enum):
    """The metrics a canary replay measures per request (the default gates' names)."""

    LATENCY_MS = "latency_ms"
    NLL = "nll"  # per-request mean NLL, nats/token; its effect is the perplexity ratio
    TOP1_AGREEMENT = "top1_agreement"
    KL_MEAN = "kl_mean"
    KL_P99 = "kl_p99"
    OUTLIER_FALLBACK_RATE = "outlier_fallback_rate"
    ERROR_RATE = "error_rate"  # 1.0 per failed request of a side, never NaN


class EndpointMetric(str, Enum):
    """Metrics only an endpoint evaluator measures: the gates of :func:`endpoint_metric_gates`
    (overridable in ``GatePolicyOverrides`` when the canary runs against live endpoints)."""

    TTFT_MS = "ttft_ms"
    TPOT_MS = "tpot_ms"
    TASK_QUALITY = "task_quality"
    REFUSAL_RATE = "refusal_rate"
    EMPTY_RATE = "empty_rate"
    TASK_AGREEMENT = "task_agreement"
    ANSWER_FLIP = "answer_flip"


class Direction(str, Enum):
    """Which way is better for a metric."""

    LOWER_IS_BETTER = "lower"
    HIGHER_IS_BETTER = "higher"


class Statistic(str, Enum):
    """How the per-request samples of one side are summarised into one number."""

    MEAN = "mean"
    MEDIAN = "median"
    P95 = "p95"
    P99 = "p99"


class Effect(str, Enum):
    """How the candidate's statistic is compared with the baseline's.

    ``RATIO``: candidate / baseline (latency). ``DIFFERENCE``: candidate − baseline.
    ``EXP_DIFFERENCE``: exp(candidate − baseline), i.e. the perplexity ratio when the samples are
    per-request mean NLLs.
    """

    RATIO = "ratio"
    DIFFERENCE = "difference"
    EXP_DIFFERENCE = "exp_difference"


class Comparison(str, Enum):
    """``TWO_SAMPLE``: baseline and candidate samples, Mann–Whitney U and effect limits.
    ``CANDIDATE_ONLY``: the metric is already relative to the baseline (KL, top-1 agreement) or an
    absolute property of the candidate (outlier fallback rate); only absolute limits apply."""

    TWO_SAMPLE = "two_sample"
    CANDIDATE_ONLY = "candidate_only"


@dataclass(frozen=True)
class MetricGate:
    """One judged metric.

    Limits are breached when the value lies strictly beyond them in the bad direction: for a
    lower-is-better metric the candidate fails when ``effect > max_effect``; for higher-is-better
    when ``effect < max_effect`` (a floor). ``ceiling`` is an absolute limit on the candidate's
    statistic (upper bound when lower is better, lower bound when higher is better).
    ``critical_effect`` / ``critical_ceiling`` make a breach a critical failure (roll back at once);
    ``critical=True`` makes any failure of this metric critical.
    ``require_significance``: effect limits only count when Mann–Whitney U says the candidate is
    worse at ``GatePolicy.confidence`` (Kayenta style, for noisy metrics such as latency). Absolute
    ceilings never need significance.
    ``enforced=False``: judged and recorded, but the stage outcome ignores it (a metric the current
    evaluator cannot measure meaningfully, e.g. latency of an emulated candidate).
    """

    __pydantic_config__ = {"extra": "forbid"}  # edge validation: unknown keys are errors

    name: str
    direction: Direction
    comparison: Comparison = Comparison.TWO_SAMPLE
    statistic: Statistic = Statistic.MEAN
    effect: Effect = Effect.RATIO
    max_effect: float | None = None
    critical_effect: float | None = None
    ceiling: float | None = None
    critical_ceiling: float | None = None
    critical: bool = False
    require_significance: bool = True
    min_samples: int | None = None
    weight: float = 1.0
    enforced: bool = True

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("MetricGate.name must be a non-empty string")
        object.__setattr__(self, "direction", Direction(self.direction))
        object.__setattr__(self, "comparison", Comparison(self.comparison))
        object.__setattr__(self, "statistic", Statistic(self.statistic))
        object.__setattr__(self, "effect", Effect(self.effect))
        for attr in ("max_effect", "critical_effect", "ceiling", "critical_ceiling"):
            value = getattr(self, attr)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"metric {self.name!r}: {attr} must be finite, got {value!r}")
        if self.comparison is Comparison.CANDIDATE_ONLY and (
            self.max_effect is not None or self.critical_effect is not None
        ):
            raise ValueError(
                f"metric {self.name!r}: effect limits need a baseline; a candidate-only metric "
                "takes ceiling / critical_ceiling"
            )
        if (
            self.comparison is Comparison.CANDIDATE_ONLY
            and self.ceiling is None
            and self.critical_ceiling is None
        ):
            raise ValueError(f"metric {self.name!r}: a candidate-only metric needs a ceiling")
        if self.min_samples is not None and self.min_samples < 1:
            raise ValueError(f"metric {self.name!r}: min_samples must be >= 1")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"metric {self.name!r}: weight must be a positive finite number")
        worse = self._worse_or_equal
        if (
            self.max_effect is not None
            and self.critical_effect is not None
            and not worse(self.critical_effect, self.max_effect)
        ):
            raise ValueError(
                f"metric {self.name!r}: critical_effect {self.critical_effect} must be at least as "
                f"bad as max_effect {self.max_effect}"
            )
        if (
            self.ceiling is not None
            and self.critical_ceiling is not None
            and not worse(self.critical_ceiling, self.ceiling)
        ):
            raise ValueError(
                f"metric {self.name!r}: critical_ceiling {self.critical_ceiling} must be at least "
                f"as bad as ceiling {self.ceiling}"
            )

    def _worse_or_equal(self, value: float, limit: float) -> bool:
        """True when ``value`` is at or beyond ``limit`` in the bad direction."""
        if self.direction is Direction.LOWER_IS_BETTER:
            return value >= limit
        return value <= limit

    def breaches(self, value: float, limit: float) -> bool:
        """True when ``value`` lies strictly beyond ``limit`` in the bad direction."""
        if self.direction is Direction.LOWER_IS_BETTER:
            return value > limit
        return value < limit


@dataclass(frozen=True)
class StagePlan:
    """Traffic steps and limits (Flagger/Argo style).

    ``steps``: traffic percentages, strictly increasing, the last one 100.
    ``failure_limit``: failed stage analyses tolerated before rolling back (1 = first Fail rolls
    back; a critical failure always rolls back at once).
    ``inconclusive_limit``: consecutive inconclusive analyses of one stage before the rollout is
    rolled back as undecidable.
    """

    __pydantic_config__ = {"extra": "forbid"}  # edge validation: unknown keys are errors

    steps: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    failure_limit: int = 1
    inconclusive_limit: int = 3

    def __post_init__(self) -> None:
        steps = tuple(float(s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps:
            raise ValueError("StagePlan.steps must not be empty")
        if any(not (0 < s <= 100) for s in steps):
            raise ValueError(f"StagePlan.steps must lie in (0, 100], got {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"StagePlan.steps must be strictly increasing, got {steps}")
        if steps[-1] != 100.0:
            raise ValueError(f"StagePlan.steps must end at 100, got {steps}")
        if self.failure_limit < 1 or self.inconclusive_limit < 1:
            raise ValueError("failure_limit and inconclusive_limit must be >= 1")


def default_metric_gates() -> tuple[MetricGate, ...]:
    """The DESIGN.md gate defaults (see the module docstring)."""
    return (
        MetricGate(
            name=Metric.LATENCY_MS.value,
            direction=Direction.LOWER_IS_BETTER,
            statistic=Statistic.P99,
            effect=Effect.RATIO,
            max_effect=1.2,
            critical_effect=1.5,
            require_significance=True,
        ),
        MetricGate(
            # samples: per-request mean NLL (nats/token); effect: perplexity ratio
            name=Metric.NLL.value,
            direction=Direction.LOWER_IS_BETTER,
            statistic=Statistic.MEAN,
            effect=Effect.EXP_DIFFERENCE,
            max_effect=1.01,
            critical=True,
            require_significance=False,
        ),
        MetricGate(
            # samples: per-request share of tokens whose top-1 matches the baseline's
            name=Metric.TOP1_AGREEMENT.value,
            direction=Direction.HIGHER_IS_BETTER,
            comparison=Comparison.CANDIDATE_ONLY,
            ceiling=0.99,
            critical=True,
        ),
        MetricGate(
            # samples: per-request mean next-token KL(P_baseline || P_candidate), nats
            name=Metric.KL_MEAN.value,
            direction=Direction.LOWER_IS_BETTER,
            comparison=Comparison.CANDIDATE_ONLY,
            ceiling=0.05,
            critical=True,
        ),
        MetricGate(
            # samples: per-request p99 next-token KL, nats; summarised by the mean over requests
            name=Metric.KL_P99.value,
            direction=Direction.LOWER_IS_BETTER,
            comparison=Comparison.CANDIDATE_ONLY,
            ceiling=0.5,
            critical=True,
        ),
        MetricGate(
            # samples: per-request share of tokens with activations beyond the calibrated range
            name=Metric.OUTLIER_FALLBACK_RATE.value,
            direction=Direction.LOWER_IS_BETTER,
            comparison=Comparison.CANDIDATE_ONLY,
            ceiling=0.005,
            critical=True,
        ),
        error_rate_gate(),
    )


#: Share of the candidate's requests that may fail (after bounded retries) before the stage fails.
DEFAULT_MAX_ERROR_RATE = 0.01


def error_rate_gate(max_error_rate: float = DEFAULT_MAX_ERROR_RATE) -> MetricGate:
    """Failed requests, counted: samples are 1.0 (the candidate's side of the request failed) or
    0.0 per request, never NaN, so a failed request can never be dropped as missing data. The mean
    is the candidate's error rate; above ``max_error_rate`` is a critical failure (roll back)."""
    return MetricGate(
        name=Metric.ERROR_RATE.value,
        direction=Direction.LOWER_IS_BETTER,
        comparison=Comparison.CANDIDATE_ONLY,
        statistic=Statistic.MEAN,
        ceiling=max_error_rate,
        critical=True,
    )


def endpoint_metric_gates() -> tuple[MetricGate, ...]:
    """Gates only an endpoint evaluator can feed (streamed generations of both sides); added to
    :func:`default_metric_gates` when the canary mirrors traffic to real endpoints.

    * ``ttft_ms`` / ``tpot_ms``: time to first token and per output token, p99, the latency rule
      (significant ≥ 1.2× fails, ≥ 1.5× critical) like ``latency_ms``;
    * ``task_quality``: per-request 1/0 "the answer is usable for its route family" (valid JSON for
      extraction, code that parses for code, a non-empty non-refusal answer otherwise); a
      significant drop of more than 1 point (0.01) against the baseline is critical (the seeds'
      "quality drop > 1 % ⇒ rollback", judged per route);
    * ``refusal_rate`` / ``empty_rate``: significant rise of more than 1 point fails (critical);
    * ``task_agreement``: field / label agreement with the baseline's answer (extraction and
      classification routes only), floor 0.5; ``answer_flip``: share of requests whose extracted
      answer differs from the baseline's, ceiling 0.5. Their floors/ceilings stay loose because the
      A/A greedy exact-match on llama.cpp is 0.75 (README "Canary gates").
    """
    latency = dict(
        direction=Direction.LOWER_IS_BETTER,
        statistic=Statistic.P99,
        effect=Effect.RATIO,
        max_effect=1.2,
        critical_effect=1.5,
        require_significance=True,
    )
    drop = dict(
        comparison=Comparison.TWO_SAMPLE,
        statistic=Statistic.MEAN,
        effect=Effect.DIFFERENCE,
        critical=True,
        require_significance=True,
    )
    return (
        MetricGate(name=EndpointMetric.TTFT_MS.value, **latency),
        MetricGate(name=EndpointMetric.TPOT_MS.value, **latency),
        MetricGate(
            name=EndpointMetric.TASK_QUALITY.value,
            direction=Direction.HIGHER_IS_BETTER,
            max_effect=-0.01,
            **drop,
        ),
        MetricGate(
            name=EndpointMetric.REFUSAL_RATE.value,
            direction=Direction.LOWER_IS_BETTER,
            max_effect=0.01,
            **drop,
        ),
        MetricGate(
            name=EndpointMetric.EMPTY_RATE.value,
            direction=Direction.LOWER_IS_BETTER,
            max_effect=0.01,
            **drop,
        ),
        MetricGate(
            name=EndpointMetric.TASK_AGREEMENT.value,
            direction=Direction.HIGHER_IS_BETTER,
            comparison=Comparison.CANDIDATE_ONLY,
            ceiling=0.5,
            critical=True,
        ),
        MetricGate(
            name=EndpointMetric.ANSWER_FLIP.value,
            direction=Direction.LOWER_IS_BETTER,
            comparison=Comparison.CANDIDATE_ONLY,
            ceiling=0.5,
            critical=True,
        ),
    )


@dataclass(frozen=True)
class GatePolicy:
    """Everything the judge and the rollout driver need.

    ``confidence``: one-sided Mann–Whitney confidence (0.98 → significant when p < 0.02).
    ``pass_score`` / ``marginal_score``: stage score (weighted % of passing metrics, Kayenta style);
    score ≥ pass → Pass, marginal ≤ score < pass → Inconclusive (do not advance), below → Fail.
    ``max_missing_fraction``: share of non-finite samples on one side above which a metric is
    Inconclusive (missing data), even if enough finite samples remain.
    """

    __pydantic_config__ = {"extra": "forbid"}  # edge validation: unknown keys are errors

    metrics: tuple[MetricGate, ...] = field(default_factory=default_metric_gates)
    confidence: float = 0.98
    min_samples: int = 50
    pass_score: float = 95.0
    marginal_score: float = 75.0
    max_missing_fraction: float = 0.1
    plan: StagePlan = field(default_factory=StagePlan)

    def __post_init__(self) -> None:
        metrics = tuple(self.metrics)
        object.__setattr__(self, "metrics", metrics)
        if not metrics:
            raise ValueError("GatePolicy.metrics must not be empty")
        if not any(m.enforced for m in metrics):
            raise ValueError("GatePolicy needs at least one enforced metric")
        names = [m.name for m in metrics]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"GatePolicy.metrics has duplicate names: {duplicates}")
        if not (0.5 <= self.confidence < 1.0):
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.min_samples < 2:
            raise ValueError("min_samples must be >= 2 (Mann–Whitney needs data)")
        if not (0 <= self.marginal_score <= self.pass_score <= 100):
            raise ValueError(
                "need 0 <= marginal_score <= pass_score <= 100, got "
                f"{self.marginal_score}, {self.pass_score}"
            )
        if not (0 <= self.max_missing_fraction < 1):
            raise ValueError("max_missing_fraction must be in [0, 1)")

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    def metric(self, name: str) -> MetricGate:
        for gate in self.metrics:
            if gate.name == name:
                return gate
        raise KeyError(f"no metric {name!r} in policy (have {[m.name for m in self.metrics]})")

    def min_samples_for(self, gate: MetricGate) -> int:
        return gate.min_samples if gate.min_samples is not None else self.min_samples


class MetricOverride(BaseModel):
    """Changes to one default gate; only the fields given apply (``null`` removes a limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_effect: float | None = None
    critical_effect: float | None = None
    ceiling: float | None = None
    critical_ceiling: float | None = None
    critical: bool | None = None
    require_significance: bool | None = None
    min_samples: int | None = Field(None, ge=1)
    weight: float | None = Field(None, gt=0)
    enforced: bool | None = None


class StagePlanOverride(BaseModel):
    """Changes to the stage plan's limits (the traffic steps come from the canary's stages)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_limit: int | None = Field(None, ge=1)
    inconclusive_limit: int | None = Field(None, ge=1)


class GatePolicyOverrides(BaseModel):
    """Gate-policy changes as a flow parameter takes them, e.g.
    ``{"metric_overrides": {"top1_agreement": {"ceiling": 0.9}}, "confidence": 0.99}``.

    ``metric_overrides`` changes fields of named default gates (unknown metric names or fields are
    errors; :class:`EndpointMetric` names only apply to a canary against live endpoints, the
    in-process replay refuses them); ``metrics`` replaces the gate list entirely (not both). Only fields given apply.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric_overrides: dict[Metric | EndpointMetric, MetricOverride] = Field(default_factory=dict)
    metrics: tuple[MetricGate, ...] | None = None
    confidence: float | None = None
    min_samples: int | None = None
    pass_score: float | None = None
    marginal_score: float | None = None
    max_missing_fraction: float | None = None
    plan: StagePlanOverride | None = None

    @model_validator(mode="after")
    def _one_way_to_set_metrics(self) -> GatePolicyOverrides:
        if self.metrics is not None and self.metric_overrides:
            raise ValueError("give metric_overrides (change default gates) or metrics, not both")
        return self


def build_gate_policy(
    stages: Sequence[float],
    min_samples: int,
    overrides: GatePolicyOverrides | None = None,
    *,
    reported_only: Collection[str] = (),
) -> GatePolicy:
    """The judge's policy: the DESIGN.md gate defaults with ``stages`` as the plan's steps and
    ``min_samples``, then ``overrides``. Gates named in ``reported_only`` are judged and recorded
    but not enforced (metrics the evaluator cannot measure meaningfully). Raises ``ValueError``
    when the result is not a valid policy."""
    overrides = overrides or GatePolicyOverrides()
    known = {gate.name for gate in default_metric_gates()}
    unknown = sorted(key.value for key in overrides.metric_overrides if key.value not in known)
    if unknown:
        raise ValueError(
            f"metric_overrides names {unknown}: measured by the endpoint evaluator only "
            "(a live canary), not by the in-process replay"
        )
    given = overrides.model_dump(
        exclude_unset=True, exclude={"metric_overrides", "metrics", "plan"}
    )
    metrics = overrides.metrics
    if metrics is None:
        metrics = tuple(
            replace(
                gate,
                enforced=gate.name not in reported_only,
                **_set_fields(overrides.metric_overrides.get(Metric(gate.name))),
            )
            for gate in default_metric_gates()
        )
    plan = StagePlan(steps=tuple(stages), **_set_fields(overrides.plan))
    return GatePolicy(metrics=metrics, plan=plan, **{"min_samples": min_samples, **given})


def _set_fields(model: BaseModel | None) -> dict[str, Any]:
    return {} if model is None else model.model_dump(exclude_unset=True)


def load_gate_policy(source: GatePolicy | dict[str, Any] | str | Path | None = None) -> GatePolicy:
    """A validated :class:`GatePolicy` from a mapping, a JSON file path, or ``None`` (defaults).

    Unknown keys are rejected (pydantic ``extra='forbid'``) so a misspelt threshold is an error.
    """
    if source is None:
        return GatePolicy()
    if isinstance(source, GatePolicy):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"gate policy file not found: {path}")
        source = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(source, dict):
        raise TypeError(f"gate policy must be a mapping, got {type(source).__name__}")
    adapter = TypeAdapter(GatePolicy)
    return adapter.validate_python(source)


def gate_policy_as_dict(policy: GatePolicy) -> dict[str, Any]:
    """JSON-ready form of a policy (round-trips through :func:`load_gate_policy`)."""

    def _plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: _plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_plain(v) for v in value]
        return value

    return _plain(asdict(policy))
