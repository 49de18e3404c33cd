"""Replay canary stages: which hold-out requests a stage replays, how a replay becomes the judge's
samples, and one stage (or a run of stages) replayed and judged.

Plain functions (no Prefect here); the canary flow wraps :func:`run_replay_stage` in a task that
passes paths: it saves the stage's :class:`~calibration.evaluate.ReplayResult` as JSON at
``replay_path`` and returns the verdict, which goes into the rollout ledger.

Stage samples are nested (:func:`stage_request_indices`): stage k replays
``max(min samples, ceil(share_k × window))`` requests of one seeded permutation of the window, a
superset of stage k-1's. Any :class:`~calibration.evaluate.CanaryEvaluator` works here: the
in-process :class:`~calibration.evaluate.InProcessEvaluator` today, a mirrored-traffic evaluator
against two OpenAI-compatible endpoints later.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from calibration.evaluate import CanaryEvaluator, Prompt, ReplayResult, save_replay
from registry.judge import Decision, RolloutProgress, StageVerdict, decide
from registry.policy import GatePolicy, Metric

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ stage sampling


def stage_sample_count(window_size: int, traffic_percent: float, min_samples: int) -> int:
    """``max(min_samples, ceil(window * share))`` capped at the window (the judge then reports a
    short window as Inconclusive)."""
    if window_size < 0 or min_samples < 0:
        raise ValueError("window_size and min_samples must be >= 0")
    if not 0 < traffic_percent <= 100:
        raise ValueError(f"traffic_percent must lie in (0, 100], got {traffic_percent}")
    wanted = max(min_samples, math.ceil(window_size * traffic_percent / 100.0 - 1e-9))
    return min(window_size, wanted)


def stage_request_indices(
    window_size: int, traffic_percent: float, *, min_samples: int, seed: int
) -> tuple[int, ...]:
    """Sorted hold-out window positions a stage replays: the first :func:`stage_sample_count` entries
    of one permutation seeded by ``seed``, so a later (larger) stage's sample contains every earlier
    one. Deterministic for a given ``(window_size, seed)``."""
    count = stage_sample_count(window_size, traffic_percent, min_samples)
    if count < min_samples:
        logger.warning(
            "hold-out window has %d requests < minimum %d: the stage will be inconclusive",
            window_size,
            min_samples,
        )
    order = list(range(window_size))
    random.Random(seed).shuffle(order)
    return tuple(sorted(order[:count]))


def stage_requests(
    policy: GatePolicy, stage_index: int, window_size: int, *, seed: int
) -> tuple[int, ...]:
    """Hold-out positions stage ``stage_index`` of ``policy.plan`` replays (sorted, nested)."""
    if not 0 <= stage_index < len(policy.plan.steps):
        raise ValueError(
            f"stage_index {stage_index} outside the plan's {len(policy.plan.steps)} steps"
        )
    min_samples = max(policy.min_samples_for(gate) for gate in policy.metrics)
    return stage_request_indices(
        window_size, policy.plan.steps[stage_index], min_samples=min_samples, seed=seed
    )


# ------------------------------------------------------------------------------------ judge adapter


def judge_samples(
    result: ReplayResult,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``(baseline, candidate)`` per-metric samples for :func:`registry.judge.judge_stage`.

    * ``latency_ms``, ``nll``: both sides measured (two-sample metrics);
    * ``kl_mean``, ``kl_p99``, ``top1_agreement``: relative to the baseline already; the baseline side
      gets its self-values (0, 0, 1.0) — the judge only looks at the candidate for these;
    * ``outlier_fallback_rate``: measured on both (a champion may itself be W4A4);
    * ``error_rate``: 1.0 for each request whose side failed, else 0.0 — never NaN, so a failed
      request is counted by the error-rate gate, never dropped. Its other metrics are NaN on both
      sides (missing data).
    """
    base: dict[str, list[float]] = {}
    cand: dict[str, list[float]] = {}

    def put(metric: Metric, baseline_value: float, candidate_value: float) -> None:
        base.setdefault(metric.value, []).append(baseline_value)
        cand.setdefault(metric.value, []).append(candidate_value)

    for rec in result.records:
        put(Metric.ERROR_RATE, float(rec.baseline_failed), float(rec.candidate_failed))
        if not rec.ok:
            for metric in Metric:
                if metric is not Metric.ERROR_RATE:
                    put(metric, math.nan, math.nan)
            continue
        put(Metric.LATENCY_MS, rec.latency_baseline_s * 1000.0, rec.latency_candidate_s * 1000.0)
        put(Metric.NLL, rec.nll_baseline, rec.nll_candidate)
        put(Metric.TOP1_AGREEMENT, 1.0, rec.top1_agreement)
        put(Metric.KL_MEAN, 0.0, rec.kl_mean)
        put(Metric.KL_P99, 0.0, rec.kl_p99)
        put(
            Metric.OUTLIER_FALLBACK_RATE,
            rec.outlier_fallback_rate_baseline,
            rec.outlier_fallback_rate_candidate,
        )
    return base, cand


def judge_replay(
    result: ReplayResult, policy: GatePolicy | None = None, *, stage_index: int = 0
) -> StageVerdict:
    """The judge's verdict on a replay: the pool, and every route with enough requests judged on its
    own (:func:`pipelines.canary.judging.judge_window`; a route regressing fails the stage)."""
    from pipelines.canary.judging import judge_window

    return judge_window(result, policy or GatePolicy(), stage_index=stage_index)


# ------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class ReplayStageResult:
    """One analysed stage: which requests ran, what they measured, what the judge said."""

    stage_index: int
    traffic_percent: float
    request_indices: tuple[int, ...]  # positions in the hold-out window
    replay: ReplayResult
    verdict: StageVerdict
    replay_path: Path | None = None


def run_replay_stage(
    evaluator: CanaryEvaluator,
    holdout: Sequence[Prompt],
    *,
    stage_index: int,
    policy: GatePolicy | None = None,
    seed: int = 0,
    replay_path: str | os.PathLike | None = None,
) -> ReplayStageResult:
    """Replay stage ``stage_index``'s share of ``holdout`` (redacted prompts) and judge it.

    ``replay_path``: where to save the per-request records as JSON (atomic), for the ledger / MLflow.
    """
    policy = policy or GatePolicy()
    indices = stage_requests(policy, stage_index, len(holdout), seed=seed)
    if not indices:
        raise ValueError("the hold-out window is empty; nothing to replay")
    logger.info(
        "stage %d (%g%% of %d held-out prompts): replaying %d requests",
        stage_index,
        policy.plan.steps[stage_index],
        len(holdout),
        len(indices),
    )
    result = evaluator([holdout[i] for i in indices], request_indices=indices)
    saved = save_replay(result, replay_path) if replay_path is not None else None
    verdict = judge_replay(result, policy, stage_index=stage_index)
    return ReplayStageResult(
        stage_index=stage_index,
        traffic_percent=policy.plan.steps[stage_index],
        request_indices=indices,
        replay=result,
        verdict=verdict,
        replay_path=saved,
    )


def run_replay_canary(
    evaluator: CanaryEvaluator,
    holdout: Sequence[Prompt],
    *,
    policy: GatePolicy | None = None,
    seed: int = 0,
    replay_dir: str | os.PathLike | None = None,
    progress: RolloutProgress | None = None,
) -> tuple[Decision, RolloutProgress, list[ReplayStageResult]]:
    """Run stages from ``progress.stage_index`` on while the judge says ADVANCE.

    Stops at the first PROMOTE, ROLLBACK or HOLD (a replay window cannot grow, so a HOLD is returned
    to the caller, who may replay again later with more logs). Returns the last decision, the updated
    progress and every analysed stage. For several stages pass an evaluator whose models are already
    loaded (``InProcessEvaluator(...).preload()``).
    """
    policy = policy or GatePolicy()
    progress = progress or RolloutProgress()
    stages: list[ReplayStageResult] = []
    while True:
        index = progress.stage_index
        path = Path(replay_dir) / f"replay-stage-{index}.json" if replay_dir is not None else None
        stage = run_replay_stage(
            evaluator, holdout, stage_index=index, policy=policy, seed=seed, replay_path=path
        )
        stages.append(stage)
        decision, progress = decide(stage.verdict, progress, policy)
        logger.info("stage %d: %s -> %s", index, stage.verdict.outcome.value, decision.value)
        if decision is not Decision.ADVANCE:
            return decision, progress, stages
