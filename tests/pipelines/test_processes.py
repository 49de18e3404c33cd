"""Helper servers run in their own process group and are stopped with everything they spawned."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pipelines.processes import run_until_interrupted, start_group, stop_group


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_with_grandchild(tmp_path) -> tuple[subprocess.Popen, int]:
    pid_file = tmp_path / "grandchild.pid"
    leader = start_group(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the grandchild never started"
        time.sleep(0.05)
    return leader, int(pid_file.read_text())


def _reaped_or_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        try:  # a zombie grandchild of a dead shell is reparented; it is gone once reaped
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().split()[2] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_stop_group_stops_the_grandchildren_too(tmp_path):
    leader, grandchild = _group_with_grandchild(tmp_path)
    assert os.getpgid(leader.pid) == leader.pid != os.getpgid(0)  # its own group
    stop_group(leader, timeout=5)
    assert leader.returncode is not None
    assert _reaped_or_gone(grandchild)
    stop_group(leader, timeout=5)  # twice is harmless


def test_run_until_interrupted_returns_the_first_exit_and_stops_the_rest(tmp_path):
    other, grandchild = _group_with_grandchild(tmp_path)
    quitter = start_group(["sh", "-c", "exit 7"])
    assert run_until_interrupted([other, quitter]) == 7
    assert other.returncode is not None and _reaped_or_gone(grandchild)


@pytest.mark.integration
def test_local_prefect_api_runs_flows_and_stops_its_server(monkeypatch, capfd):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    from pipelines import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started: list[subprocess.Popen] = []
    real_start = prefect_api.start_group
    monkeypatch.setattr(
        prefect_api,
        "start_group",
        lambda *a, **k: started.append(real_start(*a, **k)) or started[-1],
    )

    @flow(name="local-api-probe")
    def probe() -> int:
        return 41 + 1

    with prefect_api.local_prefect_api() as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        assert probe() == 42
        with get_client(sync_client=True) as client:
            assert client.api_url.host == "127.0.0.1" and str(client.api_url).rstrip("/") == url
            runs = client.read_flow_runs()
        assert [r.name for r in runs if r.flow_id] and any(r.state.is_completed() for r in runs)
    (server,) = started
    assert server.returncode is not None  # stopped with the block
    log = prefect_api.server_log_path().read_text()
    assert "database is locked" not in log
    # nothing may be left queued for the stopped server: sending what is left now would fail loudly
    with temporary_settings(updates={PREFECT_API_URL: url}):  # (no ephemeral API meanwhile)
        run_coro_as_sync(prefect_api.drain_client_workers())
    stderr = capfd.readouterr().err
    assert "failed to process item" not in stderr and "Error logging to API" not in stderr
