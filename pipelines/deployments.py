"""Deployments of every flow, served from one process (`fp4roll serve`).

Production uses work pools instead (``infra/prefect.yaml``); the schedules and parameters match.
"""

from __future__ import annotations

from typing import Any

from pipelines.params import DriftCheckParams, RecalibrateParams


def deployments(
    *,
    model_name: str,
    source_model: str,
    recalibrate_cron: str | None = "0 3 * * 1",
    drift_cron: str | None = "0 2 * * *",
) -> list[Any]:
    """``RunnerDeployment``s: weekly recalibration, daily drift check, on-demand canary/promote/rollback."""
    from pipelines.flows import (
        canary_flow,
        drift_check_flow,
        promote_flow,
        recalibrate_flow,
        rollback_flow,
    )

    recal = RecalibrateParams(model_name=model_name, source_model=source_model)
    drift = DriftCheckParams(model_name=model_name, recalibrate=recal)
    return [
        recalibrate_flow.to_deployment(
            name="weekly",
            cron=recalibrate_cron,
            parameters={"params": recal.model_dump(mode="json")},
            tags=["fp4roll", "gpu"],
            description="Recalibrate on production logs and register a challenger.",
        ),
        drift_check_flow.to_deployment(
            name="daily",
            cron=drift_cron,
            parameters={"params": drift.model_dump(mode="json")},
            tags=["fp4roll"],
            description="Compare recent logs with the champion's calibration set; recalibrate on drift.",
        ),
        canary_flow.to_deployment(name="on-demand", tags=["fp4roll", "gpu"]),
        promote_flow.to_deployment(name="manual", tags=["fp4roll"]),
        rollback_flow.to_deployment(name="manual", tags=["fp4roll"]),
    ]


def serve_all(**kwargs: Any) -> None:
    """Serve :func:`deployments` until interrupted (needs a Prefect API: $PREFECT_API_URL)."""
    from prefect import serve

    serve(*deployments(**kwargs))
