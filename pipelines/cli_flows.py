"""`fp4roll demo | recalibrate | canary | promote | rollback | status | drift-check | serve | ui`.

Every pipeline command runs its Prefect flow in this process (against ``$PREFECT_API_URL`` when set,
otherwise a temporary local API), with the same parameter models the Prefect UI shows as forms.

Flows are imported inside the commands that run them: importing ``pipelines.flows`` (Prefect, torch)
takes ~4 s on this machine, which every ``fp4roll --help`` and ``fp4roll logs ...`` would pay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from pipelines.cli_options import credentials_to_environment, options_command
from pipelines.demo_live import LiveCandidate
from pipelines.params import (
    DEFAULT_MODEL_NAME,
    PACKAGED_SMOLLM2,
    CanaryParams,
    DriftCheckParams,
    PromoteParams,
    RecalibrateParams,
    RollbackParams,
    RouterKind,
)
from pipelines.render import print_stages, print_status
from pipelines.results import CanaryOutcome
from registry.url_redaction import redact_strings, redact_urls

ParamsT = TypeVar("ParamsT", bound=BaseModel)

# Wide enough for the status tables when output is piped (rich falls back to 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Registered model name.")]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Store URL (default: $FP4ROLL_DB_URL or SQLite under $FP4ROLL_HOME)."
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or SQLite under $FP4ROLL_HOME).",
    ),
]


def _params(model: type[ParamsT], **values: Any) -> ParamsT:
    """Build a flow parameter model, turning validation errors into a clean CLI error."""
    values = credentials_to_environment({k: v for k, v in values.items() if v is not None})
    try:
        return model(**values)
    except ValidationError as exc:
        err_console.print(f"[red]invalid parameters:[/red]\n{exc}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A gate's refusal or an integrity failure is a clean CLI error (exit 4), not a traceback."""
    from registry.guards import ManualActionRefused
    from registry.integrity import IntegrityError

    try:
        yield
    except (ManualActionRefused, IntegrityError) as exc:
        err_console.print(f"[red]{type(exc).__name__}:[/red] {exc}", highlight=False)
        raise typer.Exit(4) from None


def _print_json(payload: BaseModel | Sequence[BaseModel]) -> None:
    """A flow's typed result (or a sequence of them) as JSON, through the one URL redactor."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump(mode="json")
    else:
        data = [item.model_dump(mode="json") for item in payload]
    console.print_json(json.dumps(redact_strings(data)))


# ---------------------------------------------------------------------------------------- commands


def _run_recalibrate(params: RecalibrateParams) -> None:
    from pipelines.flows import recalibrate_flow

    _print_json(recalibrate_flow(params))


#: ``fp4roll recalibrate``: one option per field of RecalibrateParams (its sampling and calibration
#: configs flattened), defaults and help text from the model.
recalibrate = options_command(
    RecalibrateParams,
    _run_recalibrate,
    flags={
        "model_name": ("--model", "-m"),
        "source_model": ("--source",),
        "db_url": ("--db",),
    },
)


def _run_canary(params: CanaryParams, *, policy: Path | None = None) -> None:
    from pipelines.flows import canary_flow

    if policy is not None:
        params = _params(
            CanaryParams,
            **{
                **params.model_dump(exclude_unset=True),
                "gate_policy": json.loads(policy.read_text()),
            },
        )
    result = canary_flow(params)
    weights = None
    if params.live is not None and params.live.router is RouterKind.NGINX:
        from pipelines.rollout import gateway_weights

        weights = gateway_weights(result.rollout_id, params.db_url)
    print_stages(console, result, gateway_weights=weights)
    _exit_for(result.outcome)


def _exit_for(outcome: CanaryOutcome) -> None:
    """Exit 3 when the canary rolled the candidate back (``fp4roll canary``, ``fp4roll demo --live``)."""
    if outcome is CanaryOutcome.ROLLED_BACK:
        raise typer.Exit(3)


#: ``fp4roll canary``: one option per field of CanaryParams, the live-endpoint fields
#: (LiveCanaryParams) flattened: giving any of them (``--candidate-url`` ...) runs the live canary.
canary = options_command(
    CanaryParams,
    _run_canary,
    flags={
        "model_name": ("--model", "-m"),
        "candidate_version": ("--candidate",),
        "baseline_version": ("--baseline",),
        "db_url": ("--db",),
    },
    exclude=("gate_policy", "fail_after_stage"),
    extra={
        "policy": (
            Path | None,
            None,
            typer.Option(help="JSON file of gate-policy overrides (GatePolicyOverrides)."),
        )
    },
    doc="Staged canary of the challenger against the champion; promote, or roll back "
    "automatically (exit 3). In process by default; the --baseline-url / --candidate-url options "
    "run it against live OpenAI-compatible endpoints, with --router nginx setting the "
    "candidate's weight at a running gateway per stage.",
)


def promote(
    model: ModelOption = DEFAULT_MODEL_NAME,
    version: Annotated[str | None, typer.Option(help="Version (default: challenger).")] = None,
    reason: Annotated[
        str | None,
        typer.Option(help="Kept in the ledger and on the version (required with --force)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Promote a rejected, failed or never-canaried version, or during an active "
            "rollout (needs --reason; recorded in the ledger).",
        ),
    ] = False,
    db: DbOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Make a version the champion (old champion → previous-champion). Refused for a version that
    did not pass a canary, or during an active rollout, unless --force --reason."""
    from pipelines.flows import promote_flow

    with _refusals():
        moves = promote_flow(
            _params(
                PromoteParams,
                model_name=model,
                version=version,
                reason=reason,
                force=force,
                db_url=db,
                tracking_uri=tracking_uri,
            )
        )
    _print_json(moves)


def rollback(
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger and on the version).")],
    model: ModelOption = DEFAULT_MODEL_NAME,
    to_version: Annotated[
        str | None, typer.Option(help="Version (default: previous-champion).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Roll back to a rejected or rolled-back version (recorded)."),
    ] = False,
    db: DbOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Put the previous champion (or a named version) back as champion. A rejected or
    rolled-back target is refused unless --force."""
    from pipelines.flows import rollback_flow

    with _refusals():
        moves = rollback_flow(
            _params(
                RollbackParams,
                model_name=model,
                to_version=to_version,
                reason=reason,
                force=force,
                db_url=db,
                tracking_uri=tracking_uri,
            )
        )
    _print_json(moves)


def drift_check(
    model: ModelOption = DEFAULT_MODEL_NAME,
    calibration_set: Annotated[
        str | None, typer.Option(help="Digest (default: the champion's).")
    ] = None,
    window_days: Annotated[
        float, typer.Option(help="Recent window, in days before the newest log.")
    ] = 7.0,
    recalibrate_on_drift: Annotated[
        bool, typer.Option(help="Run recalibrate when drift is confirmed.")
    ] = False,
    db: DbOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Compare recent logs with the calibration set; optionally recalibrate on drift."""
    from pipelines.flows import drift_check_flow

    params = _params(
        DriftCheckParams,
        model_name=model,
        calibration_digest=calibration_set,
        window_days=window_days,
        recalibrate_on_drift=recalibrate_on_drift,
        db_url=db,
        tracking_uri=tracking_uri,
    )
    verdict = drift_check_flow(params)
    _print_json(verdict)
    raise typer.Exit(3 if verdict.drifted else 0)


def status(
    model: ModelOption = DEFAULT_MODEL_NAME,
    db: DbOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Aliases, versions (scheme, KL, corpus digest) and recent rollouts of a model."""
    from pipelines.status import model_status
    from registry.db import SchemaOutdatedError

    try:
        status = model_status(model, db_url=db, tracking_uri=tracking_uri)
    except SchemaOutdatedError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print_status(console, status)


def serve(
    model: ModelOption = DEFAULT_MODEL_NAME,
    source: Annotated[str, typer.Option(help="Model folder or 'smollm2'.")] = PACKAGED_SMOLLM2,
    recalibrate_cron: Annotated[
        str, typer.Option(help="Cron (UTC) of the recalibration.")
    ] = "0 3 * * 1",
    drift_cron: Annotated[str, typer.Option(help="Cron (UTC) of the drift check.")] = "0 2 * * *",
) -> None:
    """Serve every flow as a deployment with schedules (weekly recalibration, daily drift check)
    against the Prefect API in $PREFECT_API_URL. Runs until interrupted."""
    from pipelines.deployments import serve_all

    serve_all(
        model_name=model,
        source_model=source,
        recalibrate_cron=recalibrate_cron,
        drift_cron=drift_cron,
    )


def ui(
    port: Annotated[int, typer.Option(help="MLflow UI port on 127.0.0.1.")] = 5000,
    prefect_port: Annotated[
        int, typer.Option(help="Prefect UI port on 127.0.0.1 (0: no Prefect UI).")
    ] = 4200,
    tracking_uri: TrackingOption = None,
) -> None:
    """Open the MLflow UI over the embedded store (runs, metrics, artifacts, versions, aliases) and the
    Prefect UI (flow runs, artifacts). Runs until Ctrl+C, then stops every process it started."""
    from pipelines.prefect_api import server_command, server_env
    from pipelines.processes import run_until_interrupted, start_group
    from registry.mlflow_registry import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    procs = []
    if uri.startswith(("http://", "https://")):
        console.print(f"MLflow server: {redact_urls(uri)}")
    else:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
        procs.append(start_group(cmd))
        console.print(f"MLflow UI on http://127.0.0.1:{port}")
    if os.environ.get("PREFECT_API_URL"):
        console.print(f"Prefect server: {redact_urls(os.environ['PREFECT_API_URL'])}")
    elif prefect_port:
        procs.append(start_group(server_command(prefect_port, ui=True), env=server_env()))
        console.print(f"Prefect UI on http://127.0.0.1:{prefect_port}")
    if not procs:
        return
    console.print("Ctrl+C to stop")
    raise typer.Exit(run_until_interrupted(procs))


def demo(
    model: ModelOption = DEFAULT_MODEL_NAME,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Run the canary flow against live endpoints instead: llama.cpp servers on the "
            "packaged GGUF and a requantized candidate, nginx in front, MLflow versions in "
            "$FP4ROLL_HOME/live-demo (needs the `serving` extra and nginx). Exit 3 = rolled back.",
        ),
    ] = False,
    candidate: Annotated[
        LiveCandidate | None,
        typer.Option(
            help="With --live: Q8_0 (promoted), Q2_K (rolled back) or AA (the baseline itself, "
            "the noise floor). Default Q8_0."
        ),
    ] = None,
) -> None:
    """The whole pipeline on embedded defaults: import the shipped logs into SQLite, prepare SmolLM2,
    recalibrate, canary, promote, then print the summary and how to open the MLflow and Prefect UIs.
    With --live: the canary flow against llama.cpp servers behind nginx."""
    if not live:
        if candidate is not None:
            err_console.print("[red]--candidate needs --live[/red]")
            raise typer.Exit(2)
        from pipelines.demo import run_demo

        run_demo(model_name=model, console=console)
        return
    from pipelines.demo_live import live_demo_missing_reason, run_live_demo

    missing = live_demo_missing_reason()
    if missing:
        err_console.print(f"[red]fp4roll demo --live cannot run here:[/red] {missing}")
        raise typer.Exit(2)
    record = run_live_demo(
        model_name=model, candidate=candidate or LiveCandidate.Q8_0, console=console
    )
    _exit_for(record.outcome)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("recalibrate")(recalibrate)
    app.command("canary")(canary)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("status")(status)
    app.command("drift-check")(drift_check)
    app.command("serve")(serve)
    app.command("ui")(ui)
