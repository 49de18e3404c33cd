"""Rollout ledger: the history of every canary, stage verdict and alias move, surviving crashes.

Functions over the SQLAlchemy schema in :mod:`registry.schema` (tables ``rollouts``,
``stage_results``, ``alias_moves``); each call is one transaction on the store at ``db_url``
(default: :func:`registry.db.default_db_url`), and returns frozen records, never ORM objects.

* At most one active (pending/running/paused) rollout per model is enforced by the database's
  partial unique index; :func:`start_rollout` just inserts and turns the ``IntegrityError`` into a
  :class:`RolloutConflictError`. There is deliberately no Python pre-check.
* Status changes follow :data:`ALLOWED_TRANSITIONS` and are applied with a conditional
  ``UPDATE … WHERE status IN (allowed sources)``, so two processes cannot both move one rollout;
  an illegal transition raises :class:`IllegalTransitionError`.
* ``promoted`` needs proof: :func:`mark_promoted` refuses unless a ``champion`` alias move to the
  candidate version is recorded for the rollout (passed in or already stored).
* :func:`resume_or_abort` handles a rollout left active by a crash: it is resumed at its current
  stage (completing an advance whose stage had already passed), marked promoted only when the
  caller reports the candidate as champion (the promote step did complete), or aborted.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry import db
from registry.aliases import Alias
from registry.aliases import AliasMove as AliasMoveRecord
from registry.judge import Decision, Outcome, RolloutProgress
from registry.judge import StageVerdict as JudgeVerdict
from registry.schema import (
    AliasIntent,
    AliasMove,
    Rollout,
    RolloutStatus,
    StageResult,
    StageVerdict,
    TrafficWeight,
)
from registry.url_redaction import redact_urls

logger = logging.getLogger(__name__)

ACTIVE = frozenset({RolloutStatus.pending, RolloutStatus.running, RolloutStatus.paused})
TERMINAL = frozenset(
    {RolloutStatus.promoted, RolloutStatus.rolled_back, RolloutStatus.aborted, RolloutStatus.failed}
)
#: status → statuses it may move to. Terminal statuses move nowhere.
ALLOWED_TRANSITIONS: Mapping[RolloutStatus, frozenset[RolloutStatus]] = {
    RolloutStatus.pending: frozenset(
        {RolloutStatus.running, RolloutStatus.aborted, RolloutStatus.failed}
    ),
    RolloutStatus.running: frozenset(
        {
            RolloutStatus.paused,
            RolloutStatus.promoted,
            RolloutStatus.rolled_back,
            RolloutStatus.aborted,
            RolloutStatus.failed,
        }
    ),
    RolloutStatus.paused: frozenset(
        {
            RolloutStatus.running,
            RolloutStatus.rolled_back,
            RolloutStatus.aborted,
            RolloutStatus.failed,
        }
    ),
    **{status: frozenset() for status in TERMINAL},
}

_OUTCOME_TO_VERDICT = {
    Outcome.PASS: StageVerdict.passed,
    Outcome.FAIL: StageVerdict.failed,
    Outcome.INCONCLUSIVE: StageVerdict.inconclusive,
}


class LedgerError(RuntimeError):
    """Base class of ledger errors."""


class RolloutConflictError(LedgerError):
    """The database refused a second active rollout for the same model."""

    def __init__(self, model_name: str, active_rollout_id: int | None) -> None:
        self.model_name = model_name
        self.active_rollout_id = active_rollout_id
        which = f" (rollout {active_rollout_id})" if active_rollout_id is not None else ""
        super().__init__(f"model {model_name!r} already has an active rollout{which}")


class IllegalTransitionError(LedgerError):
    """A status change not allowed by :data:`ALLOWED_TRANSITIONS`."""


class RolloutNotFoundError(LedgerError):
    pass


class RolloutOwnedError(LedgerError):
    """Another flow run owns the rollout and its heartbeat lease has not expired."""


class PinMismatchError(LedgerError):
    """A resume whose stages, gate policy or baseline differ from what the rollout pinned."""


class LostOwnershipError(LedgerError):
    """This run's lease expired and another run took the rollout over."""


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    model_name: str
    candidate_version: str
    baseline_version: str | None
    status: RolloutStatus
    stages: tuple[float, ...]
    current_stage: int
    reason: str | None
    calibration_set_id: int | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    gate_policy_hash: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def on_last_stage(self) -> bool:
        return self.current_stage >= len(self.stages) - 1


@dataclass(frozen=True)
class StageResultRecord:
    id: int
    rollout_id: int
    stage: int
    traffic_percent: float
    metric: str
    n_baseline: int
    n_candidate: int
    baseline_stat: float | None
    candidate_stat: float | None
    test_statistic: float | None
    p_value: float | None
    verdict: StageVerdict
    details: dict[str, Any]
    created_at: dt.datetime

    @property
    def analysis(self) -> int:
        return int(self.details.get("analysis", 0))

    @property
    def stage_outcome(self) -> Outcome:
        return Outcome(self.details["stage_outcome"])


@dataclass(frozen=True)
class AliasMoveRow:
    id: int
    model_name: str
    alias: str
    from_version: str | None
    to_version: str | None
    reason: str | None
    rollout_id: int | None
    created_at: dt.datetime


@dataclass(frozen=True)
class ResumePoint:
    """What :func:`resume_or_abort` decided for an active rollout found after a crash."""

    rollout: RolloutRecord
    resumed: bool  # False: aborted (or reconciled as promoted, see rollout.status)
    stage_index: int  # stage to (re-)analyse next
    progress: RolloutProgress
    promotion_pending: bool  # every stage passed; the promote step still has to run
    rejection_pending: bool = False  # the last analysis decided rollback; reject still has to run


def _rollout_record(row: Rollout) -> RolloutRecord:
    return RolloutRecord(
        id=row.id,
        model_name=row.model_name,
        candidate_version=row.candidate_version,
        baseline_version=row.baseline_version,
        status=RolloutStatus(row.status),
        stages=tuple(float(s) for s in row.stages),
        current_stage=row.current_stage,
        reason=row.reason,
        calibration_set_id=row.calibration_set_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        owner=row.owner,
        lease_expires_at=row.lease_expires_at,
        gate_policy_hash=row.gate_policy_hash,
    )


def _stage_record(row: StageResult) -> StageResultRecord:
    return StageResultRecord(
        id=row.id,
        rollout_id=row.rollout_id,
        stage=row.stage,
        traffic_percent=row.traffic_percent,
        metric=row.metric,
        n_baseline=row.n_baseline,
        n_candidate=row.n_candidate,
        baseline_stat=row.baseline_stat,
        candidate_stat=row.candidate_stat,
        test_statistic=row.test_statistic,
        p_value=row.p_value,
        verdict=StageVerdict(row.verdict),
        details=dict(row.details or {}),
        created_at=row.created_at,
    )


def _alias_record(row: AliasMove) -> AliasMoveRow:
    return AliasMoveRow(
        id=row.id,
        model_name=row.model_name,
        alias=row.alias,
        from_version=row.from_version,
        to_version=row.to_version,
        reason=row.reason,
        rollout_id=row.rollout_id,
        created_at=row.created_at,
    )


def _get(session: Session, rollout_id: int) -> Rollout:
    row = session.get(Rollout, rollout_id, populate_existing=True)
    if row is None:
        raise RolloutNotFoundError(f"no rollout {rollout_id}")
    return row


def _validate_stages(stages: Sequence[float]) -> list[float]:
    values = [float(s) for s in stages]
    if not values:
        raise ValueError("stages must not be empty")
    if any(not 0 < s <= 100 for s in values):
        raise ValueError(f"stages must be traffic percentages in (0, 100], got {values}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)) or values[-1] != 100:
        raise ValueError(f"stages must be strictly increasing and end at 100, got {values}")
    return values


# --------------------------------------------------------------------------------------------
# Lifecycle


def start_rollout(
    model_name: str,
    candidate_version: str,
    baseline_version: str | None,
    stages: Sequence[float] = (1.0, 10.0, 50.0, 100.0),
    *,
    calibration_set_id: int | None = None,
    reason: str | None = None,
    owner: str | None = None,
    lease_seconds: float | None = None,
    gate_policy_hash: str | None = None,
    db_url: str | None = None,
) -> RolloutRecord:
    """Insert a ``running`` rollout at stage 0, owned by ``owner`` for ``lease_seconds`` (renewed
    by :func:`heartbeat`), pinning its stages, baseline and ``gate_policy_hash``. The database refuses a second active rollout of
    the same model: that surfaces as :class:`RolloutConflictError` (naming the active one)."""
    if not model_name or not candidate_version:
        raise ValueError("model_name and candidate_version are required")
    if baseline_version is not None and str(baseline_version) == str(candidate_version):
        raise ValueError(f"candidate and baseline are the same version {candidate_version}")
    stage_list = _validate_stages(stages)
    try:
        with db.session_scope(db_url) as session:
            row = Rollout(
                model_name=model_name,
                candidate_version=str(candidate_version),
                baseline_version=None if baseline_version is None else str(baseline_version),
                status=RolloutStatus.running,
                stages=stage_list,
                current_stage=0,
                reason=None if reason is None else redact_urls(reason),
                calibration_set_id=calibration_set_id,
                owner=owner,
                lease_expires_at=(
                    None
                    if owner is None or lease_seconds is None
                    else db_now() + dt.timedelta(seconds=lease_seconds)
                ),
                gate_policy_hash=gate_policy_hash,
            )
            session.add(row)
            session.flush()
            record = _rollout_record(row)
    except IntegrityError as exc:
        if not _is_active_rollout_conflict(exc):
            raise  # some other constraint (e.g. a bad calibration_set_id)
        active = active_rollout(model_name, db_url=db_url)
        raise RolloutConflictError(model_name, active.id if active else None) from exc
    logger.info(
        "rollout %d started: %s v%s vs v%s, stages %s",
        record.id,
        model_name,
        candidate_version,
        baseline_version,
        stage_list,
    )
    return record


def _is_active_rollout_conflict(exc: IntegrityError) -> bool:
    """The partial unique index ``uq_rollouts_one_active_per_model`` refused the row.

    PostgreSQL names the index; SQLite reports the indexed column (the only unique key on
    ``rollouts`` besides the primary key)."""
    message = str(exc.orig)
    return (
        "uq_rollouts_one_active_per_model" in message
        or "UNIQUE constraint failed: rollouts.model_name" in message
    )


def _transition(
    session: Session,
    rollout_id: int,
    target: RolloutStatus,
    *,
    reason: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> Rollout:
    sources = [s for s, targets in ALLOWED_TRANSITIONS.items() if target in targets]
    now = db_now()
    update: dict[str, Any] = {"status": target, "updated_at": now, **(values or {})}
    if reason is not None:
        update["reason"] = redact_urls(reason)  # exception text may hold a URL with credentials
    if target in TERMINAL:
        update["finished_at"] = now
    result = session.execute(
        sa.update(Rollout)
        .where(Rollout.id == rollout_id, Rollout.status.in_(sources))
        .values(**update)
        .execution_options(synchronize_session=False)
    )
    row = _get(session, rollout_id)
    if result.rowcount != 1:
        raise IllegalTransitionError(
            f"rollout {rollout_id}: {RolloutStatus(row.status).value} -> {target.value} is not "
            f"allowed (allowed from {RolloutStatus(row.status).value}: "
            f"{sorted(s.value for s in ALLOWED_TRANSITIONS[RolloutStatus(row.status)]) or 'none'})"
        )
    logger.info("rollout %d -> %s%s", rollout_id, target.value, f" ({reason})" if reason else "")
    return row


def db_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def pause(rollout_id: int, reason: str, *, db_url: str | None = None) -> RolloutRecord:
    with db.session_scope(db_url) as session:
        return _rollout_record(
            _transition(session, rollout_id, RolloutStatus.paused, reason=reason)
        )


def resume(rollout_id: int, *, db_url: str | None = None) -> RolloutRecord:
    """paused (or pending) → running."""
    with db.session_scope(db_url) as session:
        return _rollout_record(_transition(session, rollout_id, RolloutStatus.running))


def _next_analysis(session: Session, rollout_id: int) -> int:
    rows = session.scalars(
        sa.select(StageResult.details).where(StageResult.rollout_id == rollout_id)
    ).all()
    return 1 + max((int((d or {}).get("analysis", 0)) for d in rows), default=0)


def record_stage_result(
    rollout_id: int,
    verdict: JudgeVerdict,
    decision: Decision | None = None,
    *,
    owner: str | None = None,
    db_url: str | None = None,
) -> list[StageResultRecord]:
    """Store one stage analysis (one row per metric, stage outcome/score/decision in ``details``).

    Preconditions: the rollout is active, ``verdict.stage_index`` is its current stage and, when
    ``owner`` is given, the rollout is still owned by it (:class:`LostOwnershipError` otherwise).
    """
    with db.session_scope(db_url) as session:
        row = _get(session, rollout_id)
        _require_owner(row, owner)
        status = RolloutStatus(row.status)
        if status not in ACTIVE:
            raise IllegalTransitionError(
                f"rollout {rollout_id} is {status.value}: no more stage results"
            )
        if verdict.stage_index != row.current_stage:
            raise LedgerError(
                f"rollout {rollout_id} is at stage {row.current_stage}, verdict is for stage "
                f"{verdict.stage_index}"
            )
        analysis = _next_analysis(session, rollout_id)
        stage_details = {
            "analysis": analysis,
            "stage_outcome": verdict.outcome.value,
            "stage_score": verdict.score,
            "stage_reason": verdict.reason,
            "critical_failure": verdict.critical_failure,
            "decision": decision.value if decision is not None else None,
        }
        rows = []
        for metric in verdict.metrics:
            result = StageResult(
                rollout_id=rollout_id,
                stage=verdict.stage_index,
                traffic_percent=verdict.traffic_percent,
                metric=metric.metric,
                n_baseline=metric.n_baseline,
                n_candidate=metric.n_candidate,
                baseline_stat=metric.baseline_statistic,
                candidate_stat=metric.candidate_statistic,
                test_statistic=metric.u_statistic,
                p_value=metric.p_value,
                verdict=_OUTCOME_TO_VERDICT[metric.verdict],
                details={
                    **stage_details,
                    "reason": metric.reason,
                    "effect": metric.effect,
                    "critical": metric.critical,
                    "enforced": metric.enforced,
                    "direction": metric.direction.value,
                    "comparison": metric.comparison.value,
                    "statistic": metric.statistic.value,
                },
            )
            session.add(result)
            rows.append(result)
        row.updated_at = db_now()
        session.flush()
        return [_stage_record(r) for r in rows]


def _last_analysis_outcome(session: Session, rollout_id: int, stage: int) -> Outcome | None:
    rows = session.scalars(
        sa.select(StageResult)
        .where(StageResult.rollout_id == rollout_id, StageResult.stage == stage)
        .order_by(StageResult.id.desc())
        .limit(1)
    ).all()
    return Outcome(rows[0].details["stage_outcome"]) if rows else None


def _require_owner(row: Rollout, owner: str | None) -> None:
    if owner is not None and row.owner is not None and row.owner != owner:
        raise LostOwnershipError(
            f"rollout {row.id} is now owned by {row.owner!r}, not {owner!r}: this run's lease "
            "expired and another run took it over"
        )


def advance(
    rollout_id: int, *, owner: str | None = None, db_url: str | None = None
) -> RolloutRecord:
    """Move a running rollout to its next stage. Precondition: the latest analysis of the current
    stage passed and it is not the last stage (the last stage ends in :func:`mark_promoted`)."""
    with db.session_scope(db_url) as session:
        row = _get(session, rollout_id)
        _require_owner(row, owner)
        status = RolloutStatus(row.status)
        if status is not RolloutStatus.running:
            raise IllegalTransitionError(f"rollout {rollout_id} is {status.value}, not running")
        stage = row.current_stage
        if stage >= len(row.stages) - 1:
            raise LedgerError(f"rollout {rollout_id} is on its last stage: promote, do not advance")
        if _last_analysis_outcome(session, rollout_id, stage) is not Outcome.PASS:
            raise LedgerError(f"rollout {rollout_id}: stage {stage} has no passing analysis")
        result = session.execute(
            sa.update(Rollout)
            .where(
                Rollout.id == rollout_id,
                Rollout.current_stage == stage,
                Rollout.status == RolloutStatus.running,
            )
            .values(current_stage=stage + 1, updated_at=db_now())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise LedgerError(f"rollout {rollout_id} changed concurrently")
        return _rollout_record(_get(session, rollout_id))


def _add_alias_moves(
    session: Session, moves: Iterable[AliasMoveRecord], rollout_id: int | None
) -> list[AliasMove]:
    rows = []
    for move in moves:
        row = AliasMove(
            model_name=move.model_name,
            alias=Alias(move.alias).value,
            from_version=move.from_version,
            to_version=move.to_version,
            reason=redact_urls(move.reason),
            rollout_id=rollout_id,
            created_at=move.moved_at,
        )
        session.add(row)
        rows.append(row)
    session.flush()
    return rows


def record_alias_moves(
    moves: Iterable[AliasMoveRecord], *, rollout_id: int | None = None, db_url: str | None = None
) -> list[AliasMoveRow]:
    """Store alias moves returned by :mod:`registry.mlflow_registry` (manual ones: no rollout)."""
    with db.session_scope(db_url) as session:
        return [_alias_record(r) for r in _add_alias_moves(session, moves, rollout_id)]


def mark_promoted(
    rollout_id: int,
    alias_moves: Iterable[AliasMoveRecord] = (),
    *,
    reason: str = "all stages passed",
    db_url: str | None = None,
) -> RolloutRecord:
    """running → promoted, storing ``alias_moves`` in the same transaction.

    Refused unless a champion move to the candidate version is recorded for this rollout (in
    ``alias_moves`` or earlier): "promoted" means the promote step completed.
    """
    with db.session_scope(db_url) as session:
        row = _get(session, rollout_id)
        _add_alias_moves(session, alias_moves, rollout_id)
        proof = session.scalar(
            sa.select(sa.func.count())
            .select_from(AliasMove)
            .where(
                AliasMove.rollout_id == rollout_id,
                AliasMove.alias == Alias.CHAMPION.value,
                AliasMove.to_version == row.candidate_version,
            )
        )
        if not proof:
            raise LedgerError(
                f"rollout {rollout_id}: no champion move to version {row.candidate_version} "
                "recorded; refusing to mark it promoted"
            )
        return _rollout_record(
            _transition(session, rollout_id, RolloutStatus.promoted, reason=reason)
        )


def mark_rolled_back(
    rollout_id: int,
    reason: str,
    alias_moves: Iterable[AliasMoveRecord] = (),
    *,
    db_url: str | None = None,
) -> RolloutRecord:
    """→ rolled_back with ``reason`` (a Fail verdict; traffic back to the baseline)."""
    _require_reason(reason)
    with db.session_scope(db_url) as session:
        _add_alias_moves(session, alias_moves, rollout_id)
        return _rollout_record(
            _transition(session, rollout_id, RolloutStatus.rolled_back, reason=reason)
        )


def mark_aborted(rollout_id: int, reason: str, *, db_url: str | None = None) -> RolloutRecord:
    """→ aborted with ``reason`` (stopped without a verdict: operator, crash, undecidable)."""
    _require_reason(reason)
    with db.session_scope(db_url) as session:
        return _rollout_record(
            _transition(session, rollout_id, RolloutStatus.aborted, reason=reason)
        )


def _require_reason(reason: str) -> None:
    if not reason or not reason.strip():
        raise ValueError("a reason is required")


# --------------------------------------------------------------------------------------------
# Reading and crash recovery


def get_rollout(rollout_id: int, *, db_url: str | None = None) -> RolloutRecord:
    with db.session_scope(db_url) as session:
        return _rollout_record(_get(session, rollout_id))


def active_rollout(model_name: str, *, db_url: str | None = None) -> RolloutRecord | None:
    with db.session_scope(db_url) as session:
        row = session.scalars(
            sa.select(Rollout).where(
                Rollout.model_name == model_name, Rollout.status.in_(list(ACTIVE))
            )
        ).first()
        return _rollout_record(row) if row is not None else None


def rollouts(model_name: str, *, db_url: str | None = None) -> list[RolloutRecord]:
    """Every rollout of a model, oldest first."""
    with db.session_scope(db_url) as session:
        rows = session.scalars(
            sa.select(Rollout)
            .where(Rollout.model_name == model_name)
            .order_by(Rollout.created_at, Rollout.id)
        ).all()
        return [_rollout_record(r) for r in rows]


def rollouts_passing_every_stage(model_name: str, *, db_url: str | None = None) -> list[int]:
    """Ids of the model's rollouts that reached their last stage and whose latest analysis of it
    passed (promoted, or awaiting promotion)."""
    passed: list[int] = []
    with db.session_scope(db_url) as session:
        rows = session.scalars(sa.select(Rollout).where(Rollout.model_name == model_name)).all()
        for row in rows:
            last = len(row.stages) - 1
            if row.current_stage == last and (
                _last_analysis_outcome(session, row.id, last) is Outcome.PASS
            ):
                passed.append(row.id)
    return passed


def stage_results(rollout_id: int, *, db_url: str | None = None) -> list[StageResultRecord]:
    with db.session_scope(db_url) as session:
        rows = session.scalars(
            sa.select(StageResult)
            .where(StageResult.rollout_id == rollout_id)
            .order_by(StageResult.id)
        ).all()
        return [_stage_record(r) for r in rows]


def alias_moves(
    model_name: str, *, rollout_id: int | None = None, db_url: str | None = None
) -> list[AliasMoveRow]:
    with db.session_scope(db_url) as session:
        query = sa.select(AliasMove).where(AliasMove.model_name == model_name)
        if rollout_id is not None:
            query = query.where(AliasMove.rollout_id == rollout_id)
        rows = session.scalars(query.order_by(AliasMove.id)).all()
        return [_alias_record(r) for r in rows]


def progress(rollout_id: int, *, db_url: str | None = None) -> RolloutProgress:
    """The judge's counters rebuilt from the stored analyses (for :func:`registry.judge.decide`)."""
    rollout = get_rollout(rollout_id, db_url=db_url)
    analyses: dict[int, tuple[int, Outcome]] = {}
    for result in stage_results(rollout_id, db_url=db_url):
        analyses[result.analysis] = (result.stage, result.stage_outcome)
    ordered = [analyses[k] for k in sorted(analyses)]
    failed = sum(1 for _, outcome in ordered if outcome is Outcome.FAIL)
    trailing = 0
    for stage, outcome in reversed(ordered):
        if stage != rollout.current_stage or outcome is not Outcome.INCONCLUSIVE:
            break
        trailing += 1
    return RolloutProgress(
        stage_index=rollout.current_stage,
        failed_analyses=failed,
        consecutive_inconclusive=trailing,
    )


def resume_or_abort(
    model_name: str,
    *,
    champion_version: str | None = None,
    resume: bool = True,
    stale_after: dt.timedelta | None = None,
    db_url: str | None = None,
) -> ResumePoint | None:
    """Recover the active rollout of ``model_name`` after a crash (None if there is none).

    ``champion_version``: the version MLflow's ``champion`` alias points at now (the caller reads
    it). If it is the candidate, the promote step completed before the crash: the move is recorded
    and the rollout marked promoted. Otherwise the rollout is never marked promoted here; it is
    resumed (``resume=True`` and not older than ``stale_after``) — completing an advance whose
    stage already passed, a paused rollout stays paused — or aborted with the reason.
    """
    rollout = active_rollout(model_name, db_url=db_url)
    if rollout is None:
        return None
    if champion_version is not None and str(champion_version) == rollout.candidate_version:
        move = AliasMoveRecord(
            model_name=model_name,
            alias=Alias.CHAMPION,
            from_version=rollout.baseline_version,
            to_version=rollout.candidate_version,
            reason="reconciled after a crash: the candidate was already champion",
        )
        if rollout.status is not RolloutStatus.running:
            rollout = resume(rollout.id, db_url=db_url)
        done = mark_promoted(
            rollout.id, [move], reason="promoted (reconciled after a crash)", db_url=db_url
        )
        return ResumePoint(
            rollout=done,
            resumed=False,
            stage_index=done.current_stage,
            progress=progress(done.id, db_url=db_url),
            promotion_pending=False,
        )
    age = db_now() - rollout.updated_at
    if not resume or (stale_after is not None and age > stale_after):
        why = "resume disabled" if not resume else f"stale for {age} (> {stale_after})"
        aborted = mark_aborted(
            rollout.id, f"left {rollout.status.value} after a crash; {why}", db_url=db_url
        )
        return ResumePoint(
            rollout=aborted,
            resumed=False,
            stage_index=aborted.current_stage,
            progress=progress(aborted.id, db_url=db_url),
            promotion_pending=False,
        )
    if rollout.status is RolloutStatus.pending:
        rollout = resume(rollout.id, db_url=db_url)
    with db.session_scope(db_url) as session:
        last = _last_analysis_outcome(session, rollout.id, rollout.current_stage)
        rows = session.scalars(
            sa.select(StageResult.details)
            .where(StageResult.rollout_id == rollout.id)
            .order_by(StageResult.id.desc())
            .limit(1)
        ).all()
    rejection_pending = bool(rows) and (rows[0] or {}).get("decision") == Decision.ROLLBACK.value
    promotion_pending = False
    if last is Outcome.PASS and rollout.status is RolloutStatus.running:
        if rollout.on_last_stage:
            promotion_pending = True
        else:
            rollout = advance(rollout.id, db_url=db_url)  # the crash hit between judge and advance
    logger.info(
        "rollout %d of %s resumed at stage %d%s",
        rollout.id,
        model_name,
        rollout.current_stage,
        " (promotion pending)" if promotion_pending else "",
    )
    return ResumePoint(
        rollout=rollout,
        resumed=True,
        stage_index=rollout.current_stage,
        progress=progress(rollout.id, db_url=db_url),
        promotion_pending=promotion_pending,
        rejection_pending=rejection_pending,
    )


# --------------------------------------------------------------------------------------------
# Ownership: one flow run drives a rollout, under a heartbeat lease


@dataclass(frozen=True)
class Pins:
    """What a rollout fixes at creation; a resume must present the same."""

    candidate_version: str
    baseline_version: str | None
    stages: tuple[float, ...]
    gate_policy_hash: str | None


def pin_differences(rollout: RolloutRecord, pins: Pins) -> list[str]:
    """Human-readable differences between a rollout's pins and ``pins`` (empty: the same)."""
    differences = []
    if rollout.candidate_version != pins.candidate_version:
        differences.append(
            f"candidate v{pins.candidate_version} != pinned v{rollout.candidate_version}"
        )
    if rollout.baseline_version != pins.baseline_version:
        differences.append(
            f"baseline v{pins.baseline_version} != pinned v{rollout.baseline_version}"
        )
    if tuple(float(s) for s in pins.stages) != rollout.stages:
        differences.append(f"stages {list(pins.stages)} != pinned {list(rollout.stages)}")
    if rollout.gate_policy_hash is not None and pins.gate_policy_hash != rollout.gate_policy_hash:
        differences.append(
            f"gate policy {str(pins.gate_policy_hash)[:12]} != pinned {rollout.gate_policy_hash[:12]}"
        )
    return differences


def lease_alive(rollout: RolloutRecord, now: dt.datetime | None = None) -> bool:
    return (
        rollout.owner is not None
        and rollout.lease_expires_at is not None
        and rollout.lease_expires_at > (now or db_now())
    )


def claim(
    rollout_id: int,
    owner: str,
    lease_seconds: float,
    pins: Pins,
    *,
    db_url: str | None = None,
) -> RolloutRecord:
    """Take (or keep) ownership of an active rollout to resume it.

    Refused with :class:`RolloutOwnedError` while another owner's lease lives; with
    :class:`PinMismatchError` (naming each difference) when ``pins`` differ from the rollout's. The
    update is conditional on the owner and lease read, so two runs cannot both take it over."""
    if not owner:
        raise ValueError("an owner is required")
    with db.session_scope(db_url) as session:
        row = _get(session, rollout_id)
        record = _rollout_record(row)
        if record.status not in ACTIVE:
            raise IllegalTransitionError(f"rollout {rollout_id} is {record.status.value}")
        now = db_now()
        if record.owner != owner and lease_alive(record, now):
            raise RolloutOwnedError(
                f"rollout {rollout_id} of {record.model_name} (candidate "
                f"v{record.candidate_version}) is owned by {record.owner!r} until "
                f"{record.lease_expires_at.isoformat(timespec='seconds')} (heartbeat lease): "
                "refusing a second driver; rerun after the lease expires"
            )
        differences = pin_differences(record, pins)
        if differences:
            raise PinMismatchError(
                f"rollout {rollout_id} cannot be resumed with different settings: "
                + "; ".join(differences)
                + ". Finish or abort it, or resume with its pinned settings."
            )
        result = session.execute(
            sa.update(Rollout)
            .where(
                Rollout.id == rollout_id,
                Rollout.owner.is_(None) if record.owner is None else Rollout.owner == record.owner,
                Rollout.lease_expires_at.is_(None)
                if record.lease_expires_at is None
                else Rollout.lease_expires_at == record.lease_expires_at,
            )
            .values(owner=owner, lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise RolloutOwnedError(f"rollout {rollout_id} was claimed concurrently")
        if record.owner != owner:
            logger.warning(
                "rollout %d taken over by %s (lease of %s expired)", rollout_id, owner, record.owner
            )
        return _rollout_record(_get(session, rollout_id))


def heartbeat(
    rollout_id: int, owner: str, lease_seconds: float, *, db_url: str | None = None
) -> dt.datetime:
    """Renew ``owner``'s lease; :class:`LostOwnershipError` when another run owns it now."""
    expires = db_now() + dt.timedelta(seconds=lease_seconds)
    with db.session_scope(db_url) as session:
        result = session.execute(
            sa.update(Rollout)
            .where(Rollout.id == rollout_id, Rollout.owner == owner)
            .values(lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise LostOwnershipError(f"rollout {rollout_id} is no longer owned by {owner!r}")
    return expires


# --------------------------------------------------------------------------------------------
# Crash-consistent alias moves: intent first, moves, then one transaction records them

ALIASES = tuple(a.value for a in Alias)


@dataclass(frozen=True)
class IntentRecord:
    id: int
    model_name: str
    action: str  # promote | reject | rollback
    version: str | None
    rollout_id: int | None
    reason: str
    before: dict[str, str]
    created_at: dt.datetime
    completed_at: dt.datetime | None


def _intent_record(row: AliasIntent) -> IntentRecord:
    return IntentRecord(
        id=row.id,
        model_name=row.model_name,
        action=row.action,
        version=row.version,
        rollout_id=row.rollout_id,
        reason=row.reason,
        before=dict(row.before or {}),
        created_at=row.created_at,
        completed_at=row.completed_at,
    )


def begin_intent(
    model_name: str,
    action: str,
    version: str | None,
    reason: str,
    before: Mapping[str, str],
    *,
    rollout_id: int | None = None,
    db_url: str | None = None,
) -> IntentRecord:
    """Record an alias action before any alias moves. The database allows one open intent per
    model: a second one raises :class:`LedgerError` (reconcile the open one first)."""
    _require_reason(reason)
    try:
        with db.session_scope(db_url) as session:
            row = AliasIntent(
                model_name=model_name,
                action=action,
                version=version,
                rollout_id=rollout_id,
                reason=redact_urls(reason),
                before={k: str(v) for k, v in before.items() if k in ALIASES},
            )
            session.add(row)
            session.flush()
            return _intent_record(row)
    except IntegrityError as exc:
        raise LedgerError(f"{model_name} has an open alias intent: reconcile it first") from exc


def open_intent(model_name: str, *, db_url: str | None = None) -> IntentRecord | None:
    with db.session_scope(db_url) as session:
        row = session.scalars(
            sa.select(AliasIntent).where(
                AliasIntent.model_name == model_name, AliasIntent.completed_at.is_(None)
            )
        ).first()
        return _intent_record(row) if row is not None else None


def latest_intent(model_name: str, *, db_url: str | None = None) -> IntentRecord | None:
    """The model's most recent alias intent (open or closed)."""
    with db.session_scope(db_url) as session:
        row = session.scalars(
            sa.select(AliasIntent)
            .where(AliasIntent.model_name == model_name)
            .order_by(AliasIntent.id.desc())
            .limit(1)
        ).first()
        return _intent_record(row) if row is not None else None


def moves_after(model_name: str, moment: dt.datetime, *, db_url: str | None = None) -> int:
    """How many alias moves of the model were recorded after ``moment``."""
    with db.session_scope(db_url) as session:
        return session.scalar(
            sa.select(sa.func.count())
            .select_from(AliasMove)
            .where(AliasMove.model_name == model_name, AliasMove.created_at > moment)
        )


def complete_intent(
    intent_id: int, after: Mapping[str, str], *, db_url: str | None = None
) -> list[AliasMoveRow]:
    """One transaction: record every alias that differs between the intent's ``before`` and
    ``after`` (the aliases now; so moves made by an attempt that crashed are recorded too, exactly
    once), finish the intent's rollout (promote → promoted, reject → rolled_back) and close the
    intent. Idempotent: a closed intent records nothing."""
    with db.session_scope(db_url) as session:
        row = session.get(AliasIntent, intent_id, populate_existing=True)
        if row is None:
            raise LedgerError(f"no alias intent {intent_id}")
        if row.completed_at is not None:
            return []
        moves = [
            AliasMoveRecord(
                model_name=row.model_name,
                alias=Alias(alias),
                from_version=row.before.get(alias),
                to_version=after.get(alias),
                reason=row.reason,
            )
            for alias in ALIASES
            if row.before.get(alias) != after.get(alias)
        ]
        added = _add_alias_moves(session, moves, row.rollout_id)
        if row.rollout_id is not None:
            rollout = _get(session, row.rollout_id)
            status = RolloutStatus(rollout.status)
            if status in ACTIVE:
                if row.action == "promote":
                    if status is not RolloutStatus.running:
                        _transition(session, rollout.id, RolloutStatus.running)
                    _transition(session, rollout.id, RolloutStatus.promoted, reason=row.reason)
                elif row.action == "reject":
                    _transition(session, rollout.id, RolloutStatus.rolled_back, reason=row.reason)
        row.completed_at = db_now()
        session.flush()
        return [_alias_record(r) for r in added]


def ledger_aliases(model_name: str, *, db_url: str | None = None) -> dict[str, str]:
    """Alias → version as the ledger's alias moves say (the latest move of each alias)."""
    view: dict[str, str] = {}
    for move in alias_moves(model_name, db_url=db_url):
        if move.to_version is None:
            view.pop(move.alias, None)
        else:
            view[move.alias] = move.to_version
    return view


def record_alias_drift(
    model_name: str, mlflow_aliases: Mapping[str, str], *, db_url: str | None = None
) -> list[AliasMoveRow]:
    """Record a move for every alias where MLflow differs from the ledger's view (an alias moved
    outside fp4roll, or history lost before intents existed), so the history matches what serves."""
    view = ledger_aliases(model_name, db_url=db_url)
    moves = [
        AliasMoveRecord(
            model_name=model_name,
            alias=Alias(alias),
            from_version=view.get(alias),
            to_version=mlflow_aliases.get(alias),
            reason="reconciled: MLflow alias differs from the ledger (moved outside fp4roll?)",
        )
        for alias in ALIASES
        if view.get(alias) != mlflow_aliases.get(alias)
    ]
    return record_alias_moves(moves, db_url=db_url) if moves else []


# --------------------------------------------------------------------------------------- traffic weights


class WeightPhase(str, Enum):
    """``intent``: written before the gateway is asked; ``applied``: the weight read back after."""

    INTENT = "intent"
    APPLIED = "applied"


@dataclass(frozen=True)
class TrafficWeightRecord:
    rollout_id: int
    stage: int | None
    candidate_percent: float
    phase: WeightPhase
    router: str
    reason: str | None
    created_at: dt.datetime


def record_weight(
    rollout_id: int,
    candidate_percent: float,
    phase: WeightPhase,
    *,
    router: str,
    stage: int | None = None,
    reason: str | None = None,
    db_url: str | None = None,
) -> TrafficWeightRecord:
    """Journal a gateway weight change of ``rollout_id`` (any status: a rollback's weight 0 is
    recorded after the rollout ended)."""
    if not 0.0 <= candidate_percent <= 100.0:
        raise LedgerError(f"candidate_percent must lie in [0, 100], got {candidate_percent}")
    with db.session_scope(db_url) as session:
        _get(session, rollout_id)
        row = TrafficWeight(
            rollout_id=rollout_id,
            stage=stage,
            candidate_percent=float(candidate_percent),
            phase=WeightPhase(phase).value,
            router=router,
            reason=reason,
        )
        session.add(row)
        session.flush()
        return _weight_record(row)


def _weight_record(row: TrafficWeight) -> TrafficWeightRecord:
    return TrafficWeightRecord(
        rollout_id=row.rollout_id,
        stage=row.stage,
        candidate_percent=row.candidate_percent,
        phase=WeightPhase(row.phase),
        router=row.router,
        reason=row.reason,
        created_at=row.created_at,
    )


def traffic_weights(rollout_id: int, *, db_url: str | None = None) -> list[TrafficWeightRecord]:
    """Every weight journal row of ``rollout_id``, oldest first."""
    with db.session_scope(db_url) as session:
        rows = session.scalars(
            sa.select(TrafficWeight)
            .where(TrafficWeight.rollout_id == rollout_id)
            .order_by(TrafficWeight.id)
        )
        return [_weight_record(r) for r in rows]


def last_weight(rollout_id: int, *, db_url: str | None = None) -> TrafficWeightRecord | None:
    rows = traffic_weights(rollout_id, db_url=db_url)
    return rows[-1] if rows else None
