"""MLflow fixtures for the registry tests (imported by the test modules that use them, since
tests/registry/conftest.py belongs to the store tests): an embedded SQLite store, a real
``mlflow server``, and
registration requests over tiny fake checkpoints."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry.mlflow_registry import RegistrationMetrics, RegistrationRequest

_counter = itertools.count()


@pytest.fixture(scope="session")
def mlflow_sqlite_uri(tmp_path_factory) -> str:
    """One embedded SQLite tracking/registry store for the session (tests use unique model names)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-embedded') / 'mlflow.db'}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts); its base URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log_path = root / "server.log"
    # no telemetry, no background job runner (7 huey consumers) for a test server
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    with log_path.open("wb") as log:
        # own process group: the CLI starts uvicorn workers, teardown stops the whole group
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not answer /health:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield base_url
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def rest_get(base_url: str, endpoint: str, **query: str) -> dict:
    """GET ``/api/2.0/mlflow/<endpoint>`` with ``query`` and decode the JSON answer."""
    from urllib.parse import urlencode

    url = f"{base_url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def make_request(tmp_path) -> Callable[..., RegistrationRequest]:
    """Build a RegistrationRequest over a fresh tiny fake checkpoint; a unique model name unless
    given. ``payload`` changes the checkpoint bytes (and so the idempotency key)."""

    def build(
        model_name: str | None = None, payload: bytes = b"nvfp4", **overrides
    ) -> RegistrationRequest:
        index = next(_counter)
        checkpoint = tmp_path / f"checkpoint-{index}"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(payload * 64)
        (checkpoint / "config.json").write_text(json.dumps({"quantization_config": {}}))
        calibration_json = tmp_path / f"calibration-{index}.json"
        calibration_json.write_text(json.dumps({"corpus_digest": "ab" * 32}))
        kl_plot = tmp_path / f"kl-{index}.png"
        kl_plot.write_bytes(b"\x89PNG\r\n\x1a\n fake")
        summary = tmp_path / f"summary-{index}.json"
        summary.write_text(json.dumps({"size": 8, "routes": {"chat": 8}}))
        fields = {
            "model_name": model_name or f"model-{os.getpid()}-{index}",
            "source_model": "/models/smollm2-135m",
            "scheme": "nvfp4",
            "block_size": 16,
            "corpus_digest": "ab" * 32,
            "corpus_source": "postgresql://fp4roll:s3cr3t-pw@db.internal:5432/logs",
            "calibration_size": 8,
            "holdout_size": 16,
            "sensitivity_prompts": 4,
            "kl_threshold": 0.05,
            "fallback_layers": ("lm_head", "model.layers.0.mlp.down_proj"),
            "metrics": RegistrationMetrics(
                combined_kl=0.012,
                p99_kl=0.2,
                top1_agreement=0.97,
                delta_perplexity=0.008,
                bytes_before=1000,
                bytes_after=300,
            ),
            "checkpoint_dir": checkpoint,
            "calibration_json": calibration_json,
            "kl_plot": kl_plot,
            "calibration_summary": summary,
            "group_table": (
                {"name": "model.layers.0.self_attn.q_proj+k_proj+v_proj", "mean_kl": 0.004},
                {"name": "model.layers.0.mlp.gate_proj+up_proj", "mean_kl": 0.02, "tier": "bf16"},
            ),
            "code_version": "fp4roll test",
        }
        fields.update(overrides)
        return RegistrationRequest(**fields)

    return build
