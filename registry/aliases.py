"""What serves and what happened to each version: MLflow alias names, the outcome a version is
tagged with, and one alias change as the rollout ledger records it. Plain records, no MLflow import:
the ledger and the MLflow module both use them."""

from __future__ import annotations

import datetime as dt
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Alias(str, Enum):
    CHAMPION = "champion"  # serving
    CHALLENGER = "challenger"  # under canary
    PREVIOUS_CHAMPION = "previous-champion"  # one-step rollback target


class VersionOutcome(str, Enum):
    """Value of the ``fp4roll.outcome`` tag (``registry.tags.OUTCOME``) on a model version."""

    BASELINE = "baseline"
    CHALLENGER = "challenger"
    PROMOTED = "promoted"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"
    RESTORED = "restored"
    REJECTED = "rejected"


class AliasMove(BaseModel):
    """One alias change (a ledger row). ``to_version=None`` means the alias was removed."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    alias: Alias
    from_version: str | None
    to_version: str | None
    reason: str
    moved_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
