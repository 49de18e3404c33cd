"""Rollout ledger on SQLite and PostgreSQL (``migrated_db_url`` from tests/registry/conftest.py)."""

from __future__ import annotations

import datetime as dt
import threading

import numpy as np
import pytest
import sqlalchemy as sa

from registry import db, ledger
from registry.aliases import Alias, AliasMove
from registry.judge import Decision, Outcome, RolloutProgress, decide, judge_stage
from registry.ledger import IllegalTransitionError, LedgerError, RolloutConflictError
from registry.policy import GatePolicy, MetricGate, StagePlan
from registry.schema import Rollout, RolloutStatus

STAGES = (1.0, 50.0, 100.0)
POLICY = GatePolicy(
    metrics=(MetricGate(name="latency_ms", direction="lower", statistic="p99", max_effect=1.2),),
    min_samples=10,
    plan=StagePlan(steps=STAGES, failure_limit=1, inconclusive_limit=2),
)


def _verdict(stage: int, outcome: Outcome):
    rng = np.random.default_rng(stage)
    base = rng.normal(100, 5, 60)
    if outcome is Outcome.PASS:
        cand, n = rng.normal(100, 5, 60), 60
    elif outcome is Outcome.FAIL:
        cand, n = rng.normal(200, 5, 60), 60
    else:
        cand, n = rng.normal(100, 5, 5), 5
    verdict = judge_stage({"latency_ms": base[:n]}, {"latency_ms": cand}, POLICY, stage_index=stage)
    assert verdict.outcome is outcome
    return verdict


def _champion_move(rollout, reason="canary passed"):
    return AliasMove(
        model_name=rollout.model_name,
        alias=Alias.CHAMPION,
        from_version=rollout.baseline_version,
        to_version=rollout.candidate_version,
        reason=reason,
    )


def test_full_lifecycle_to_promoted(migrated_db_url):
    url = migrated_db_url
    rollout = ledger.start_rollout("m", "3", "2", STAGES, db_url=url)
    assert rollout.status is RolloutStatus.running and rollout.current_stage == 0
    progress = RolloutProgress()
    for stage in range(len(STAGES)):
        verdict = _verdict(stage, Outcome.PASS)
        decision, progress = decide(verdict, ledger.progress(rollout.id, db_url=url), POLICY)
        rows = ledger.record_stage_result(rollout.id, verdict, decision, db_url=url)
        assert rows[0].metric == "latency_ms" and rows[0].verdict.value == "pass"
        assert rows[0].p_value is not None and rows[0].n_candidate == 60
        if decision is Decision.ADVANCE:
            ledger.advance(rollout.id, db_url=url)
    assert decision is Decision.PROMOTE

    with pytest.raises(LedgerError, match="no champion move"):
        ledger.mark_promoted(rollout.id, db_url=url)
    assert ledger.get_rollout(rollout.id, db_url=url).status is RolloutStatus.running

    done = ledger.mark_promoted(rollout.id, [_champion_move(rollout)], db_url=url)
    assert done.status is RolloutStatus.promoted and done.finished_at is not None
    assert len(ledger.stage_results(rollout.id, db_url=url)) == len(STAGES)
    moves = ledger.alias_moves("m", rollout_id=rollout.id, db_url=url)
    assert [(m.alias, m.from_version, m.to_version) for m in moves] == [("champion", "2", "3")]
    with pytest.raises(IllegalTransitionError, match="promoted -> rolled_back"):
        ledger.mark_rolled_back(rollout.id, "too late", db_url=url)
    with pytest.raises(IllegalTransitionError, match="no more stage results"):
        ledger.record_stage_result(rollout.id, _verdict(2, Outcome.PASS), db_url=url)


def test_fail_rolls_back_with_reason(migrated_db_url):
    url = migrated_db_url
    rollout = ledger.start_rollout("m", "3", "2", STAGES, db_url=url)
    verdict = _verdict(0, Outcome.FAIL)
    decision, _ = decide(verdict, RolloutProgress(), POLICY)
    assert decision is Decision.ROLLBACK
    ledger.record_stage_result(rollout.id, verdict, decision, db_url=url)
    reject = AliasMove(
        model_name="m", alias=Alias.CHALLENGER, from_version="3", to_version=None, reason="fail"
    )
    done = ledger.mark_rolled_back(rollout.id, verdict.reason, [reject], db_url=url)
    assert done.status is RolloutStatus.rolled_back and done.reason == verdict.reason
    assert ledger.progress(rollout.id, db_url=url).failed_analyses == 1
    # a finished rollout no longer blocks a new one
    assert ledger.start_rollout("m", "4", "2", STAGES, db_url=url).id != rollout.id


def test_second_active_rollout_is_refused_by_the_database(migrated_db_url):
    url = migrated_db_url
    first = ledger.start_rollout("m", "3", "2", STAGES, db_url=url)
    with pytest.raises(RolloutConflictError) as caught:
        ledger.start_rollout("m", "4", "2", STAGES, db_url=url)
    assert caught.value.active_rollout_id == first.id
    # the refusal comes from the database: a raw INSERT bypassing the ledger fails too
    with pytest.raises(sa.exc.IntegrityError), db.get_engine(url).begin() as conn:
        conn.execute(
            sa.insert(Rollout).values(
                model_name="m", candidate_version="5", status="paused", stages=[100]
            )
        )
    assert ledger.start_rollout("other-model", "1", None, STAGES, db_url=url)
    ledger.pause(first.id, "operator", db_url=url)
    with pytest.raises(RolloutConflictError):  # paused is still active
        ledger.start_rollout("m", "4", "2", STAGES, db_url=url)


def test_concurrent_starts_from_two_threads(migrated_db_url):
    url = migrated_db_url
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def start(candidate: str) -> None:
        barrier.wait()
        try:
            outcomes.append(ledger.start_rollout("m", candidate, "1", STAGES, db_url=url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in ("2", "3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    started = [o for o in outcomes if isinstance(o, ledger.RolloutRecord)]
    refused = [o for o in outcomes if isinstance(o, RolloutConflictError)]
    assert len(started) == 1 and len(refused) == 1, outcomes
    assert len(ledger.rollouts("m", db_url=url)) == 1


def test_two_separate_engines_second_insert_waits_then_fails(migrated_db_url):
    """Like two processes: the first transaction is still open when the second inserts."""
    url = migrated_db_url
    engine_a = db.create_engine_for(url)
    engine_b = db.create_engine_for(url)
    row = {"model_name": "m", "candidate_version": "2", "status": "running", "stages": [100]}
    errors: list[BaseException] = []
    try:
        with engine_a.connect() as conn_a:
            transaction = conn_a.begin()
            conn_a.execute(sa.insert(Rollout).values(**row))

            def second() -> None:
                try:
                    with engine_b.begin() as conn_b:
                        conn_b.execute(
                            sa.insert(Rollout).values(**{**row, "candidate_version": "3"})
                        )
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            thread = threading.Thread(target=second)
            thread.start()
            thread.join(timeout=1.0)  # blocked on the first transaction's lock
            transaction.commit()
            thread.join(timeout=60)
            assert not thread.is_alive()
    finally:
        engine_a.dispose()
        engine_b.dispose()
    assert len(errors) == 1 and isinstance(errors[0], sa.exc.IntegrityError), errors
    assert [r.candidate_version for r in ledger.rollouts("m", db_url=url)] == ["2"]


def test_illegal_transitions_and_preconditions(migrated_db_url):
    url = migrated_db_url
    rollout = ledger.start_rollout("m", "3", "2", STAGES, db_url=url)
    with pytest.raises(LedgerError, match="no passing analysis"):
        ledger.advance(rollout.id, db_url=url)
    with pytest.raises(LedgerError, match="at stage 0"):
        ledger.record_stage_result(rollout.id, _verdict(1, Outcome.PASS), db_url=url)
    with pytest.raises(IllegalTransitionError, match="running -> running"):
        ledger.resume(rollout.id, db_url=url)
    ledger.pause(rollout.id, "waiting for approval", db_url=url)
    with pytest.raises(IllegalTransitionError, match="not running"):
        ledger.advance(rollout.id, db_url=url)
    with pytest.raises(IllegalTransitionError, match="paused -> promoted"):
        ledger.mark_promoted(rollout.id, [_champion_move(rollout)], db_url=url)
    assert ledger.alias_moves("m", db_url=url) == []  # the refused promotion stored nothing
    ledger.resume(rollout.id, db_url=url)
    aborted = ledger.mark_aborted(rollout.id, "operator stop", db_url=url)
    assert aborted.status is RolloutStatus.aborted
    for call in (
        lambda: ledger.resume(rollout.id, db_url=url),
        lambda: ledger.mark_rolled_back(rollout.id, "x", db_url=url),
        lambda: ledger.mark_aborted(rollout.id, "again", db_url=url),
    ):
        with pytest.raises(IllegalTransitionError):
            call()
    with pytest.raises(ValueError, match="reason"):
        ledger.mark_aborted(rollout.id, " ", db_url=url)
    with pytest.raises(ValueError, match="end at 100"):
        ledger.start_rollout("m", "3", "2", (1, 50), db_url=url)
    with pytest.raises(ledger.RolloutNotFoundError):
        ledger.get_rollout(999_999, db_url=url)


def test_progress_counts_inconclusive_and_failures(migrated_db_url):
    url = migrated_db_url
    rollout = ledger.start_rollout("m", "3", "2", STAGES, db_url=url)
    verdict = _verdict(0, Outcome.INCONCLUSIVE)
    decision, expected = decide(verdict, ledger.progress(rollout.id, db_url=url), POLICY)
    assert decision is Decision.HOLD
    ledger.record_stage_result(rollout.id, verdict, decision, db_url=url)
    assert ledger.progress(rollout.id, db_url=url) == expected
    decision, expected = decide(verdict, expected, POLICY)
    ledger.record_stage_result(rollout.id, verdict, decision, db_url=url)
    assert decision is Decision.ROLLBACK
    assert ledger.progress(rollout.id, db_url=url) == expected == RolloutProgress(0, 0, 2)


def _crash_after_stage(url, stage_passed: int):
    """A rollout whose process died right after recording a passing analysis of ``stage_passed``."""
    rollout = ledger.start_rollout("m", "3", "2", STAGES, db_url=url)
    for stage in range(stage_passed + 1):
        ledger.record_stage_result(
            rollout.id, _verdict(stage, Outcome.PASS), Decision.ADVANCE, db_url=url
        )
        if stage < stage_passed:
            ledger.advance(rollout.id, db_url=url)
    return rollout  # crash: no advance / promote after the last recorded analysis


def test_crash_between_stages_resumes_never_promotes(migrated_db_url):
    url = migrated_db_url
    rollout = _crash_after_stage(url, stage_passed=0)
    point = ledger.resume_or_abort("m", champion_version="2", db_url=url)
    assert point.resumed and not point.promotion_pending
    assert point.rollout.status is RolloutStatus.running
    assert point.stage_index == 1  # the pending advance was completed
    assert ledger.get_rollout(rollout.id, db_url=url).current_stage == 1
    # resuming again is harmless: stage 1 has no analysis yet
    again = ledger.resume_or_abort("m", champion_version="2", db_url=url)
    assert again.stage_index == 1 and again.rollout.status is RolloutStatus.running


def test_crash_after_last_stage_is_pending_promotion_not_promoted(migrated_db_url):
    url = migrated_db_url
    _crash_after_stage(url, stage_passed=len(STAGES) - 1)
    point = ledger.resume_or_abort("m", champion_version="2", db_url=url)
    assert point.resumed and point.promotion_pending
    assert point.rollout.status is RolloutStatus.running  # not promoted: MLflow says v2 serves


def test_crash_after_promote_step_is_reconciled(migrated_db_url):
    url = migrated_db_url
    rollout = _crash_after_stage(url, stage_passed=len(STAGES) - 1)
    point = ledger.resume_or_abort("m", champion_version="3", db_url=url)
    assert not point.resumed and point.rollout.status is RolloutStatus.promoted
    (move,) = ledger.alias_moves("m", rollout_id=rollout.id, db_url=url)
    assert (move.alias, move.to_version) == ("champion", "3")
    assert ledger.resume_or_abort("m", db_url=url) is None


@pytest.mark.parametrize(
    "kwargs", [{"resume": False}, {"stale_after": dt.timedelta(seconds=-1)}], ids=["off", "stale"]
)
def test_crash_aborts_when_not_resumable(migrated_db_url, kwargs):
    url = migrated_db_url
    rollout = _crash_after_stage(url, stage_passed=1)
    point = ledger.resume_or_abort("m", champion_version="2", db_url=url, **kwargs)
    assert not point.resumed and point.rollout.status is RolloutStatus.aborted
    assert "crash" in point.rollout.reason
    assert ledger.get_rollout(rollout.id, db_url=url).status is RolloutStatus.aborted
    assert ledger.active_rollout("m", db_url=url) is None
