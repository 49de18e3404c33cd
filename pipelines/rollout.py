"""Plain steps of the canary, promote and rollback flows (each Prefect task calls one of these).

The rollout ledger (``registry.ledger``) is the source of truth for where a rollout stands; MLflow
aliases say what serves. Every step reads both, acts, and records what it did, so a flow that dies
anywhere can be rerun: :func:`open_rollout` resumes (or aborts) what the crash left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from calibration.evaluate import InProcessEvaluator, load_replay
from calibration.sampling import Role
from pipelines.canary import run_replay_stage
from pipelines.canary.endpoints import CanaryRequest, Endpoint, EndpointEvaluator
from pipelines.canary.live import LedgerWeightJournal, reconcile_weight, run_live_canary
from pipelines.canary.nginx import NginxGateway
from pipelines.canary.router import NginxRouter, ReplayOnlyRouter, TrafficRouter
from pipelines.params import (
    CanaryParams,
    LiveCanaryParams,
    PromoteParams,
    RollbackParams,
    RouterKind,
    canary_policy,
)
from pipelines.prompt_logs import calibration_prompts, calibration_prompts_with_routes
from pipelines.results import CanaryOutcome, StageReport
from registry import db, ledger, rollout_actions
from registry import tags as tag
from registry.aliases import Alias, AliasMove
from registry.db import fp4roll_home
from registry.guards import (
    ManualActionRefused,
    forced_reason,
    promote_refusal,
    rollback_refusal,
)
from registry.integrity import verify_folder
from registry.judge import Decision
from registry.judge import StageVerdict as JudgeVerdict
from registry.mlflow_registry import (
    RegistryError,
    aliases,
)
from registry.policy import GatePolicy, GatePolicyOverrides
from registry.versions import local_checkpoint, resolve_version

logger = logging.getLogger(__name__)


class CanaryPlan(BaseModel):
    """What a canary compares, resolved once at the start of the flow."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    candidate_version: str
    baseline_version: str
    candidate_dir: str
    baseline_dir: str
    candidate_manifest: str  # sha256 of the registered checkpoint manifest, rechecked every stage
    baseline_manifest: str
    corpus_digest: str  # the candidate's calibration set; its hold-out is the canary window
    holdout_size: int
    stages: tuple[float, ...]
    min_samples: int
    max_seq_len: int
    seed: int
    gate_policy: GatePolicyOverrides | None
    db_url: str | None
    tracking_uri: str | None
    live: LiveCanaryParams | None = None  # None: the in-process replay of the two checkpoints


class RolloutState(BaseModel):
    model_config = ConfigDict(frozen=True)

    rollout_id: int
    stage_index: int
    resumed: bool
    owner: str = ""  # the flow run driving the rollout (its heartbeat lease)
    promotion_pending: bool = False  # every stage passed before a crash: promote next
    rejection_pending: bool = False  # a stage decided rollback before a crash: reject next


#: Heartbeat lease of a rollout's owner; renewed every third of it while the flow runs.
DEFAULT_LEASE_SECONDS = 300.0
_PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_seconds() -> float:
    """``$FP4ROLL_LEASE_SECONDS`` or :data:`DEFAULT_LEASE_SECONDS`."""
    return float(os.environ.get("FP4ROLL_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS)


def current_owner() -> str:
    """Who drives a rollout: the Prefect flow run (a retry of the same run keeps it), else this
    process (``$FP4ROLL_ROLLOUT_OWNER`` overrides, for tests and external drivers)."""
    explicit = os.environ.get("FP4ROLL_ROLLOUT_OWNER")
    if explicit:
        return explicit
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:  # noqa: BLE001 - no Prefect context: the process is the owner
        run_id = None
    return f"flow-run:{run_id}" if run_id else f"process:{_PROCESS_OWNER}"


def gate_policy_hash(plan: CanaryPlan) -> str:
    """sha256 of the gate policy the plan's rollout is judged by (pinned at creation)."""
    policy = dataclasses.asdict(gate_policy(plan))
    return hashlib.sha256(json.dumps(policy, sort_keys=True, default=str).encode()).hexdigest()


def rollout_pins(plan: CanaryPlan) -> ledger.Pins:
    return ledger.Pins(
        candidate_version=plan.candidate_version,
        baseline_version=plan.baseline_version,
        stages=tuple(plan.stages),
        gate_policy_hash=gate_policy_hash(plan),
    )


@contextlib.contextmanager
def lease_heartbeat(plan: CanaryPlan, state: RolloutState) -> Iterator[None]:
    """Renew ``state.owner``'s lease every third of it until the block ends. A lost lease (another
    run took over after it expired) is logged; the next ledger write of this run then refuses."""
    ttl = lease_seconds()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl / 3):
            try:
                ledger.heartbeat(state.rollout_id, state.owner, ttl, db_url=plan.db_url)
            except ledger.LostOwnershipError as exc:
                logger.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a blip: the next beat retries
                logger.warning("heartbeat of rollout %d failed: %s", state.rollout_id, exc)

    thread = threading.Thread(target=beat, name=f"rollout-{state.rollout_id}-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def gate_policy(plan: CanaryPlan) -> GatePolicy:
    """The judge's policy of a canary plan (:func:`pipelines.params.canary_policy`: replay or live
    endpoints)."""
    return canary_policy(plan.stages, plan.min_samples, plan.gate_policy, live=plan.live)


def plan_canary(params: CanaryParams) -> CanaryPlan:
    """Resolve candidate (default ``challenger``) and baseline (default ``champion``) to local folders."""

    name = params.model_name
    db.upgrade(params.db_url)
    rollout_actions.reconcile(name, db_url=params.db_url, tracking_uri=params.tracking_uri)
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
    # bytes first: a checkpoint changed since registration is refused before anything else
    candidate_dir = local_checkpoint(candidate, tracking_uri=params.tracking_uri)
    baseline_dir = local_checkpoint(baseline, tracking_uri=params.tracking_uri)
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
        candidate_dir=str(candidate_dir),
        baseline_dir=str(baseline_dir),
        candidate_manifest=str(candidate.manifest_digest),
        baseline_manifest=str(baseline.manifest_digest),
        corpus_digest=candidate.corpus_digest,
        holdout_size=len(holdout),
        stages=tuple(params.stages),
        min_samples=params.min_samples,
        max_seq_len=params.max_seq_len,
        seed=params.seed,
        gate_policy=params.gate_policy,
        db_url=params.db_url,
        tracking_uri=params.tracking_uri,
        live=params.live,
    )
    gate_policy(plan)  # validate the overrides before anything is started
    return plan


def open_rollout(plan: CanaryPlan, owner: str | None = None) -> RolloutState:
    """Reconcile ledger and aliases, then resume the active rollout (refused while another run's
    lease lives, or when its pinned stages / gate policy / baseline differ from the plan's) or
    start a new one owned by this run (:func:`registry.rollout_actions.open_rollout`)."""
    db.ensure_schema(plan.db_url)
    owner = owner or current_owner()
    opened = rollout_actions.open_rollout(
        rollout_pins(plan),
        plan.model_name,
        owner=owner,
        lease_seconds=lease_seconds(),
        reason=f"canary of v{plan.candidate_version} against v{plan.baseline_version}",
        db_url=plan.db_url,
        tracking_uri=plan.tracking_uri,
    )
    if opened.resumed:
        logger.info("resuming rollout %d at stage %d", opened.rollout.id, opened.stage_index)
    return RolloutState(
        rollout_id=opened.rollout.id,
        stage_index=opened.stage_index,
        resumed=opened.resumed,
        owner=owner,
        promotion_pending=opened.promotion_pending,
        rejection_pending=opened.rejection_pending,
    )


def verify_plan_checkpoints(plan: CanaryPlan) -> None:
    """Rehash both checkpoints against their registered manifests before they are loaded
    (:class:`registry.integrity.IntegrityError` when a file changed since registration)."""
    for version, folder, digest in (
        (plan.candidate_version, plan.candidate_dir, plan.candidate_manifest),
        (plan.baseline_version, plan.baseline_dir, plan.baseline_manifest),
    ):
        verify_folder(folder, digest, label=f"{plan.model_name} v{version}")


def verified_version(model_name: str, version_or_alias: str, *, tracking_uri: str | None):
    """Resolve a version and verify its checkpoint bytes against its registered manifest."""
    info = resolve_version(model_name, version_or_alias, tracking_uri=tracking_uri)
    local_checkpoint(info, tracking_uri=tracking_uri)
    return info


def run_stage(
    plan: CanaryPlan, rollout_id: int, stage_index: int, owner: str | None = None
) -> StageReport:
    """Run stage ``stage_index``: replay its share of the hold-out through both models in process,
    or, with ``plan.live``, :func:`run_live_stage`; judge it, record the verdict and the decision in
    the ledger, and advance the rollout when the decision says so."""
    if plan.live is not None:
        return run_live_stage(plan, rollout_id, stage_index, owner)
    policy = gate_policy(plan)
    verify_plan_checkpoints(plan)
    holdout = calibration_prompts(plan.corpus_digest, plan.db_url, Role.HOLDOUT)
    evaluator = InProcessEvaluator(
        baseline=plan.baseline_dir,
        candidate=plan.candidate_dir,
        max_len=plan.max_seq_len,
        seed=plan.seed,
    )
    replay_path = rollout_work_dir(rollout_id) / f"stage-{stage_index}.json"
    stage = run_replay_stage(
        evaluator,
        holdout,
        stage_index=stage_index,
        policy=policy,
        seed=plan.seed,
        replay_path=replay_path,
    )
    decision = rollout_actions.record_stage(
        rollout_id, stage.verdict, policy, owner=owner, db_url=plan.db_url
    )
    return stage_report(
        rollout_id, stage.verdict, decision, len(stage.request_indices), stage.replay_path
    )


def rollout_work_dir(rollout_id: int) -> Path:
    """Where a rollout's per-stage request records are written."""
    return fp4roll_home() / "work" / "rollouts" / str(rollout_id)


def stage_report(
    rollout_id: int,
    verdict: JudgeVerdict,
    decision: Decision,
    requests: int,
    replay_path: str | os.PathLike | None,
) -> StageReport:
    """A judged and recorded stage as the flow, its artifacts and the CLI show it."""
    return StageReport(
        rollout_id=rollout_id,
        stage_index=verdict.stage_index,
        traffic_percent=verdict.traffic_percent,
        requests=requests,
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
        replay_path=str(replay_path),
    )


# ------------------------------------------------------------------------- live endpoints


def _router_name(live: LiveCanaryParams) -> str:
    return NginxRouter.name if live.router is RouterKind.NGINX else ReplayOnlyRouter.name


def weight_journal(plan: CanaryPlan, rollout_id: int) -> LedgerWeightJournal:
    """The gateway-weight journal of ``rollout_id`` in the ledger."""
    assert plan.live is not None
    return LedgerWeightJournal(rollout_id, _router_name(plan.live), plan.db_url)


def gateway_weights(rollout_id: int, db_url: str | None = None) -> dict[int, tuple[float, ...]]:
    """Per stage of ``rollout_id``, the weights the gateway reported back after each change
    (journaled ``applied``), in order: a stage that rolled back shows its weight, then 0."""
    weights: dict[int, list[float]] = {}
    for row in ledger.traffic_weights(rollout_id, db_url=db_url):
        if row.phase is ledger.WeightPhase.APPLIED and row.stage is not None:
            weights.setdefault(row.stage, []).append(row.candidate_percent)
    return {stage: tuple(values) for stage, values in weights.items()}


def traffic_router(live: LiveCanaryParams, expected: float | None = None) -> TrafficRouter:
    """The router ``live`` names: the running nginx gateway in ``nginx_dir`` (attached, reloaded
    per stage, never stopped here), or the replay-only router holding ``expected`` (the weight the
    ledger says is in force)."""
    if live.router is RouterKind.NGINX:
        return NginxRouter(NginxGateway.attach(str(live.nginx_dir)))
    return ReplayOnlyRouter(expected or 0.0)


def reconcile_gateway(plan: CanaryPlan, rollout_id: int) -> float | None:
    """Make the gateway carry what the ledger says (:func:`pipelines.canary.live.reconcile_weight`):
    on entry of a live canary, and after its flow stopped. A rollout that journaled nothing yet
    answers for what the model's previous rollout left at the gateway (0 unless it was promoted:
    a crashed, aborted or rolled-back candidate gets no traffic). Returns the weight in force
    (None: nothing journaled, nothing to fix)."""
    journal = weight_journal(plan, rollout_id)
    if journal.expected() is None:
        earlier = [
            r
            for r in ledger.rollouts(plan.model_name, db_url=plan.db_url)
            if r.id != rollout_id and ledger.last_weight(r.id, db_url=plan.db_url) is not None
        ]
        if earlier and earlier[-1].status.value != "promoted":
            journal = weight_journal(plan, earlier[-1].id)
    return reconcile_weight(traffic_router(plan.live, journal.expected()), journal)


def live_holdout(plan: CanaryPlan) -> list[CanaryRequest]:
    """The hold-out of the candidate's calibration set as the servers see it (the stored rendered
    text), with each request's route."""
    return [
        CanaryRequest(prompt.text, route=route)
        for prompt, route in calibration_prompts_with_routes(
            plan.corpus_digest, plan.db_url, Role.HOLDOUT
        )
    ]


def live_evaluator(live: LiveCanaryParams) -> EndpointEvaluator:
    """The endpoint evaluator of ``live`` (API keys read from the named environment variables when
    a request is sent, never stored)."""
    return EndpointEvaluator(
        baseline=Endpoint(
            live.baseline_url,
            live.baseline_model,
            flavor=live.flavor,
            api_key_env=live.baseline_api_key_env,
        ),
        candidate=Endpoint(
            live.candidate_url,
            live.candidate_model,
            flavor=live.flavor,
            api_key_env=live.candidate_api_key_env,
        ),
        settings=live.client_settings(),
    )


def run_live_stage(
    plan: CanaryPlan, rollout_id: int, stage_index: int, owner: str | None = None
) -> StageReport:
    """One stage against the live endpoints (:func:`pipelines.canary.live.run_live_canary` with
    ``max_stages=1``): the weight journaled in the ledger and set at the gateway (read back), the
    stage's share of the hold-out mirrored to both endpoints, judged per pool and per route; a
    rollback puts the weight to 0 before the verdict is recorded (:func:`record_stage`, the same
    ledger write as the replay)."""
    live = plan.live
    assert live is not None
    policy = gate_policy(plan)
    progress = ledger.progress(rollout_id, db_url=plan.db_url)
    if progress.stage_index != stage_index:
        raise ledger.LedgerError(
            f"rollout {rollout_id} stands at stage {progress.stage_index}, not {stage_index}"
        )
    holdout = live_holdout(plan)
    journal = weight_journal(plan, rollout_id)
    work = rollout_work_dir(rollout_id)
    previous = None
    if live.reuse_records and stage_index > 0:
        earlier = work / f"live-stage-{stage_index - 1}.json"
        previous = load_replay(earlier) if earlier.exists() else None
    decisions: list[Decision] = []

    def record(stage) -> None:
        decisions.append(
            rollout_actions.record_stage(
                rollout_id, stage.verdict, policy, owner=owner, db_url=plan.db_url
            )
        )

    result = run_live_canary(
        live_evaluator(live),
        traffic_router(live, journal.expected()),
        holdout,
        policy=policy,
        routes=[request.route for request in holdout],
        seed=plan.seed,
        progress=progress,
        journal=journal,
        replay_dir=work,
        route_min_samples=live.route_min_samples,
        on_stage=record,
        reuse_records=live.reuse_records,
        previous=previous,
        max_stages=1,
    )
    stage = result.stages[0]
    if decisions[0] is not stage.decision:  # same verdict, same progress: cannot differ
        raise ledger.LedgerError(
            f"stage {stage_index}: the ledger decided {decisions[0].value}, the stage driver "
            f"{stage.decision.value}"
        )
    return stage_report(
        rollout_id, stage.verdict, decisions[0], len(stage.request_indices), stage.replay_path
    )


def promote_candidate(
    plan: CanaryPlan, rollout_id: int, reason: str = "every canary stage passed"
) -> str:
    """Move ``champion`` to the candidate (old champion → ``previous-champion``) and mark the
    rollout promoted, crash-consistently (:mod:`registry.rollout_actions`)."""
    verified_version(plan.model_name, plan.candidate_version, tracking_uri=plan.tracking_uri)
    rollout_actions.promote_version(
        plan.model_name,
        plan.candidate_version,
        reason,
        rollout_id=rollout_id,
        db_url=plan.db_url,
        tracking_uri=plan.tracking_uri,
    )
    return plan.candidate_version


def reject_candidate(plan: CanaryPlan, rollout_id: int, reason: str) -> str:
    """A failed canary: traffic stays on the champion, the challenger is tagged rejected, the
    rollout rolled back (crash-consistently)."""
    rollout_actions.reject_version(
        plan.model_name,
        plan.candidate_version,
        reason,
        rollout_id=rollout_id,
        db_url=plan.db_url,
        tracking_uri=plan.tracking_uri,
    )
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
    """Manual promotion (default: the challenger) behind the gates of :mod:`registry.guards`
    (``force`` overrides them, never the integrity check), recorded in the ledger. Promoting the
    candidate of a rollout whose every stage passed completes that rollout."""
    db.ensure_schema(params.db_url)
    name = params.model_name
    rollout_actions.reconcile(name, db_url=params.db_url, tracking_uri=params.tracking_uri)
    info = verified_version(name, params.version or "challenger", tracking_uri=params.tracking_uri)
    version = info.version
    current = aliases(name, tracking_uri=params.tracking_uri)
    if current.get(Alias.CHAMPION.value) == version:
        return ()  # already serving: nothing to gate, nothing to move
    history = ledger.rollouts(name, db_url=params.db_url)
    refusal = promote_refusal(
        version,
        info.tags.get(tag.OUTCOME),
        history,
        ledger.rollouts_passing_every_stage(name, db_url=params.db_url),
    )
    if refusal and not params.force:
        raise ManualActionRefused(
            f"promotion of {name} v{version} refused: {refusal}. "
            "Rerun with --force --reason '…' to override (recorded in the ledger)."
        )
    reason = forced_reason(refusal, params.reason or "manual promotion")
    active = next((r for r in history if r.active), None)
    if active is not None and active.candidate_version != version:
        ledger.mark_aborted(
            active.id,
            f"superseded by a manual promotion of v{version}: {reason}",
            db_url=params.db_url,
        )
        active = None
    return rollout_actions.promote_version(
        name,
        version,
        reason,
        rollout_id=active.id if active is not None else None,
        db_url=params.db_url,
        tracking_uri=params.tracking_uri,
    )


def rollback_version(params: RollbackParams) -> tuple[AliasMove, ...]:
    """Put ``to_version`` (default: ``previous-champion``) back as champion behind
    :func:`registry.guards.rollback_refusal` (``force`` overrides), recorded in the ledger."""
    db.ensure_schema(params.db_url)
    name = params.model_name
    rollout_actions.reconcile(name, db_url=params.db_url, tracking_uri=params.tracking_uri)
    target = params.to_version
    if target is None:
        target = aliases(name, tracking_uri=params.tracking_uri).get(Alias.PREVIOUS_CHAMPION.value)
    reason = params.reason
    if target is not None:
        info = resolve_version(name, target, tracking_uri=params.tracking_uri)
        champion = aliases(name, tracking_uri=params.tracking_uri).get(Alias.CHAMPION.value)
        if info.version != champion:
            refusal = rollback_refusal(info.version, info.tags.get(tag.OUTCOME))
            if refusal and not params.force:
                raise ManualActionRefused(
                    f"rollback of {name} to v{info.version} refused: {refusal}. "
                    "Rerun with --force to override (recorded in the ledger)."
                )
            reason = forced_reason(refusal, reason)
            if info.manifest_digest:  # wrong bytes never serve; a legacy version is let through
                local_checkpoint(info, tracking_uri=params.tracking_uri)
    return rollout_actions.rollback_to(
        name, params.to_version, reason, db_url=params.db_url, tracking_uri=params.tracking_uri
    )


def live_lines(plan: CanaryPlan) -> list[str]:
    """What a live canary ran against (no keys: only the names of their variables)."""
    live = plan.live
    if live is None:
        return []
    return [
        "",
        f"Live endpoints ({live.flavor.value}): baseline {live.baseline_url} "
        f"(`{live.baseline_model}`), candidate {live.candidate_url} (`{live.candidate_model}`); "
        f"router `{live.router.value}`; latency enforced.",
    ]


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
        *live_lines(plan),
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
