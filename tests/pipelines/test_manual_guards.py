# ruff: noqa: F811 - pytest fixtures imported from tests/registry
"""Manual promote/rollback are gated: rejected, failed or never-canaried versions and any version
during an active rollout are refused unless --force --reason, which the ledger records."""

from __future__ import annotations

import itertools
import os

import pytest
from pydantic import ValidationError

from pipelines.params import PromoteParams, RollbackParams
from pipelines.rollout import promote_version, rollback_version
from registry import ledger
from registry.guards import ManualActionRefused
from registry.judge import Outcome
from registry.mlflow_registry import aliases, reject_challenger
from registry.schema import RolloutStatus
from tests.pipelines.rollout_fixtures import STAGES, record_stage, register_baseline_and_challenger
from tests.registry.conftest import db_url, migrated_db_url  # noqa: F401
from tests.registry.mlflow_fixtures import mlflow_sqlite_uri  # noqa: F401

_names = itertools.count()


@pytest.fixture
def setup(migrated_db_url, mlflow_sqlite_uri, tmp_path):
    name = f"guarded-{os.getpid()}-{next(_names)}"
    baseline, (v_a, v_b) = register_baseline_and_challenger(
        name, tmp_path, mlflow_sqlite_uri, payloads=(b"aaaa", b"bbbb")
    )
    return name, baseline, v_a, v_b, migrated_db_url, mlflow_sqlite_uri


def _promote(setup, version, **kw):
    name, _, _, _, url, uri = setup
    return promote_version(
        PromoteParams(model_name=name, version=version, db_url=url, tracking_uri=uri, **kw)
    )


def _rollback(setup, to_version, reason="operator", **kw):
    name, _, _, _, url, uri = setup
    return rollback_version(
        RollbackParams(
            model_name=name,
            to_version=to_version,
            reason=reason,
            db_url=url,
            tracking_uri=uri,
            **kw,
        )
    )


def _champion(setup):
    name, *_, uri = setup
    return aliases(name, tracking_uri=uri).get("champion")


def _canary_passes(setup, version, *, finish: bool):
    name, baseline, _, _, url, _ = setup
    rollout = ledger.start_rollout(name, version, baseline, STAGES, db_url=url)
    for stage in range(len(STAGES)):
        record_stage(rollout.id, stage, url)
    if finish:
        ledger.pause(rollout.id, "awaiting manual promotion", db_url=url)
    return rollout


def test_force_needs_a_reason():
    with pytest.raises(ValidationError, match="force needs a reason"):
        PromoteParams(force=True)


def test_never_canaried_version_is_refused_then_forced_and_recorded(setup):
    name, baseline, v_a, _, url, _ = setup
    with pytest.raises(ManualActionRefused, match=f"v{v_a} never passed every stage"):
        _promote(setup, v_a)
    assert _champion(setup) == baseline
    moves = _promote(setup, v_a, force=True, reason="hotfix approved by on-call")
    assert _champion(setup) == v_a and {m.alias.value for m in moves} >= {"champion"}
    recorded = [m for m in ledger.alias_moves(name, db_url=url) if m.alias == "champion"]
    assert recorded[-1].to_version == v_a
    assert recorded[-1].reason.startswith(f"FORCED past 'v{v_a} never passed every stage")
    assert recorded[-1].reason.endswith("hotfix approved by on-call")


def test_rejected_version_is_refused_for_promote_and_rollback(setup):
    name, baseline, v_a, v_b, url, uri = setup
    reject_challenger(name, v_b, reason="stage 0 failed", tracking_uri=uri)
    with pytest.raises(ManualActionRefused, match="tagged rejected"):
        _promote(setup, v_b)
    with pytest.raises(ManualActionRefused, match=f"rollback target v{v_b} is tagged rejected"):
        _rollback(setup, v_b)
    assert _champion(setup) == baseline
    _rollback(setup, v_b, reason="reviewed: the rejection was a gateway outage", force=True)
    assert _champion(setup) == v_b
    reasons = [m.reason for m in ledger.alias_moves(name, db_url=url)]
    assert any(r.startswith("FORCED past 'rollback target") for r in reasons)


def test_latest_rollout_failed_is_refused(setup):
    name, baseline, v_a, _, url, _ = setup
    rollout = ledger.start_rollout(name, v_a, baseline, STAGES, db_url=url)
    record_stage(rollout.id, 0, url, Outcome.FAIL)
    ledger.mark_rolled_back(rollout.id, "stage 0 failed", db_url=url)
    with pytest.raises(ManualActionRefused, match=f"rollout {rollout.id} rolled_back"):
        _promote(setup, v_a)


def test_active_rollout_blocks_other_versions_and_its_own_until_every_stage_passed(setup):
    name, baseline, v_a, v_b, url, _ = setup
    rollout = ledger.start_rollout(name, v_a, baseline, STAGES, db_url=url)
    record_stage(rollout.id, 0, url)  # stage 0 of 2 passed, still running
    with pytest.raises(ManualActionRefused, match=f"rollout {rollout.id} .* is running"):
        _promote(setup, v_a)
    with pytest.raises(ManualActionRefused, match="no manual promotion during an active rollout"):
        _promote(setup, v_b)
    _promote(setup, v_b, force=True, reason="incident 42: ship the fix now")
    assert _champion(setup) == v_b
    aborted = ledger.get_rollout(rollout.id, db_url=url)
    assert aborted.status is RolloutStatus.aborted
    assert "superseded by a manual promotion" in aborted.reason and "incident 42" in aborted.reason


def test_promoting_a_rollout_awaiting_promotion_completes_it(setup):
    name, _, v_a, _, url, _ = setup
    rollout = _canary_passes(setup, v_a, finish=True)
    assert ledger.get_rollout(rollout.id, db_url=url).status is RolloutStatus.paused
    _promote(setup, v_a)
    assert _champion(setup) == v_a
    done = ledger.get_rollout(rollout.id, db_url=url)
    assert done.status is RolloutStatus.promoted
    assert any(
        m.alias == "champion" and m.to_version == v_a
        for m in ledger.alias_moves(name, rollout_id=rollout.id, db_url=url)
    )
    assert _promote(setup, v_a) == ()  # already champion: a no-op, not a refusal
