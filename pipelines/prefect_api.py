"""A local Prefect API for the commands that run flows on one machine (``fp4roll demo``).

Without ``$PREFECT_API_URL`` Prefect starts an *ephemeral* API inside the flow's own process; under load
(a KL sweep on every core) its SQLite store prints "database is locked" tracebacks into the command's
output, and its telemetry service reports errors when the machine is offline. Instead this starts
``prefect server start`` as a separate process group on a free port, with telemetry off, its output
in ``$FP4ROLL_HOME/logs/prefect-server.log``, and stops it (and everything it spawned) when the block
ends. The server uses Prefect's usual database under ``$PREFECT_HOME``, so ``prefect server start``
afterwards shows the same flow runs.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from pipelines.processes import free_port, start_group, stop_group, wait_for_http
from registry.db import fp4roll_home

logger = logging.getLogger(__name__)

#: Environment of the server process: no analytics, no orchestration telemetry.
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
}


def prefect_executable() -> str:
    """The ``prefect`` command of this interpreter's environment."""
    return shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"


def server_command(port: int, *, ui: bool) -> list[str]:
    """``prefect server start`` on 127.0.0.1:``port``, analytics off (its env: :data:`TELEMETRY_OFF`)."""
    cmd = [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return [*cmd, "--analytics-off", "--ui" if ui else "--no-ui"]


def server_env() -> dict[str, str]:
    return {**os.environ, **TELEMETRY_OFF}


def server_log_path() -> Path:
    return fp4roll_home() / "logs" / "prefect-server.log"


@contextmanager
def local_prefect_api(*, startup_timeout: float = 120.0) -> Iterator[str]:
    """Yield the API URL flows in this block use: ``$PREFECT_API_URL`` when set, otherwise a local
    server started for the block (see the module doc) and stopped after it."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = server_log_path()
    server = start_group(server_command(port, ui=False), log_path=log_path, env=server_env())
    try:
        wait_for_http(f"{url}/health", server, timeout=startup_timeout)
        logger.info("local Prefect API at %s (log: %s)", url, log_path)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                run_coro_as_sync(drain_client_workers())
    finally:
        stop_group(server)


async def drain_client_workers() -> None:
    """Send the logs and events this process still queues (heartbeats, state events) while the
    API is up, so no "failed to process item" errors follow once it stops (what Prefect's own
    test harness does before stopping its server)."""
    try:
        drained = APILogWorker.instance().drain()
        if inspect.isawaitable(drained):
            await drained
    except RuntimeError:  # the log worker never started
        pass
    drained = EventsWorker.drain_all()
    if inspect.isawaitable(drained):
        await drained
