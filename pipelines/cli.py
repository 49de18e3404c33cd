"""The ``fp4roll`` command line.

Each command group lives in its own module (``pipelines/cli_*.py``) and is registered here, so the
groups can grow independently. Commands call plain library functions; flows are used only where a
command is a pipeline run. Commands import what they run inside their function: Prefect, torch and
MLflow each take seconds to import, which ``fp4roll --help`` and every other command would pay.
"""

from __future__ import annotations

import logging
import os

# Before torch is imported: OpenMP threads that spin while waiting make torch several times slower
# whenever another process (a Prefect or MLflow server, a second flow) shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Before prefect is imported: the Prefect API a flow command starts for itself (the ephemeral one
# when $PREFECT_API_URL is unset) sends no analytics and reports no errors about failing to.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer

app = typer.Typer(
    name="fp4roll",
    help=(
        "Take an LLM to NVFP4, calibrated on your production prompt logs, and roll it out safely.\n\n"
        "State lives under $FP4ROLL_HOME (default ~/.fp4roll): a SQLite store, MLflow runs and "
        "checkpoints. Point FP4ROLL_DB_URL at PostgreSQL for production."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    from registry.url_redaction import install_log_redaction

    install_log_redaction()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # every Prefect API call is an INFO line from httpx
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _register() -> None:
    from pipelines import cli_flows, cli_logs, cli_pack

    cli_flows.register(app)
    cli_pack.register(app)
    cli_logs.register(app)


_register()


def main() -> None:
    """Run the CLI; an unexpected error prints its traceback through the URL redactor (the
    message of a driver or HTTP error may hold the URL it failed on)."""
    import sys
    import traceback

    from registry.url_redaction import redact_urls

    try:
        app()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - printed redacted, exit status 1
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(redact_urls(text))
        sys.exit(1)


if __name__ == "__main__":
    main()
