"""Crash-consistent rollout actions over the ledger and MLflow aliases (no torch, no Prefect).

Every alias action (promote, reject a challenger, rollback) follows one protocol:

1. :func:`reconcile` — complete an open intent a crash left behind (roll forward: the decision was
   made), then record any alias where MLflow differs from the ledger's history;
2. record the intent (action, version, reason, the aliases before) — ``intent:after-begin``;
3. move aliases and tag versions in MLflow, idempotently and from the intent's ``before``
   (``move:<before|after>:<alias>``, ``tags:after-outcome``);
4. one ledger transaction records the moves (``before`` vs the aliases now), finishes the rollout
   and closes the intent (``intent:before-complete`` / ``intent:after-complete``).

A kill -9 at any of those points leaves an open intent (or a closed one and nothing to do); the
next entry completes it, and the history holds every move exactly once. Stage results follow the
same rule (:func:`record_stage`): the stage row is the record, advancing is completed on resume.
Ownership (:func:`open_rollout`): one flow run drives a rollout under a heartbeat lease; stages,
baseline and gate-policy hash are pinned at creation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from registry import ledger
from registry.aliases import Alias, AliasMove
from registry.faults import crash_point
from registry.judge import Decision, RolloutProgress, decide
from registry.judge import StageVerdict as JudgeVerdict
from registry.mlflow_registry import RegistryError, aliases, promote, reject_challenger, rollback
from registry.policy import GatePolicy
from registry.url_redaction import redact_urls

logger = logging.getLogger(__name__)


def _as_moves(rows: Sequence[ledger.AliasMoveRow]) -> tuple[AliasMove, ...]:
    return tuple(
        AliasMove(
            model_name=r.model_name,
            alias=Alias(r.alias),
            from_version=r.from_version,
            to_version=r.to_version,
            reason=r.reason or "",
            moved_at=r.created_at,
        )
        for r in rows
    )


def _current(model_name: str, tracking_uri: str | None) -> dict[str, str]:
    try:
        return aliases(model_name, tracking_uri=tracking_uri)
    except RegistryError:
        return {}


def _carry_out(
    intent: ledger.IntentRecord, *, db_url: str | None, tracking_uri: str | None
) -> tuple[AliasMove, ...]:
    """Steps 3–4 for ``intent`` (safe to repeat: every step is idempotent)."""
    name = intent.model_name
    if intent.action == "promote":
        promote(
            name,
            str(intent.version),
            reason=intent.reason,
            tracking_uri=tracking_uri,
            before=intent.before,
        )
    elif intent.action == "reject":
        reject_challenger(
            name, str(intent.version), reason=intent.reason, tracking_uri=tracking_uri
        )
    elif intent.action == "rollback":
        rollback(
            name,
            intent.version,
            reason=intent.reason,
            tracking_uri=tracking_uri,
            before=intent.before,
        )
    else:  # pragma: no cover - written by this module only
        raise ledger.LedgerError(f"unknown alias action {intent.action!r}")
    crash_point("intent:before-complete")
    rows = ledger.complete_intent(intent.id, _current(name, tracking_uri), db_url=db_url)
    crash_point("intent:after-complete")
    return _as_moves(rows)


def reconcile(
    model_name: str, *, db_url: str | None = None, tracking_uri: str | None = None
) -> tuple[AliasMove, ...]:
    """Run on every entry: complete an open alias intent (a crash between deciding and recording),
    then record every alias where MLflow differs from the ledger. Returns the moves recorded."""
    return _reconcile(model_name, db_url=db_url, tracking_uri=tracking_uri)[1]


def _reconcile(
    model_name: str, *, db_url: str | None, tracking_uri: str | None
) -> tuple[ledger.IntentRecord | None, tuple[AliasMove, ...]]:
    recorded: tuple[AliasMove, ...] = ()
    intent = ledger.open_intent(model_name, db_url=db_url)
    if intent is not None:
        logger.warning(
            "%s: completing the %s (version %s) left open by a crash (intent %d)",
            model_name,
            intent.action,
            intent.version,
            intent.id,
        )
        recorded = _carry_out(intent, db_url=db_url, tracking_uri=tracking_uri)
    current = _current(model_name, tracking_uri)
    if current or ledger.alias_moves(model_name, db_url=db_url):
        recorded += _as_moves(ledger.record_alias_drift(model_name, current, db_url=db_url))
    return intent, recorded


def _act(
    model_name: str,
    action: str,
    version: str | None,
    reason: str,
    *,
    rollout_id: int | None,
    db_url: str | None,
    tracking_uri: str | None,
) -> tuple[AliasMove, ...]:
    completed, recorded = _reconcile(model_name, db_url=db_url, tracking_uri=tracking_uri)
    if completed is not None and (completed.action, completed.version, completed.reason) == (
        action,
        version,
        redact_urls(reason),
    ):
        return recorded  # this very action was interrupted by a crash and is now complete
    last = ledger.latest_intent(model_name, db_url=db_url)
    if (
        completed is None
        and last is not None
        and last.completed_at is not None
        and (last.action, last.version, last.reason) == (action, version, redact_urls(reason))
        and not ledger.moves_after(model_name, last.completed_at, db_url=db_url)
    ):
        return ()  # a rerun of the action that completed last, nothing moved since: done
    before = _current(model_name, tracking_uri)
    if action == "rollback" and version is None and not before.get(Alias.PREVIOUS_CHAMPION.value):
        raise RegistryError(f"{model_name}: no previous-champion to roll back to")
    intent = ledger.begin_intent(
        model_name, action, version, reason, before, rollout_id=rollout_id, db_url=db_url
    )
    crash_point("intent:after-begin")
    return _carry_out(intent, db_url=db_url, tracking_uri=tracking_uri)


def promote_version(
    model_name: str,
    version: str,
    reason: str,
    *,
    rollout_id: int | None = None,
    db_url: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[AliasMove, ...]:
    """``version`` becomes champion (old champion → previous-champion, challenger cleared); the
    rollout (if any) is marked promoted in the transaction that records the moves."""
    return _act(
        model_name,
        "promote",
        str(version),
        reason,
        rollout_id=rollout_id,
        db_url=db_url,
        tracking_uri=tracking_uri,
    )


def reject_version(
    model_name: str,
    version: str,
    reason: str,
    *,
    rollout_id: int | None = None,
    db_url: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[AliasMove, ...]:
    """A failed canary: challenger cleared, version tagged rejected, rollout rolled_back."""
    return _act(
        model_name,
        "reject",
        str(version),
        reason,
        rollout_id=rollout_id,
        db_url=db_url,
        tracking_uri=tracking_uri,
    )


def rollback_to(
    model_name: str,
    to_version: str | None,
    reason: str,
    *,
    db_url: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[AliasMove, ...]:
    """``to_version`` (default: previous-champion) back as champion; recorded in the ledger."""
    return _act(
        model_name,
        "rollback",
        None if to_version is None else str(to_version),
        reason,
        rollout_id=None,
        db_url=db_url,
        tracking_uri=tracking_uri,
    )


def record_stage(
    rollout_id: int,
    verdict: JudgeVerdict,
    policy: GatePolicy,
    *,
    owner: str | None = None,
    db_url: str | None = None,
) -> Decision:
    """Judge's decision for ``verdict``, recorded (one transaction), then the advance when it
    says so (a crash in between is completed by :func:`open_rollout` on resume)."""
    crash_point("stage:before-record")
    decision, _ = decide(verdict, ledger.progress(rollout_id, db_url=db_url), policy)
    ledger.record_stage_result(rollout_id, verdict, decision, owner=owner, db_url=db_url)
    crash_point("stage:after-record")
    if decision is Decision.ADVANCE:
        ledger.advance(rollout_id, owner=owner, db_url=db_url)
        crash_point("stage:after-advance")
    return decision


@dataclass(frozen=True)
class OpenedRollout:
    rollout: ledger.RolloutRecord
    stage_index: int
    resumed: bool
    promotion_pending: bool  # every stage passed before a crash: promote next
    progress: RolloutProgress
    rejection_pending: bool = False  # a stage failed before a crash: reject next


def open_rollout(
    pins: ledger.Pins,
    model_name: str,
    *,
    owner: str,
    lease_seconds: float,
    reason: str,
    db_url: str | None = None,
    tracking_uri: str | None = None,
) -> OpenedRollout:
    """Reconcile, then resume the active rollout (claimed by ``owner``: refused while another
    run's lease lives or when ``pins`` differ) or start a new one pinned to ``pins``.

    An active rollout of ANOTHER candidate whose owner's lease expired is aborted (its driver is
    gone) and a new one started; while that lease lives the new canary is refused."""
    reconcile(model_name, db_url=db_url, tracking_uri=tracking_uri)
    active = ledger.active_rollout(model_name, db_url=db_url)
    if active is not None and active.candidate_version != pins.candidate_version:
        if active.owner != owner and ledger.lease_alive(active):
            ledger.claim(active.id, owner, lease_seconds, pins, db_url=db_url)  # raises: owned
        ledger.mark_aborted(
            active.id,
            f"superseded by a canary of v{pins.candidate_version} (owner {active.owner!r} gone: "
            "lease expired)",
            db_url=db_url,
        )
        active = None
    if active is not None:
        ledger.claim(active.id, owner, lease_seconds, pins, db_url=db_url)
        champion = _current(model_name, tracking_uri).get(Alias.CHAMPION.value)
        point = ledger.resume_or_abort(model_name, champion_version=champion, db_url=db_url)
        if point is not None and point.rollout.active:
            if point.rollout.status.value == "paused" and not point.promotion_pending:
                ledger.resume(point.rollout.id, db_url=db_url)
            return OpenedRollout(
                rollout=ledger.get_rollout(point.rollout.id, db_url=db_url),
                stage_index=point.stage_index,
                resumed=True,
                promotion_pending=point.promotion_pending,
                progress=point.progress,
                rejection_pending=point.rejection_pending,
            )
        if point is not None:  # reconciled as promoted (legacy: no intent recorded)
            return OpenedRollout(
                rollout=point.rollout,
                stage_index=point.stage_index,
                resumed=False,
                promotion_pending=False,
                progress=point.progress,
            )
    rollout = ledger.start_rollout(
        model_name,
        pins.candidate_version,
        pins.baseline_version,
        pins.stages,
        reason=reason,
        owner=owner,
        lease_seconds=lease_seconds,
        gate_policy_hash=pins.gate_policy_hash,
        db_url=db_url,
    )
    return OpenedRollout(
        rollout=rollout,
        stage_index=0,
        resumed=False,
        promotion_pending=False,
        progress=RolloutProgress(),
    )
