"""What `fp4roll status` shows: aliases, versions with their quality figures, recent rollouts."""

from __future__ import annotations

import json
from typing import Any

from registry.url_redaction import redact_strings


def model_status(
    model_name: str,
    *,
    db_url: str | None = None,
    tracking_uri: str | None = None,
    rollouts: int = 10,
) -> dict[str, Any]:
    """A JSON-ready snapshot of one registered model (empty lists when nothing is registered yet)."""
    from mlflow.exceptions import MlflowException

    from registry import db, ledger
    from registry.mlflow_registry import OUTCOME_TAG, client_for

    client, _ = client_for(tracking_uri)
    try:
        registered = client.get_registered_model(model_name)
        aliases = {alias: str(v) for alias, v in (registered.aliases or {}).items()}
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        aliases, versions = {}, []
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        tags = dict(mv.tags or {})
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = client.get_run(mv.run_id).data.metrics
            except MlflowException:
                metrics = {}
        fallback = tags.get("fp4roll.fallback_layers")
        rows.append(
            {
                "version": str(mv.version),
                "scheme": tags.get("fp4roll.scheme", ""),
                "combined_kl": metrics.get("combined_kl"),
                "top1_agreement": metrics.get("top1_agreement"),
                "fallback_count": len(json.loads(fallback)) if fallback else None,
                "corpus_digest": tags.get("fp4roll.corpus_digest"),
                "outcome": tags.get(OUTCOME_TAG),
                "source": mv.source,
            }
        )
    db.upgrade(db_url)
    recent = sorted(ledger.rollouts(model_name, db_url=db_url), key=lambda r: r.id, reverse=True)[
        :rollouts
    ]
    return redact_strings(
        {
            "model_name": model_name,
            "aliases": aliases,
            "versions": rows,
            "rollouts": [
                {
                    "id": r.id,
                    "candidate_version": r.candidate_version,
                    "baseline_version": r.baseline_version,
                    "status": r.status.value,
                    "stages": list(r.stages),
                    "current_stage": r.current_stage,
                    "reason": r.reason,
                    "updated_at": r.updated_at.isoformat(),
                }
                for r in recent
            ],
        }
    )
