"""Replay canary stages: pick a stage's requests from the hold-out window, replay them, judge them.

Plain functions (no Prefect here); the canary flow wraps :func:`run_replay_stage` in a task that
passes paths: it saves the stage's :class:`~calibration.evaluate.ReplayResult` as JSON at
``replay_path`` and returns the verdict, whose ``as_records()`` go into the rollout ledger.

Stage samples are nested (see :func:`calibration.evaluate.stage_request_indices`): stage k replays
``max(min samples, ceil(share_k × window))`` requests of one seeded permutation of the window, a
superset of stage k-1's. Any :class:`~calibration.evaluate.CanaryEvaluator` works here: the
in-process :class:`~calibration.evaluate.InProcessEvaluator` today, a mirrored-traffic evaluator
against two OpenAI-compatible endpoints later.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from calibration.evaluate import (
    CanaryEvaluator,
    Prompt,
    ReplayResult,
    save_replay,
    stage_request_indices,
)
from registry.judge import Decision, RolloutProgress, StageVerdict, decide
from registry.policy import GatePolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayStageResult:
    """One analysed stage: which requests ran, what they measured, what the judge said."""

    stage_index: int
    traffic_percent: float
    request_indices: tuple[int, ...]  # positions in the hold-out window
    replay: ReplayResult
    verdict: StageVerdict
    replay_path: Path | None = None


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


def judge_replay(
    result: ReplayResult, policy: GatePolicy | None = None, *, stage_index: int = 0
) -> StageVerdict:
    """The judge's verdict on a replay: the pool, and every route with enough requests judged on its
    own (:func:`pipelines.canary.judging.judge_window`; a route regressing fails the stage)."""
    from pipelines.canary.judging import judge_window

    return judge_window(result, policy or GatePolicy(), stage_index=stage_index)


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
