"""Helper servers a command starts and must stop: each runs in its own process group, so stopping it
stops everything it spawned (``mlflow ui`` starts a uvicorn/gunicorn, ``prefect server start`` its
services), on Ctrl+C, on SIGTERM, or when the command ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_group(
    cmd: Sequence[str], *, log_path: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group (stdout+stderr to ``log_path``, or
    inherited when None)."""
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
    try:
        return subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    finally:
        if log is not None:
            log.close()  # the child has its own descriptor


def stop_group(proc: subprocess.Popen, *, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (a :func:`start_group` leader), SIGKILL it after
    ``timeout`` seconds. Safe to call twice."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            break
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader exited; children of the group may still be stopping
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    proc.poll()


def wait_for_http(url: str, proc: subprocess.Popen, *, timeout: float) -> None:
    """Poll ``url`` until it answers 200; raise if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def run_until_interrupted(procs: Sequence[subprocess.Popen]) -> int:
    """Wait until one of ``procs`` exits, Ctrl+C or SIGTERM; then stop every process group.
    Returns the exit code of the process that exited first (0 when interrupted)."""

    def _terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    return proc.returncode
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            stop_group(proc)
