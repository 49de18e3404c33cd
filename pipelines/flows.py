"""Prefect flows: recalibrate, canary, promote, rollback, drift-check.

Flows are thin: every task calls one plain function of ``pipelines.steps`` / ``pipelines.rollout`` and
passes paths, digests and small records, never tensors. Expensive tasks cache on their inputs and their
source with persisted (JSON) results, so rerunning a flow after a crash resumes instead of recomputing;
I/O tasks retry. Each flow takes one pydantic parameter model, which the Prefect UI renders as a form.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.futures import as_completed
from prefect.input import RunInput
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from calibration.config import CalibrationConfig
from pipelines import rollout as rollout_steps
from pipelines import steps
from pipelines.params import (
    CanaryParams,
    DriftCheckParams,
    PromoteParams,
    RecalibrateParams,
    RollbackParams,
)
from pipelines.results import (
    CanaryOutcome,
    CanaryRecord,
    DriftRecord,
    RecalibrationRecord,
    StageReport,
)
from pipelines.rollout import CanaryPlan, RolloutState
from registry.aliases import AliasMove
from registry.guards import ManualActionRefused
from registry.integrity import IntegrityError
from registry.judge import Decision
from registry.ledger import LedgerError, LostOwnershipError, RolloutOwnedError
from registry.mlflow_registry import RegistryError
from registry.url_redaction import install_log_redaction, redact_strings, redact_urls

logger = logging.getLogger(__name__)
install_log_redaction()  # every record a flow's process makes, whatever handler shows it

#: Part of every cache key: the identity of $FP4ROLL_HOME (a wiped home must not reuse old results).
_HOME = CacheKeyFnPolicy(cache_key_fn=lambda _context, _inputs: steps.home_instance_id())
#: Expensive, deterministic steps: cached on inputs + task source + home, results persisted as JSON.
_CACHED = {
    "cache_policy": INPUTS + TASK_SOURCE + _HOME,
    "persist_result": True,
    "result_serializer": "json",
    "cache_expiration": dt.timedelta(days=30),
}
#: Errors that a retry cannot fix (a gate refused, bytes differ, the ledger said no): never retried.
_DEFINITIVE = (ManualActionRefused, IntegrityError, LedgerError, RegistryError, ValueError)


def _retry_unless_definitive(_task, _task_run, state) -> bool:
    try:
        state.result()
    except _DEFINITIVE:
        return False
    except BaseException:  # noqa: BLE001 - anything else (a lock, the network) may pass on retry
        return True
    return True


def _redact_errors(fn):
    """``fn`` whose exceptions carry their text through the one URL redactor: Prefect persists a
    failed task's exception (message included) in its result storage and shows it in the UI."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            redacted = tuple(redact_urls(a) if isinstance(a, str) else a for a in exc.args)
            if redacted == exc.args:
                raise
            clean = copy.copy(exc)
            clean.args = redacted
            raise clean from None

    return wrapper


#: Steps that talk to a database, MLflow or a file store: retried (not after a definitive refusal),
#: never cached.
_IO = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": _retry_unless_definitive,
}


def _markdown_artifact(*, key: str, markdown: str, description: str | None = None) -> None:
    """A Prefect markdown artifact, its text through the one URL redactor."""
    create_markdown_artifact(
        key=key,
        markdown=redact_urls(markdown),
        description=None if description is None else redact_urls(description),
    )


def _table_artifact(*, key: str, table: list[dict[str, Any]], description: str) -> None:
    """A Prefect table artifact, every string cell through the one URL redactor."""
    create_table_artifact(
        key=key,
        table=redact_strings(table),
        description=redact_urls(description),
    )


class SimulatedCrash(RuntimeError):
    """Raised by ``CanaryParams.fail_after_stage`` to prove crash safety (testing aid)."""


# ------------------------------------------------------------------------------- recalibrate tasks
# Each task IS its step function (one task → one plain function): the name, caching and retries are
# decided here, the code lives in pipelines/steps.py and pipelines/rollout.py.


resolve_source_model_task = task(name="resolve-source-model", **_IO)(
    _redact_errors(steps.resolve_source_model)
)
sample_calibration_set_task = task(name="sample-calibration-set", **_IO)(
    _redact_errors(steps.sample_calibration_set)
)
register_baseline_task = task(name="register-baseline", **_IO)(
    _redact_errors(steps.register_baseline)
)
calibration_pass_task = task(name="calibration-pass", **_CACHED)(steps.calibration_pass)
tier_scores_task = task(name="tier-scores", **_CACHED)(steps.tier_scores)
kl_sweep_part_task = task(name="kl-sweep-part", **_CACHED)(steps.kl_sweep_part)
plan_and_export_task = task(name="plan-and-export", **_CACHED)(steps.plan_and_export)
register_challenger_task = task(name="register-challenger", **_IO)(
    _redact_errors(steps.register_challenger)
)


@flow(name="kl-sweep", log_prints=False)
def kl_sweep_flow(
    source_dir: str,
    corpus_digest: str,
    db_url: str | None,
    stats_path: str,
    rounded_path: str,
    partitions: list[list[str]],
    config: CalibrationConfig,
    work_dir: str,
) -> list[str]:
    """Exact KL of the groups near the runbook floor, each partition in its own task (thread pool
    here, Dask when configured)."""
    futures = [
        kl_sweep_part_task.submit(
            source_dir, corpus_digest, db_url, stats_path, rounded_path, groups, i, config, work_dir
        )
        for i, groups in enumerate(partitions)
    ]
    progress_id = create_progress_artifact(
        progress=0.0,
        description=f"exact KL: {sum(map(len, partitions))} groups in {len(partitions)} tasks",
    )
    for done, _ in enumerate(as_completed(futures), start=1):
        update_progress_artifact(progress_id, progress=100.0 * done / len(futures))
    return [future.result() for future in futures]


def _sweep_runner(params: RecalibrateParams) -> TaskRunner:
    """Dask when a scheduler is given; else a thread pool with one task per GPU (on a CPU-only host
    torch already spreads one task over every core, so concurrent tasks would only contend)."""
    if params.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.dask_address)
    import torch

    devices = torch.cuda.device_count() or 1
    return ThreadPoolTaskRunner(max_workers=max(1, min(params.sweep_tasks, devices)))


@flow(name="recalibrate", log_prints=False)
def recalibrate_flow(params: RecalibrateParams = RecalibrateParams()) -> RecalibrationRecord:  # noqa: B008
    """Sample logs → calibration pass (rounding + input statistics) → tier scores → exact checks near the floor →
    measured tier plan → pack → register challenger."""
    config, db_url = params.calibration, params.db_url
    source_dir = resolve_source_model_task(params.source_model)
    calibration_set = sample_calibration_set_task(params, source_dir)
    digest = calibration_set.digest
    register_baseline_task(
        params.model_name, source_dir, tracking_uri=params.tracking_uri, db_url=db_url
    )
    work_dir = steps.calibration_work_dir(params, digest, source_dir)
    stats_path, rounded_path = calibration_pass_task(source_dir, digest, db_url, config, work_dir)
    scores_path = tier_scores_task(
        source_dir, digest, db_url, stats_path, rounded_path, config, work_dir
    )
    partitions = steps.sweep_partitions(
        steps.exact_candidates(scores_path, config), params.sweep_tasks
    )
    part_paths = kl_sweep_flow.with_options(task_runner=_sweep_runner(params))(
        source_dir, digest, db_url, stats_path, rounded_path, partitions, config, work_dir
    )
    checkpoint = plan_and_export_task(
        source_dir,
        digest,
        db_url,
        stats_path,
        rounded_path,
        scores_path,
        part_paths,
        config,
        work_dir,
    )
    registration = register_challenger_task(params, calibration_set, checkpoint)

    record = json.loads(Path(checkpoint.calibration_json).read_text())
    _table_artifact(
        key="per-group-plan",
        table=[{k: v for k, v in g.items() if k != "members"} for g in record["groups"]],
        description=f"Per-group tiers of {params.model_name}, corpus {calibration_set.digest[:12]}",
    )
    summary = steps.recalibration_summary(params, calibration_set, checkpoint, registration)
    _markdown_artifact(
        key="recalibration-summary", markdown=summary, description="fp4roll recalibration"
    )
    return RecalibrationRecord(
        model_name=params.model_name,
        version=registration.version,
        run_id=registration.run_id,
        run_url=registration.run_url,
        corpus_digest=calibration_set.digest,
        checkpoint_dir=str(checkpoint.checkpoint_dir),
        upgraded_groups=tuple(checkpoint.upgraded_groups),
        tiers=dict(checkpoint.tiers),
        extra_bytes_fraction=checkpoint.extra_bytes_fraction,
        plan_mean_kl=checkpoint.plan_mean_kl,
        all_quantized_mean_kl=checkpoint.all_quantized_mean_kl,
    )


# ------------------------------------------------------------------------------------ canary tasks


class Approval(RunInput):
    """What a reviewer answers before the last canary stage."""

    approve: bool = False
    note: str = ""


plan_canary_task = task(name="plan-canary", **_IO)(_redact_errors(rollout_steps.plan_canary))
open_rollout_task = task(name="open-rollout", **_IO)(_redact_errors(rollout_steps.open_rollout))
reconcile_gateway_task = task(name="reconcile-gateway", **_IO)(
    _redact_errors(rollout_steps.reconcile_gateway)
)
canary_stage_task = task(
    name="canary-stage", cache_policy=NO_CACHE, persist_result=True, result_serializer="json"
)(_redact_errors(rollout_steps.run_stage))


promote_candidate_task = task(name="promote-candidate", **_IO)(
    _redact_errors(rollout_steps.promote_candidate)
)
reject_candidate_task = task(name="reject-candidate", **_IO)(
    _redact_errors(rollout_steps.reject_candidate)
)
hold_rollout_task = task(name="hold-rollout", **_IO)(_redact_errors(rollout_steps.hold_rollout))


def _drive_stages(
    params: CanaryParams, plan: CanaryPlan, state: RolloutState, reports: list[StageReport]
) -> CanaryOutcome:
    """Run stages from ``state.stage_index`` until a decision other than advance; act on it."""
    outcome = CanaryOutcome.HELD
    if state.promotion_pending:  # every stage passed before a crash: only the promotion is left
        promote_candidate_task(plan, state.rollout_id)
        return CanaryOutcome.PROMOTED
    if state.rejection_pending:  # a stage failed before a crash: only the rejection is left
        reject_candidate_task(
            plan, state.rollout_id, f"stage {state.stage_index} failed (completed after a crash)"
        )
        return CanaryOutcome.ROLLED_BACK
    stage_index = state.stage_index
    while True:
        if params.require_approval and stage_index == len(plan.stages) - 1:
            from prefect.flow_runs import pause_flow_run

            answer = pause_flow_run(wait_for_input=Approval, timeout=24 * 3600, poll_interval=2)
            if not answer.approve:
                rollout_steps.abort_rollout(
                    plan.db_url, state.rollout_id, f"not approved: {answer.note}"
                )
                outcome = CanaryOutcome.ABORTED
                return outcome
        report = canary_stage_task(plan, state.rollout_id, stage_index, state.owner)
        reports.append(report)
        if report.decision is Decision.ADVANCE:
            if params.fail_after_stage is not None and params.fail_after_stage == stage_index:
                raise SimulatedCrash(f"simulated crash after stage {stage_index}")
            stage_index += 1
            continue
        if report.decision is Decision.PROMOTE:
            if params.auto_promote:
                promote_candidate_task(plan, state.rollout_id)
                outcome = CanaryOutcome.PROMOTED
            else:
                hold_rollout_task(
                    plan, state.rollout_id, "every stage passed; awaiting manual promotion"
                )
                outcome = CanaryOutcome.AWAITING_PROMOTION
        elif report.decision is Decision.ROLLBACK:
            reject_candidate_task(
                plan, state.rollout_id, f"stage {stage_index} failed: {report.reason}"
            )
            outcome = CanaryOutcome.ROLLED_BACK
        else:
            hold_rollout_task(
                plan, state.rollout_id, f"stage {stage_index} inconclusive: {report.reason}"
            )
            outcome = CanaryOutcome.HELD
        return outcome


@flow(name="canary", log_prints=False)
def canary_flow(params: CanaryParams = CanaryParams()) -> CanaryRecord:  # noqa: B008
    """Staged canary (1 % → 10 % → 50 % → 100 % by default) of the challenger against the
    champion: replayed in process, or (``params.live``) against live endpoints with the candidate's
    weight set per stage at a gateway, reconciled with the ledger first. Pass every stage → promote; a Fail → automatic rollback (champion untouched, challenger
    rejected); not enough evidence → hold. A crash marks the rollout aborted; champion never moves."""
    plan = plan_canary_task(params)
    state = open_rollout_task(plan)
    reports: list[StageReport] = []
    outcome = CanaryOutcome.HELD
    try:
        with rollout_steps.lease_heartbeat(plan, state):
            if plan.live is not None:  # the gateway first carries what the ledger says
                reconcile_gateway_task(plan, state.rollout_id)
            outcome = _drive_stages(params, plan, state, reports)
    except (LostOwnershipError, RolloutOwnedError):
        raise  # another run owns the rollout now: never abort it from here
    except BaseException as exc:
        rollout_steps.abort_rollout(
            plan.db_url, state.rollout_id, f"canary flow stopped: {type(exc).__name__}: {exc}"
        )
        if plan.live is not None:  # an aborted candidate gets no traffic (a rerun also fixes it)
            try:
                rollout_steps.reconcile_gateway(plan, state.rollout_id)
            except Exception as gateway_exc:  # noqa: BLE001 - the original error matters more
                logger.error(
                    "could not put the gateway back after the abort: %s",
                    redact_urls(str(gateway_exc)),
                )
        raise
    _table_artifact(
        key="canary-stages",
        table=[
            {
                "stage": r.stage_index,
                "traffic_%": r.traffic_percent,
                "requests": r.requests,
                "outcome": r.outcome.value,
                "decision": r.decision.value,
                "score": round(r.score, 1),
                "failed": ", ".join(r.failed_metrics),
            }
            for r in reports
        ],
        description=f"Canary of {plan.model_name} v{plan.candidate_version} vs v{plan.baseline_version}",
    )
    _markdown_artifact(
        key="canary-summary", markdown=rollout_steps.canary_summary(plan, state, reports, outcome)
    )
    return CanaryRecord(
        model_name=plan.model_name,
        rollout_id=state.rollout_id,
        candidate_version=plan.candidate_version,
        baseline_version=plan.baseline_version,
        outcome=outcome,
        stages=tuple(reports),
    )


# ------------------------------------------------------------------------ promote / rollback / drift


promote_version_task = task(name="promote-version", **_IO)(
    _redact_errors(rollout_steps.promote_version)
)
rollback_version_task = task(name="rollback-version", **_IO)(
    _redact_errors(rollout_steps.rollback_version)
)


@flow(name="promote", log_prints=False)
def promote_flow(params: PromoteParams = PromoteParams()) -> tuple[AliasMove, ...]:  # noqa: B008
    """Make a version (default: the challenger) the champion; the old champion → previous-champion."""
    return promote_version_task(params)


@flow(name="rollback", log_prints=False)
def rollback_flow(params: RollbackParams) -> tuple[AliasMove, ...]:
    """Put a version (default: previous-champion) back as champion, with a reason for the ledger."""
    return rollback_version_task(params)


check_drift_task = task(name="check-drift", **_IO)(_redact_errors(steps.check_drift))


@flow(name="drift-check", log_prints=False)
def drift_check_flow(params: DriftCheckParams = DriftCheckParams()) -> DriftRecord:  # noqa: B008
    """Compare recent logs with the champion's calibration set; recalibrate when drift is confirmed."""
    verdict = check_drift_task(params)
    _markdown_artifact(key="drift-check", markdown=steps.drift_summary(verdict))
    if verdict.drifted and params.recalibrate_on_drift:
        recal = params.recalibrate.model_copy(
            update={
                "db_url": params.recalibrate.db_url or params.db_url,
                "tracking_uri": params.recalibrate.tracking_uri or params.tracking_uri,
            }
        )
        verdict = verdict.model_copy(update={"recalibration": recalibrate_flow(recal)})
    return verdict
