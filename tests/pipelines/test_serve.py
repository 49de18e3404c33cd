"""`fp4roll serve` against a real `prefect server` on 127.0.0.1: the schedules create runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_schedules_runs_on_a_real_prefect_server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        FP4ROLL_HOME=str(tmp_path / "home"),
    )
    server_log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    served = None
    try:
        _wait_healthy(api, server, timeout=120)
        served = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "serve",
                "--model",
                "served-model",
                "--recalibrate-cron",
                "*/5 * * * *",
                "--drift-cron",
                "0 2 * * *",
            ],
            env={**env, "PREFECT_API_URL": api},
            stdout=open(tmp_path / "serve.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        scheduled: list = []
        names: set[str] = set()
        expected = {"weekly", "daily", "on-demand", "manual"}
        while time.monotonic() < deadline and not (scheduled and expected <= names):
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
            names = {d["name"] for d in deployments}
            weekly = [d for d in deployments if d["name"] == "weekly"]
            if weekly:
                scheduled = httpx.post(
                    f"{api}/flow_runs/filter",
                    json={
                        "deployments": {"id": {"any_": [weekly[0]["id"]]}},
                        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                    },
                    timeout=10,
                ).json()
            time.sleep(1)
        assert expected <= names
        assert scheduled, "no scheduled run of the weekly recalibration"
        assert scheduled[0]["parameters"]["params"]["model_name"] == "served-model"
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
        server_log.close()
