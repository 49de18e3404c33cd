"""Live canary stages: set the candidate's weight at the gateway, collect the window, judge, then
advance, hold or roll back.

Per stage k (DESIGN.md "Canary"):

1. the weight ``steps[k]`` is journaled as an *intent*, set through the :class:`TrafficRouter`, read
   back, and journaled as *applied*;
2. the window: the stage's nested share of the held-out requests mirrored to both endpoints by the
   evaluator (the live share is what the gateway routes meanwhile);
3. :func:`pipelines.canary.judging.judge_window` judges the pool and every route, and
   :func:`registry.judge.decide` decides;
4. ROLLBACK puts the weight to 0 **before anything else** (journaled), then the caller's
   ``on_stage`` hook records the verdict; PROMOTE leaves the candidate at 100 %; HOLD keeps the
   stage's weight and returns.

The journal (:class:`LedgerWeightJournal` on the rollout ledger, or :class:`MemoryWeightJournal`)
lets a rerun after a crash put the gateway back where the ledger says (:func:`reconcile_weight`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from calibration.evaluate import CanaryEvaluator, ReplayResult, save_replay
from pipelines.canary.judging import judge_window
from pipelines.canary.replay import stage_requests
from pipelines.canary.router import TrafficRouter
from registry.judge import Decision, RolloutProgress, StageVerdict, decide
from registry.policy import GatePolicy

logger = logging.getLogger(__name__)


class WeightJournal(Protocol):
    """Where weight changes are written down (the rollout ledger in production)."""

    def record(self, percent: float, phase: str, *, stage: int | None, reason: str) -> None: ...

    def expected(self) -> float | None:
        """The weight the gateway should carry now (None: nothing journaled yet)."""
        ...


@dataclass
class MemoryWeightJournal:
    """A journal in memory (tests, dry runs)."""

    entries: list[tuple[float, str, int | None, str]] = field(default_factory=list)

    def record(self, percent: float, phase: str, *, stage: int | None, reason: str) -> None:
        self.entries.append((float(percent), phase, stage, reason))

    def expected(self) -> float | None:
        return self.entries[-1][0] if self.entries else None


@dataclass(frozen=True)
class LedgerWeightJournal:
    """The weight journal of one rollout in the ledger (``traffic_weights`` rows).

    ``expected``: 0 for a rollout that ended other than promoted (rolled back, aborted, failed),
    100 for a promoted one, else the last journaled weight (an intent without its read-back means
    a crash mid-change: the intent is what the gateway should carry)."""

    rollout_id: int
    router: str
    db_url: str | None = None

    def record(self, percent: float, phase: str, *, stage: int | None, reason: str) -> None:
        from registry import ledger

        ledger.record_weight(
            self.rollout_id,
            percent,
            ledger.WeightPhase(phase),
            router=self.router,
            stage=stage,
            reason=reason,
            db_url=self.db_url,
        )

    def expected(self) -> float | None:
        from registry import ledger

        rollout = ledger.get_rollout(self.rollout_id, db_url=self.db_url)
        status = rollout.status.value
        if status == "promoted":
            return 100.0
        if status in ("rolled_back", "aborted", "failed"):
            return 0.0
        last = ledger.last_weight(self.rollout_id, db_url=self.db_url)
        return None if last is None else last.candidate_percent


def set_weight(
    router: TrafficRouter,
    journal: WeightJournal,
    percent: float,
    *,
    stage: int | None,
    reason: str,
) -> float:
    """Journal the intent, set the weight at the gateway, journal the weight read back."""
    journal.record(percent, "intent", stage=stage, reason=reason)
    applied = router.set_candidate_percent(percent)
    journal.record(applied, "applied", stage=stage, reason=reason)
    logger.info("%s: candidate weight %g %% (%s)", router.name, applied, reason)
    return applied


def reconcile_weight(router: TrafficRouter, journal: WeightJournal) -> float | None:
    """On entry (e.g. a rerun after a crash): make the gateway carry what the journal says.
    Returns the weight in force afterwards (None when nothing was journaled: nothing to fix)."""
    expected = journal.expected()
    if expected is None:
        return None
    actual = router.candidate_percent()
    if actual != expected:
        logger.warning(
            "%s carries candidate %g %%, the ledger says %g %%: reconciling",
            router.name,
            actual,
            expected,
        )
        return set_weight(router, journal, expected, stage=None, reason="reconcile after restart")
    return actual


@dataclass(frozen=True)
class LiveStage:
    stage_index: int
    traffic_percent: float
    weight_applied: float  # read back from the gateway before the window
    request_indices: tuple[int, ...]
    replay: ReplayResult
    verdict: StageVerdict
    decision: Decision
    replay_path: Path | None = None


@dataclass(frozen=True)
class LiveCanaryResult:
    decision: Decision
    progress: RolloutProgress
    stages: tuple[LiveStage, ...]
    final_weight: float


def run_live_canary(
    evaluator: CanaryEvaluator,
    router: TrafficRouter,
    holdout: Sequence[Any],
    *,
    policy: GatePolicy,
    routes: Sequence[str | None] | None = None,
    seed: int = 0,
    progress: RolloutProgress | None = None,
    journal: WeightJournal | None = None,
    replay_dir: str | os.PathLike | None = None,
    route_min_samples: int = 20,
    on_stage: Callable[[LiveStage], None] | None = None,
    reuse_records: bool = False,
    previous: ReplayResult | None = None,
    max_stages: int | None = None,
) -> LiveCanaryResult:
    """Run stages from ``progress.stage_index`` until PROMOTE, ROLLBACK or HOLD (module docstring).

    ``routes``: the route of each held-out request (per-route judging). ``on_stage`` is called with
    every analysed stage after any rollback weight change (the ledger records it there).
    ``reuse_records``: stage samples are nested, so a mirrored replay of the hold-out only needs to
    send each stage's new requests (the earlier records are kept); off by default, since a live
    window should measure latency and errors under the stage's own traffic. ``previous``: the
    last window of an earlier call (its records are kept with ``reuse_records``).
    ``max_stages``: return after that many analysed stages even on ADVANCE (a caller that runs
    one stage per task, as the canary flow does)."""
    if max_stages is not None and max_stages < 1:
        raise ValueError(f"max_stages must be >= 1, got {max_stages}")
    journal = journal or MemoryWeightJournal()
    progress = progress or RolloutProgress()
    reconcile_weight(router, journal)
    stages: list[LiveStage] = []
    kept: dict[int, Any] = {}  # request index -> record (reuse_records)
    if reuse_records and previous is not None:
        kept.update({r.request_index: r for r in previous.records})
    while True:
        index = progress.stage_index
        percent = policy.plan.steps[index]
        applied = set_weight(router, journal, percent, stage=index, reason=f"stage {index}")
        indices = stage_requests(policy, index, len(holdout), seed=seed)
        todo = [i for i in indices if i not in kept] if reuse_records else list(indices)
        extra = {"routes": [routes[i] for i in todo]} if routes is not None else {}
        fresh = (
            evaluator([holdout[i] for i in todo], request_indices=todo, **extra) if todo else None
        )
        if reuse_records:
            kept.update({r.request_index: r for r in (fresh.records if fresh else ())})
            template = fresh if fresh is not None else (stages[-1].replay if stages else previous)
            result = dataclasses.replace(template, records=tuple(kept[i] for i in indices))
        else:
            result = fresh
        path = None
        if replay_dir is not None:
            path = save_replay(result, Path(replay_dir) / f"live-stage-{index}.json")
        verdict = judge_window(
            result, policy, stage_index=index, route_min_samples=route_min_samples
        )
        decision, progress = decide(verdict, progress, policy)
        if decision is Decision.ROLLBACK:  # traffic back to the baseline before anything else
            applied_after = set_weight(
                router, journal, 0.0, stage=index, reason=f"rollback: {verdict.reason}"[:500]
            )
        else:
            applied_after = applied
        stage = LiveStage(
            stage_index=index,
            traffic_percent=percent,
            weight_applied=applied,
            request_indices=indices,
            replay=result,
            verdict=verdict,
            decision=decision,
            replay_path=path,
        )
        stages.append(stage)
        logger.info(
            "stage %d (%g %%): %s -> %s (%s)",
            index,
            percent,
            verdict.outcome.value,
            decision.value,
            verdict.reason,
        )
        if on_stage is not None:
            on_stage(stage)
        if decision is not Decision.ADVANCE or (
            max_stages is not None and len(stages) >= max_stages
        ):
            return LiveCanaryResult(decision, progress, tuple(stages), applied_after)


def ledger_stage_recorder(
    rollout_id: int, db_url: str | None = None
) -> Callable[[LiveStage], None]:
    """An ``on_stage`` hook writing each stage into the rollout ledger: the verdict's rows and the
    decision, then ``advance`` on ADVANCE (promotion and rollback alias moves stay the caller's)."""
    from registry import ledger

    def record(stage: LiveStage) -> None:
        ledger.record_stage_result(rollout_id, stage.verdict, stage.decision, db_url=db_url)
        if stage.decision is Decision.ADVANCE:
            ledger.advance(rollout_id, db_url=db_url)

    return record
