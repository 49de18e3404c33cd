"""Guards of the manual promote and rollback: the gates an operator skips only on purpose.

Pure functions over ledger records and a version's outcome tag (the caller reads both):

* :func:`promote_refusal` — why ``version`` may not be promoted now, or None. Refused: any version
  while another rollout is active (the active rollout's own candidate is allowed once every stage
  passed: that completes it); a version tagged rejected or rolled back; a version whose latest
  rollout failed; a version that never passed every stage of a canary.
* :func:`rollback_refusal` — why ``target`` may not be put back as champion, or None: a target
  tagged rejected or rolled back.

``--force --reason`` overrides a refusal; :func:`forced_reason` is what the ledger then records.
Integrity (:mod:`registry.integrity`) is never overridable: wrong bytes never serve.
"""

from __future__ import annotations

from collections.abc import Sequence

from registry.aliases import VersionOutcome
from registry.schema import RolloutStatus

#: Outcome tags that disqualify a version from serving without ``--force``.
DISQUALIFYING_OUTCOMES = frozenset(
    {VersionOutcome.REJECTED.value, VersionOutcome.ROLLED_BACK.value}
)
FAILED_ROLLOUT_STATUSES = frozenset({RolloutStatus.rolled_back, RolloutStatus.failed})


class ManualActionRefused(RuntimeError):
    """A manual promote/rollback that a gate refuses; rerun with ``--force --reason`` to override."""


def promote_refusal(
    version: str,
    outcome: str | None,
    history: Sequence,  # registry.ledger.RolloutRecord of this model, oldest first
    passed_every_stage: Sequence[int],  # ids of rollouts in ``history`` whose every stage passed
) -> str | None:
    """Why promoting ``version`` is refused (None: allowed). See the module doc."""
    version = str(version)
    active = [r for r in history if r.active]
    for rollout in active:
        if rollout.candidate_version == version and rollout.id in passed_every_stage:
            return None  # awaiting promotion: promoting completes it
        return (
            f"rollout {rollout.id} (candidate v{rollout.candidate_version}) is "
            f"{rollout.status.value} at stage {rollout.current_stage + 1}/{len(rollout.stages)}: "
            "no manual promotion during an active rollout"
        )
    if outcome in DISQUALIFYING_OUTCOMES:
        return f"v{version} is tagged {outcome}"
    own = [r for r in history if r.candidate_version == version]
    if own and own[-1].status in FAILED_ROLLOUT_STATUSES:
        return f"v{version}'s latest rollout {own[-1].id} {own[-1].status.value}: {own[-1].reason}"
    if not any(r.id in passed_every_stage for r in own):
        return f"v{version} never passed every stage of a canary"
    return None


def rollback_refusal(target: str, outcome: str | None) -> str | None:
    """Why putting ``target`` back as champion is refused (None: allowed)."""
    if outcome in DISQUALIFYING_OUTCOMES:
        return f"rollback target v{target} is tagged {outcome}"
    return None


def forced_reason(refusal: str | None, reason: str) -> str:
    """The reason the ledger records: the operator's, marked FORCED with the gate it overrode."""
    return f"FORCED past '{refusal}': {reason}" if refusal else reason
