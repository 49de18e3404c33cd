"""Console tables of flow results, shared by the CLI commands and `fp4roll demo`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from pipelines.results import CanaryRecord, ModelStatus


def print_stages(
    console: Console,
    result: CanaryRecord,
    gateway_weights: Mapping[int, Sequence[float]] | None = None,
) -> None:
    """The canary's stages: traffic, requests, judge outcome and decision, score, failed metrics;
    with ``gateway_weights`` (stage -> weights read back from the gateway, in order) a column of
    those (``10 → 0 %``: the stage rolled back)."""
    table = Table(
        title=f"canary of v{result.candidate_version} vs v{result.baseline_version}: "
        f"{result.outcome.value}"
    )
    columns = ["stage", "traffic"]
    if gateway_weights is not None:
        columns.append("weight at gateway")
    for column in (
        *columns,
        "requests",
        "outcome",
        "decision",
        "score",
        "failed metrics",
    ):
        table.add_column(column)
    for s in result.stages:
        read_back = []
        if gateway_weights is not None:
            weights = gateway_weights.get(s.stage_index, ())
            read_back = [" → ".join(f"{w:g}" for w in weights) + " %" if weights else "-"]
        table.add_row(
            str(s.stage_index),
            f"{s.traffic_percent:g} %",
            *read_back,
            str(s.requests),
            s.outcome.value,
            s.decision.value,
            f"{s.score:.1f}",
            ", ".join(s.failed_metrics) or "-",
        )
    console.print(table)


def print_status(console: Console, status: ModelStatus) -> None:
    """Versions with aliases and quality figures, then the recent rollouts."""
    aliases = status.aliases
    table = Table(title=f"{status.model_name}: versions")
    for column in (
        "version",
        "aliases",
        "scheme",
        "combined KL",
        "top-1",
        "BF16 layers",
        "corpus",
        "outcome",
    ):
        table.add_column(column)
    for v in status.versions:
        names = ", ".join(a for a, ver in aliases.items() if ver == v.version)
        table.add_row(
            v.version,
            names,
            v.scheme,
            "" if v.combined_kl is None else f"{v.combined_kl:.4f}",
            "" if v.top1_agreement is None else f"{v.top1_agreement:.3f}",
            "" if v.fallback_count is None else str(v.fallback_count),
            (v.corpus_digest or "")[:12],
            v.outcome or "",
        )
    console.print(table)
    rollouts = Table(title="recent rollouts")
    for column in ("id", "candidate", "baseline", "status", "stage", "reason", "updated"):
        rollouts.add_column(column)
    for r in status.rollouts:
        rollouts.add_row(
            str(r.id),
            r.candidate_version,
            r.baseline_version or "",
            r.status,
            f"{r.current_stage + 1}/{len(r.stages)}",
            (r.reason or "")[:80],
            r.updated_at[:19],
        )
    console.print(rollouts)
