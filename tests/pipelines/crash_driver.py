"""Drive one rollout action in a child process, for the kill -9 fault-injection matrix.

``python -m tests.pipelines.crash_driver <scenario> <model> <candidate> <baseline> <db_url>
<tracking_uri>``; ``FP4ROLL_CRASH_AT`` picks the crash point, ``FP4ROLL_ROLLOUT_OWNER`` and
``FP4ROLL_LEASE_SECONDS`` the owner and its lease. Scenarios mirror the canary flow's steps (open
or resume the rollout, record stages, promote or reject) and the manual rollback, through the same
registry functions the flows call, with verdicts made by the real judge from synthetic samples (no
models, no torch). Prints the outcome; exit 0 when it completed.
"""

from __future__ import annotations

import os
import sys

from registry import ledger, rollout_actions
from registry.judge import Decision, Outcome
from registry.mlflow_registry import aliases
from tests.pipelines.rollout_fixtures import POLICY, STAGES, verdict


def canary(
    model: str, candidate: str, baseline: str, db_url: str, uri: str, fail_at: int | None
) -> str:
    owner = os.environ["FP4ROLL_ROLLOUT_OWNER"]
    lease = float(os.environ.get("FP4ROLL_LEASE_SECONDS", "300"))
    rollout_actions.reconcile(model, db_url=db_url, tracking_uri=uri)
    if aliases(model, tracking_uri=uri).get("challenger") != candidate:
        # what plan_canary does: the candidate is the challenger (a finished rollout cleared it)
        return "candidate is no longer the challenger"
    pins = ledger.Pins(candidate, baseline, STAGES, "policy-sha")
    opened = rollout_actions.open_rollout(
        pins,
        model,
        owner=owner,
        lease_seconds=lease,
        reason="crash matrix",
        db_url=db_url,
        tracking_uri=uri,
    )
    rollout = opened.rollout
    if not rollout.active:
        return rollout.status.value
    decision = None
    if opened.promotion_pending:
        decision = Decision.PROMOTE
    elif opened.rejection_pending:
        decision = Decision.ROLLBACK
    stage = opened.stage_index + (1 if decision is not None else 0)
    while decision is None or decision is Decision.ADVANCE:
        outcome = Outcome.FAIL if stage == fail_at else Outcome.PASS
        decision = rollout_actions.record_stage(
            rollout.id, verdict(stage, outcome), POLICY, owner=owner, db_url=db_url
        )
        stage += 1
    if decision is Decision.PROMOTE:
        rollout_actions.promote_version(
            model,
            candidate,
            "every canary stage passed",
            rollout_id=rollout.id,
            db_url=db_url,
            tracking_uri=uri,
        )
    elif decision is Decision.ROLLBACK:
        rollout_actions.reject_version(
            model,
            candidate,
            f"stage {stage - 1} failed",
            rollout_id=rollout.id,
            db_url=db_url,
            tracking_uri=uri,
        )
    return ledger.get_rollout(rollout.id, db_url=db_url).status.value


def main(argv: list[str]) -> int:
    scenario, model, candidate, baseline, db_url, uri = argv
    if scenario == "canary-pass":
        result = canary(model, candidate, baseline, db_url, uri, fail_at=None)
    elif scenario == "canary-fail":
        result = canary(model, candidate, baseline, db_url, uri, fail_at=len(STAGES) - 1)
    elif scenario == "rollback":
        rollout_actions.rollback_to(model, None, "operator drill", db_url=db_url, tracking_uri=uri)
        result = "rolled back"
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
