"""Plain steps of the canary, promote and rollback flows (each Prefect task calls one of these).

The rollout ledger (``registry.ledger``) is the source of truth for where a rollout stands; MLflow
aliases say what serves. Every step reads both, acts, and records what it did, so a flow that dies
anywhere can be rerun: :func:`open_rollout` resumes (or aborts) what the crash left behind.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

from calibration.evaluate import InProcessEvaluator
from calibration.sampling import Role
from pipelines.canary import run_replay_stage
from pipelines.params import IN_PROCESS_REPORTED_ONLY, CanaryParams, PromoteParams, RollbackParams
from pipelines.prompt_logs import calibration_prompts
from pipelines.results import CanaryOutcome, StageReport
from registry import db, ledger
from registry.aliases import Alias, AliasMove
from registry.db import fp4roll_home
from registry.judge import Decision, decide
from registry.mlflow_registry import RegistryError, promote, reject_challenger, rollback
from registry.policy import GatePolicy, GatePolicyOverrides, build_gate_policy
from registry.versions import find_alias, local_checkpoint, resolve_version

logger = logging.getLogger(__name__)


class CanaryPlan(BaseModel):
    """What a canary compares, resolved once at the start of the flow."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    candidate_version: str
    baseline_version: str
    candidate_dir: str
    baseline_dir: str
    corpus_digest: str  # the candidate's calibration set; its hold-out is the canary window
    holdout_size: int
    stages: tuple[float, ...]
    min_samples: int
    max_seq_len: int
    seed: int
    gate_policy: GatePolicyOverrides | None
    db_url: str | None
    tracking_uri: str | None


class RolloutState(BaseModel):
    model_config = ConfigDict(frozen=True)

    rollout_id: int
    stage_index: int
    resumed: bool


def gate_policy(plan: CanaryPlan) -> GatePolicy:
    """:func:`build_gate_policy` for a canary plan."""
    return build_gate_policy(
        plan.stages, plan.min_samples, plan.gate_policy, reported_only=IN_PROCESS_REPORTED_ONLY
    )


def plan_canary(params: CanaryParams) -> CanaryPlan:
    """Resolve candidate (default ``challenger``) and baseline (default ``champion``) to local folders."""

    name = params.model_name
    candidate = resolve_version(
        name, params.candidate_version or "challenger", tracking_uri=params.tracking_uri
    )
    baseline = resolve_version(
        name, params.baseline_version or "champion", tracking_uri=params.tracking_uri
    )
    if candidate.version == baseline.version:
        raise RegistryError(
            f"{name}: candidate and baseline are the same version {candidate.version}"
        )
    if not candidate.corpus_digest:
        raise RegistryError(
            f"{name} v{candidate.version} has no corpus digest tag: the canary needs the hold-out of "
            "the calibration set it was calibrated on"
        )
    holdout = calibration_prompts(candidate.corpus_digest, params.db_url, Role.HOLDOUT)
    if len(holdout) < params.min_samples:
        raise ValueError(
            f"the hold-out of calibration set {candidate.corpus_digest[:12]} has {len(holdout)} prompts, "
            f"fewer than min_samples={params.min_samples}: sample a larger hold-out"
        )
    plan = CanaryPlan(
        model_name=name,
        candidate_version=candidate.version,
        baseline_version=baseline.version,
        candidate_dir=str(local_checkpoint(candidate)),
        baseline_dir=str(local_checkpoint(baseline)),
        corpus_digest=candidate.corpus_digest,
        holdout_size=len(holdout),
        stages=tuple(params.stages),
        min_samples=params.min_samples,
        max_seq_len=params.max_seq_len,
        seed=params.seed,
        gate_policy=params.gate_policy,
        db_url=params.db_url,
        tracking_uri=params.tracking_uri,
    )
    gate_policy(plan)  # validate the overrides before anything is started
    return plan


def open_rollout(plan: CanaryPlan) -> RolloutState:
    """Resume this candidate's active rollout, abort another candidate's, or start a new one."""

    db.ensure_schema(plan.db_url)
    champion = find_alias(plan.model_name, Alias.CHAMPION, tracking_uri=plan.tracking_uri)
    active = ledger.active_rollout(plan.model_name, db_url=plan.db_url)
    if active is not None and active.candidate_version != plan.candidate_version:
        ledger.mark_aborted(
            active.id,
            f"superseded by a canary of version {plan.candidate_version}",
            db_url=plan.db_url,
        )
    point = ledger.resume_or_abort(
        plan.model_name,
        champion_version=champion.version if champion else None,
        resume=True,
        db_url=plan.db_url,
    )
    if point is not None and point.rollout.active:
        if point.rollout.status.value == "paused":
            ledger.resume(point.rollout.id, db_url=plan.db_url)
        logger.info("resuming rollout %d at stage %d", point.rollout.id, point.stage_index)
        return RolloutState(
            rollout_id=point.rollout.id, stage_index=point.stage_index, resumed=True
        )
    rollout = ledger.start_rollout(
        plan.model_name,
        plan.candidate_version,
        plan.baseline_version,
        plan.stages,
        reason=f"canary of v{plan.candidate_version} against v{plan.baseline_version}",
        db_url=plan.db_url,
    )
    return RolloutState(rollout_id=rollout.id, stage_index=0, resumed=False)


def run_stage(plan: CanaryPlan, rollout_id: int, stage_index: int) -> StageReport:
    """Replay stage ``stage_index``'s share of the hold-out through both models, judge it, record the
    verdict and the decision in the ledger, and advance the rollout when the decision says so."""

    policy = gate_policy(plan)
    holdout = calibration_prompts(plan.corpus_digest, plan.db_url, Role.HOLDOUT)
    evaluator = InProcessEvaluator(
        baseline=plan.baseline_dir,
        candidate=plan.candidate_dir,
        max_len=plan.max_seq_len,
        seed=plan.seed,
    )
    replay_path = (
        fp4roll_home() / "work" / "rollouts" / str(rollout_id) / f"stage-{stage_index}.json"
    )
    stage = run_replay_stage(
        evaluator,
        holdout,
        stage_index=stage_index,
        policy=policy,
        seed=plan.seed,
        replay_path=replay_path,
    )
    decision, _ = decide(stage.verdict, ledger.progress(rollout_id, db_url=plan.db_url), policy)
    ledger.record_stage_result(rollout_id, stage.verdict, decision, db_url=plan.db_url)
    if decision is Decision.ADVANCE:
        ledger.advance(rollout_id, db_url=plan.db_url)
    verdict = stage.verdict
    return StageReport(
        rollout_id=rollout_id,
        stage_index=stage_index,
        traffic_percent=verdict.traffic_percent,
        requests=len(stage.request_indices),
        outcome=verdict.outcome,
        decision=decision,
        score=verdict.score,
        reason=verdict.reason,
        failed_metrics=verdict.failed_metrics,
        metrics={
            m.metric: {
                "baseline": m.baseline_statistic,
                "candidate": m.candidate_statistic,
                "effect": m.effect,
                "p_value": m.p_value,
                "verdict": m.verdict.value,
                "critical": m.critical,
                "enforced": m.enforced,
                "reason": m.reason,
            }
            for m in verdict.metrics
        },
        replay_path=str(stage.replay_path),
    )


def promote_candidate(
    plan: CanaryPlan, rollout_id: int, reason: str = "every canary stage passed"
) -> str:
    """Move ``champion`` to the candidate (old champion → ``previous-champion``); mark promoted."""

    moves = promote(
        plan.model_name, plan.candidate_version, reason=reason, tracking_uri=plan.tracking_uri
    )
    ledger.mark_promoted(rollout_id, moves, reason=reason, db_url=plan.db_url)
    return plan.candidate_version


def reject_candidate(plan: CanaryPlan, rollout_id: int, reason: str) -> str:
    """A failed canary: traffic stays on the champion, the challenger is tagged rejected."""

    moves = reject_challenger(
        plan.model_name, plan.candidate_version, reason=reason, tracking_uri=plan.tracking_uri
    )
    ledger.mark_rolled_back(rollout_id, reason, moves, db_url=plan.db_url)
    return plan.baseline_version


def hold_rollout(plan: CanaryPlan, rollout_id: int, reason: str) -> None:
    """Not enough evidence to advance: pause (a later canary run with more logs resumes it)."""

    ledger.pause(rollout_id, reason, db_url=plan.db_url)


def abort_rollout(db_url: str | None, rollout_id: int, reason: str) -> bool:
    """Mark an active rollout aborted (a crash or an operator stop). Champion is never touched."""

    rollout = ledger.get_rollout(rollout_id, db_url=db_url)
    if not rollout.active:
        return False
    ledger.mark_aborted(rollout_id, reason, db_url=db_url)
    return True


def promote_version(params: PromoteParams) -> tuple[AliasMove, ...]:
    """Manual promotion (default: the challenger), recorded in the ledger."""

    db.ensure_schema(params.db_url)
    version = resolve_version(
        params.model_name, params.version or "challenger", tracking_uri=params.tracking_uri
    ).version
    moves = promote(
        params.model_name, version, reason=params.reason, tracking_uri=params.tracking_uri
    )
    ledger.record_alias_moves(moves, db_url=params.db_url)
    return tuple(moves)


def rollback_version(params: RollbackParams) -> tuple[AliasMove, ...]:
    """Put ``to_version`` (default: ``previous-champion``) back as champion, recorded in the ledger."""

    db.ensure_schema(params.db_url)
    moves = rollback(
        params.model_name, params.to_version, reason=params.reason, tracking_uri=params.tracking_uri
    )
    ledger.record_alias_moves(moves, db_url=params.db_url)
    return tuple(moves)


def canary_summary(
    plan: CanaryPlan, state: RolloutState, reports: list[StageReport], outcome: CanaryOutcome
) -> str:
    """Markdown for the Prefect UI: the verdict of every stage and what happened to the aliases."""
    lines = [
        f"# Canary of {plan.model_name} v{plan.candidate_version} against v{plan.baseline_version}: "
        f"**{outcome.value}**",
        "",
        f"Rollout {state.rollout_id}{' (resumed)' if state.resumed else ''}; hold-out of calibration set "
        f"`{plan.corpus_digest[:16]}` ({plan.holdout_size} prompts); stages {list(plan.stages)} %.",
        "",
        "| stage | traffic | requests | outcome | decision | score | failed metrics |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.stage_index} | {r.traffic_percent:g} % | {r.requests} | {r.outcome.value} | {r.decision.value} "
            f"| {r.score:.1f} | {', '.join(r.failed_metrics) or '-'} |"
        )
    if reports:
        reported_only = [
            name for name, m in reports[-1].metrics.items() if m.get("enforced") is False
        ]
        if reported_only:
            lines += [
                "",
                f"Reported, not enforced: {', '.join(reported_only)} (the in-process replay runs an "
                "emulated NVFP4 candidate on the CPU; latency is enforced with real serving endpoints).",
            ]
        lines += ["", "Last stage, per metric (baseline → candidate):", ""]
        for name, m in reports[-1].metrics.items():
            base, cand = m["baseline"], m["candidate"]
            fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
            lines.append(f"* `{name}`: {fmt(base)} → {fmt(cand)} ({m['verdict']}) {m['reason']}")
    return "\n".join(lines)
