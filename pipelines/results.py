"""What the flows (and ``fp4roll status``) return: small frozen pydantic records, JSON-ready for
Prefect's persisted results and the CLI's ``--json``-style output, typed for every caller."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from calibration.drift import DriftVerdict
from registry.aliases import AliasMove
from registry.judge import Decision, Outcome
from registry.versions import VersionSummary


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RecalibrationRecord(_Record):
    """The ``recalibrate`` flow's result: the registered challenger and its headline figures."""

    model_name: str
    version: str
    run_id: str
    run_url: str
    corpus_digest: str
    checkpoint_dir: str
    fallback_groups: tuple[str, ...]
    plan_mean_kl: float
    all_quantized_mean_kl: float


class StageReport(_Record):
    """One canary stage as the flow, its artifacts and the CLI show it."""

    rollout_id: int
    stage_index: int
    traffic_percent: float
    requests: int
    outcome: Outcome
    decision: Decision
    score: float
    reason: str
    failed_metrics: tuple[str, ...]
    metrics: dict[
        str, dict[str, object]
    ]  # metric -> baseline/candidate statistic, p-value, verdict
    replay_path: str


class CanaryOutcome(str, Enum):
    """Where a canary flow run left the candidate."""

    PROMOTED = "promoted"
    AWAITING_PROMOTION = "awaiting-promotion"  # every stage passed, auto_promote off
    ROLLED_BACK = "rolled_back"  # a stage failed: candidate rejected, champion untouched
    HELD = "held"  # not enough evidence: rollout paused
    ABORTED = "aborted"  # a reviewer refused the last stage


class CanaryRecord(_Record):
    """The ``canary`` flow's result."""

    model_name: str
    rollout_id: int
    candidate_version: str
    baseline_version: str
    outcome: CanaryOutcome
    stages: tuple[StageReport, ...]


class DriftRecord(_Record):
    """The ``drift-check`` flow's result (``recalibration`` when it recalibrated on drift)."""

    calibration_digest: str
    verdict: DriftVerdict
    recalibration: RecalibrationRecord | None = None

    @property
    def drifted(self) -> bool:
        return self.verdict.drifted


class DemoRecord(_Record):
    """What ``fp4roll demo`` ran (``canary`` is None when the version was canaried before)."""

    recalibrate: RecalibrationRecord
    canary: CanaryRecord | None
    drift: DriftRecord
    seconds: float


class RolloutSummary(_Record):
    """One rollout row as ``fp4roll status`` lists it."""

    id: int
    candidate_version: str
    baseline_version: str | None
    status: str  # registry.schema.RolloutStatus value
    stages: tuple[float, ...]
    current_stage: int
    reason: str | None
    updated_at: str  # ISO 8601


class ModelStatus(_Record):
    """``fp4roll status``: aliases, versions with their quality figures, recent rollouts."""

    model_name: str
    aliases: dict[str, str] = Field(default_factory=dict)  # alias -> version
    versions: tuple[VersionSummary, ...] = ()
    rollouts: tuple[RolloutSummary, ...] = ()


__all__ = [
    "AliasMove",
    "CanaryOutcome",
    "CanaryRecord",
    "DemoRecord",
    "DriftRecord",
    "ModelStatus",
    "RecalibrationRecord",
    "RolloutSummary",
    "StageReport",
]
