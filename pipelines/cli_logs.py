"""`fp4roll logs ...` (import, sample, drift, sets) and `fp4roll db upgrade`.

Exit codes:

* ``logs import`` / ``logs import-sql``: 0 every line valid; 2 partial success (some bad lines,
  every valid line stored); 1 nothing valid.
* ``logs drift``: 0 no drift; 3 drift detected; 4 inconclusive (too few prompts).
* ``logs purge``: 0 (a dry run unless ``--yes``); 1 on bad filters.
* any command: 1 on bad input (unknown digest, empty window, ...), with the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pipelines.cli_options import options_command
from pipelines.params import SampleParams

if TYPE_CHECKING:
    from registry.prompt_logs import ImportReport

logger = logging.getLogger(__name__)
console = Console()
err_console = Console(stderr=True)

logs_app = typer.Typer(
    name="logs",
    help="Production prompt logs: import, calibration sampling, drift.",
    no_args_is_help=True,
)
db_app = typer.Typer(
    name="db", help="The fp4roll store (SQLite or PostgreSQL).", no_args_is_help=True
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL (default: $FP4ROLL_DB_URL or sqlite under $FP4ROLL_HOME).",
        show_default=False,
    ),
]
MAX_BAD_LINES_SHOWN = 20


def _parse_time(value: str | None, option: str) -> dt.datetime | None:
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 date/time", param_hint=option
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _fail(message: str) -> None:
    from registry.url_redaction import redact_urls

    err_console.print(f"[red]error:[/red] {redact_urls(message)}", highlight=False)
    raise typer.Exit(1)


def _print_report(report: ImportReport) -> None:
    table = Table(title="Import", show_header=False)
    table.add_row("sources", str(len(report.sources)))
    table.add_row("lines read", f"{report.lines:,}")
    table.add_row("new prompts", f"{report.imported:,}")
    table.add_row("duplicates (already stored)", f"{report.duplicates:,}")
    table.add_row("bad lines", f"{report.bad:,}")
    if report.missing_timestamps:
        table.add_row("no timestamp (import time used)", f"{report.missing_timestamps:,}")
    table.add_row("time", f"{report.elapsed_seconds:.2f} s")
    console.print(table)
    for bad in report.bad_lines[:MAX_BAD_LINES_SHOWN]:
        err_console.print(f"[yellow]bad line[/yellow] {bad}", highlight=False, soft_wrap=True)
    if report.bad > MAX_BAD_LINES_SHOWN:
        err_console.print(f"… and {report.bad - MAX_BAD_LINES_SHOWN} more bad lines")
    status = {0: "[green]all lines imported[/green]", 2: "[yellow]partial success[/yellow]"}
    console.print(status.get(report.exit_code, "[red]nothing valid imported[/red]"))


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


@logs_app.command("import")
def import_cmd(
    files: Annotated[
        list[Path],
        typer.Argument(help="JSONL files (gzip detected automatically).", show_default=False),
    ],
    db: DbOption = None,
    max_line_bytes: Annotated[
        int, typer.Option(help="Lines longer than this are reported as bad.", min=1)
    ] = 1 << 20,
    redact: Annotated[
        bool,
        typer.Option(help="Redact the new prompts once and store the result beside them."),
    ] = True,
) -> None:
    """Import prompt logs (OpenAI chat requests or {"prompt": ...} lines); re-imports add nothing."""
    from pipelines.prompt_logs import import_logs
    from registry.db import SchemaOutdatedError

    tasks: dict[str, int] = {}
    with _progress() as progress:

        def on_progress(source: str, done: int, total: int) -> None:
            if source not in tasks:
                tasks[source] = progress.add_task(Path(source).name, total=total)
            progress.update(tasks[source], completed=done)

        try:
            report = import_logs(files, db, max_line_bytes=max_line_bytes, on_progress=on_progress)
        except SchemaOutdatedError as exc:
            _fail(str(exc))
    _print_report(report)
    if redact and report.imported:
        # Redact each new prompt once, now, and keep the result beside it (see store_redactions).
        from calibration.redaction import REDACTOR_VERSION
        from pipelines.prompt_logs import store_redactions

        with err_console.status("redacting the new prompts"):
            done = store_redactions(db)
        console.print(f"stored redactions of {done:,} prompts ({REDACTOR_VERSION})")
    raise typer.Exit(report.exit_code)


@logs_app.command("import-sql")
def import_sql_cmd(
    source_url: Annotated[str, typer.Argument(help="SQLAlchemy URL of the source database.")],
    table: Annotated[str, typer.Option("--table", help="Source table ([schema.]table).")],
    mapping: Annotated[
        list[str],
        typer.Option(
            "--map",
            help="COLUMN=FIELD, FIELD in messages, prompt, route, model, timestamp (repeatable).",
        ),
    ],
    db: DbOption = None,
) -> None:
    """Import prompts from an existing SQL table by column mapping."""
    from registry import db as store_db
    from registry.prompt_logs import import_sql, parse_column_mapping

    try:
        fields = parse_column_mapping(mapping)
    except ValueError as exc:
        _fail(str(exc))
    try:
        store_db.ensure_schema(db)
        report = import_sql(source_url, table, fields, db)
    except (ValueError, store_db.SchemaOutdatedError) as exc:
        _fail(str(exc))
    _print_report(report)
    raise typer.Exit(report.exit_code)


def _summary_table(title: str, summary: dict) -> Table:
    roles = [r for r in ("calibration", "sensitivity", "holdout") if r in summary]
    table = Table(title=title)
    table.add_column("route")
    for role in roles:
        table.add_column(role, justify="right")
    routes = sorted({route for role in roles for route in summary[role]["routes"]})
    for route in routes:
        table.add_row(route, *(str(summary[role]["routes"].get(route, 0)) for role in roles))
    table.add_section()
    for bucket in summary["length_buckets"]:
        table.add_row(
            f"length {bucket} tokens",
            *(str(summary[role]["length_histogram"].get(bucket, 0)) for role in roles),
        )
    table.add_section()
    table.add_row("total", *(str(summary[role]["count"]) for role in roles))
    return table


def _sample(params: SampleParams, *, json_out: bool = False) -> None:
    from calibration.models import load_tokenizer
    from calibration.prompts import PromptRenderer
    from calibration.sampling import NotEnoughPromptsError
    from pipelines.prompt_logs import sample_and_store
    from pipelines.steps import resolve_source_model
    from registry.db import SchemaOutdatedError

    try:
        tokenizer = load_tokenizer(resolve_source_model(params.source_model))
        if tokenizer is None:
            _fail(f"{params.source_model} has no tokenizer to render prompts with")
        outcome = sample_and_store(params.sampling, PromptRenderer(tokenizer), params.db_url)
    except (NotEnoughPromptsError, ValueError, SchemaOutdatedError) as exc:
        _fail(str(exc))
    if json_out:
        payload = {
            "digest": outcome.digest,
            "created": outcome.created,
            "size": outcome.size,
            "sensitivity_size": outcome.sensitivity_size,
            "holdout_size": outcome.holdout_size,
            "summary": outcome.summary,
        }
        typer.echo(json.dumps(payload, indent=2))  # plain: machine-readable, never wrapped
        return
    console.print(_summary_table("Calibration set", outcome.summary))
    summary = outcome.summary
    console.print(
        f"{summary['input_prompts']} prompts in window; removed {summary['exact_duplicates_removed']} "
        f"exact and {summary['near_duplicates_removed']} near duplicates; redacted "
        f"{sum(summary['redactions'].values())} PII spans {summary['redactions']}"
    )
    state = "stored" if outcome.created else "already stored"
    console.print(f"digest [bold]{outcome.digest}[/bold] ({state})", soft_wrap=True)


logs_app.command("sample")(
    options_command(
        SampleParams,
        _sample,
        flags={"db_url": ("--db",), "source_model": ("--source",), "routes": ("--route",)},
        extra={"json_out": (bool, False, typer.Option("--json", help="Print the result as JSON."))},
    )
)


@logs_app.command("sets")
def sets_cmd(db: DbOption = None) -> None:
    """List stored calibration sets, newest first."""
    from registry import db as store_db
    from registry.prompt_logs import list_calibration_sets

    try:
        store_db.require_schema(db)
    except store_db.SchemaOutdatedError as exc:
        _fail(str(exc))

    table = Table(title="Calibration sets")
    table.add_column("digest", no_wrap=True)
    for column in ("created", "size", "holdout", "seed", "window"):
        table.add_column(column)
    for s in list_calibration_sets(db):
        window = f"{s.filters.get('since') or '…'} → {s.filters.get('until') or '…'}"
        table.add_row(
            s.digest[:16],
            s.created_at.strftime("%Y-%m-%d %H:%M"),
            str(s.size),
            str(s.holdout_size),
            str(s.seed),
            window,
        )
    console.print(table)


@logs_app.command("drift")
def drift_cmd(
    set_digest: Annotated[
        str, typer.Option("--set", help="Calibration set digest (or a prefix of >= 6 characters).")
    ],
    since: Annotated[
        str | None,
        typer.Option(help="Recent window start (default: 7 days before the newest log)."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Recent window end (exclusive).")] = None,
    js_threshold: Annotated[float, typer.Option(help="Token JS distance threshold.")] = 0.1,
    psi_threshold: Annotated[float, typer.Option(help="PSI threshold.")] = 0.2,
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Compare recent logs with a calibration set (exit 0 no drift, 3 drift, 4 inconclusive)."""
    from pipelines.prompt_logs import DriftParameters, check_drift
    from registry.db import SchemaOutdatedError

    try:
        params = DriftParameters(
            calibration_set=set_digest,
            since=_parse_time(since, "--since"),
            until=_parse_time(until, "--until"),
            js_threshold=js_threshold,
            psi_threshold=psi_threshold,
        )
        verdict = check_drift(params, db)
    except (LookupError, ValueError, SchemaOutdatedError) as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps(verdict.as_dict(), indent=2))
    else:
        table = Table(title=f"Drift vs {set_digest[:12]}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("threshold", justify="right")
        limits = {"token_js": params.js_threshold}
        for name, value in verdict.metrics.items():
            table.add_row(name, f"{value:.4f}", str(limits.get(name, params.psi_threshold)))
        console.print(table)
        console.print(f"reference {verdict.n_reference} prompts, recent {verdict.n_recent} prompts")
        for reason in verdict.reasons:
            console.print(f"- {reason}")
        label = (
            "inconclusive" if verdict.inconclusive else ("DRIFT" if verdict.drifted else "no drift")
        )
        console.print(f"verdict: [bold]{label}[/bold]")
    raise typer.Exit(4 if verdict.inconclusive else (3 if verdict.drifted else 0))


@logs_app.command("purge")
def purge_cmd(
    before: Annotated[
        str | None, typer.Option(help="Erase prompts received before this time (ISO 8601).")
    ] = None,
    route: Annotated[
        list[str] | None, typer.Option("--route", help="Erase prompts of this route (repeatable).")
    ] = None,
    matching: Annotated[
        str | None,
        typer.Option(
            "--matching",
            help="Erase prompts whose text contains this (case-insensitive; never printed or logged).",
            show_default=False,
        ),
    ] = None,
    regex: Annotated[
        bool, typer.Option("--regex", help="--matching is a regular expression.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Erase (without it: a dry run that counts).")
    ] = False,
    db: DbOption = None,
) -> None:
    """Erase raw prompt text (filters combine with AND). Calibration sets keep their digests and
    redacted members. Without --yes nothing changes: the counts of what would be erased."""
    from pydantic import ValidationError

    from pipelines.prompt_logs import PurgeParameters, purge_logs
    from registry.db import SchemaOutdatedError

    try:
        params = PurgeParameters(
            before=_parse_time(before, "--before"),
            routes=tuple(route) if route else None,
            matching=matching,
            regex=regex,
            dry_run=not yes,
        )
        report = purge_logs(params, db)
    except ValidationError as exc:
        _fail("; ".join(error["msg"] for error in exc.errors()))  # messages only, never the input
    except (ValueError, SchemaOutdatedError) as exc:
        _fail(str(exc))
    table = Table(
        title="Purge (dry run: nothing erased)" if report.dry_run else "Purge", show_header=False
    )
    table.add_row("prompts selected", f"{report.selected:,}")
    table.add_row(
        "  of which in calibration sets (redacted copies kept)", f"{report.in_calibration_sets:,}"
    )
    table.add_row("already purged", f"{report.already_purged:,}")
    table.add_row("erased now", f"{report.purged:,}")
    console.print(table)
    if report.dry_run and report.selected:
        console.print("run again with [bold]--yes[/bold] to erase the raw text of these prompts")


@db_app.command("upgrade")
def db_upgrade_cmd(
    db: DbOption = None,
    revision: Annotated[str, typer.Option(help="Target Alembic revision.")] = "head",
) -> None:
    """Create or migrate the store's schema (idempotent)."""
    from registry import db as store_db

    try:
        current = store_db.upgrade(db, revision)
    except Exception as exc:  # noqa: BLE001 - report any driver error without a traceback
        _fail(f"cannot migrate {store_db.safe_url(db)}: {type(exc).__name__}: {exc}")
    console.print(f"{store_db.safe_url(db)} at revision [bold]{current}[/bold]")


@db_app.command("current")
def db_current_cmd(db: DbOption = None) -> None:
    """Print the store's schema revision and the newest shipped one."""
    from registry import db as store_db

    console.print(
        f"{store_db.safe_url(db)}: revision {store_db.current_revision(db)} "
        f"(newest {store_db.head_revision()})"
    )


def register(app: typer.Typer) -> None:
    """Add the ``logs`` and ``db`` command groups to the root CLI."""
    app.add_typer(logs_app, name="logs")
    app.add_typer(db_app, name="db")
