"""What `fp4roll status` shows: aliases, versions with their quality figures, recent rollouts.

Read only: it reads the registry through its functions and never migrates the store
(``registry.db.require_schema`` says which command to run when the schema is missing or old).
"""

from __future__ import annotations

from pipelines.results import ModelStatus, RolloutSummary
from registry import db, ledger
from registry.mlflow_registry import RegistryError, aliases
from registry.url_redaction import redact_strings
from registry.versions import version_summaries


def model_status(
    model_name: str,
    *,
    db_url: str | None = None,
    tracking_uri: str | None = None,
    rollouts: int = 10,
) -> ModelStatus:
    """A snapshot of one registered model (empty when nothing is registered yet). Raises
    ``registry.db.SchemaOutdatedError`` when the store has no schema, or an old one."""
    try:
        current = aliases(model_name, tracking_uri=tracking_uri)
    except RegistryError:  # not registered yet
        current = {}
    db.require_schema(db_url)
    recent = sorted(ledger.rollouts(model_name, db_url=db_url), key=lambda r: r.id, reverse=True)
    status = ModelStatus(
        model_name=model_name,
        aliases=current,
        versions=tuple(version_summaries(model_name, tracking_uri=tracking_uri)),
        rollouts=tuple(
            RolloutSummary(
                id=r.id,
                candidate_version=r.candidate_version,
                baseline_version=r.baseline_version,
                status=r.status.value,
                stages=tuple(r.stages),
                current_stage=r.current_stage,
                reason=r.reason,
                updated_at=r.updated_at.isoformat(),
            )
            for r in recent[:rollouts]
        ),
    )
    # through the one URL redactor: version sources and rollout reasons may hold URLs
    return ModelStatus.model_validate(redact_strings(status.model_dump(mode="json")))
