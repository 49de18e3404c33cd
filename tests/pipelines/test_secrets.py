# ruff: noqa: F811 - pytest fixtures imported from tests/registry/mlflow_fixtures.py
"""Credentials in URLs never reach an output surface.

A user:token planted in MLFLOW_TRACKING_URI (a real ``mlflow server``) and a password in the
PostgreSQL store URL (FP4ROLL_DB_URL; the test server trusts, so the password is ignored but kept in
the URL) go through the canary (an error whose text holds both URLs, then a passing run), a refused
and a forced manual promotion, a rollback and ``fp4roll status``; then every surface is grepped for
the secrets: stdout/stderr of the CLI, log records, Prefect artifacts and flow-run parameters,
every text column of the ledger, the status JSON.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from tests.pipelines.rollout_fixtures import STAGES, record_stage, register_baseline_and_challenger
from tests.registry.mlflow_fixtures import mlflow_server  # noqa: F401

pytestmark = pytest.mark.integration

ML_TOKEN = "mltok-7f3a9c"
DB_TOKEN = "dbpw-5e1b2d"
SECRETS = (ML_TOKEN, DB_TOKEN)


def _clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}:\n{text[:2000]}"


@pytest.fixture
def secret_env(postgres_url, mlflow_server, monkeypatch, tmp_path):
    schema = f"fp4roll_secret_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    db_url = (
        sa.engine.make_url(postgres_url)
        .set(password=DB_TOKEN)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    tracking = mlflow_server.replace("http://", f"http://fp4roll:{ML_TOKEN}@")
    monkeypatch.setenv("FP4ROLL_DB_URL", db_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))
    yield db_url, tracking
    from registry import db

    db.dispose_engines()
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_params_refuse_credential_urls_without_echoing_them():
    from pydantic import ValidationError

    from pipelines.params import CanaryParams, RecalibrateParams

    for field, url in (
        ("db_url", f"postgresql://fp4roll:{DB_TOKEN}@db/x"),
        ("tracking_uri", f"https://host/mlflow?token={ML_TOKEN}"),
    ):
        for model in (CanaryParams, RecalibrateParams):
            with pytest.raises(ValidationError, match="carries credentials") as caught:
                model(**{field: url})
            _clean(str(caught.value), "a validation error")
    assert CanaryParams(db_url="postgresql://db/x").db_url == "postgresql://db/x"


def test_cli_moves_credential_urls_to_the_environment(monkeypatch):
    from pipelines.cli_options import credentials_to_environment

    monkeypatch.delenv("FP4ROLL_DB_URL", raising=False)
    url = f"postgresql://u:{DB_TOKEN}@db/x"
    kept = credentials_to_environment({"db_url": url, "tracking_uri": "sqlite:///m.db", "x": 1})
    assert kept == {"tracking_uri": "sqlite:///m.db", "x": 1}
    assert os.environ["FP4ROLL_DB_URL"] == url


def test_no_surface_shows_a_credential(secret_env, prefect_harness, monkeypatch, caplog, tmp_path):
    from prefect.client.orchestration import get_client

    from pipelines import flows
    from pipelines.cli import app
    from pipelines.flows import canary_flow
    from pipelines.params import CanaryParams
    from pipelines.results import StageReport
    from pipelines.rollout import CanaryPlan
    from pipelines.status import model_status
    from pipelines.steps import run_url
    from registry import db, ledger
    from registry.judge import Outcome
    from registry.versions import resolve_version

    db_url, tracking = secret_env
    caplog.set_level(logging.INFO)
    db.upgrade(None)
    name = f"secret-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    baseline, (v_a, v_b) = register_baseline_and_challenger(
        name, tmp_path, None, payloads=(b"aaaa", b"bbbb")
    )
    candidate = resolve_version(name, v_b, tracking_uri=None)
    champion = resolve_version(name, baseline, tracking_uri=None)

    def fake_plan(params: CanaryParams) -> CanaryPlan:  # the replay needs models; the plan does not
        return CanaryPlan(
            model_name=name,
            candidate_version=v_b,
            baseline_version=baseline,
            candidate_dir="unused",
            baseline_dir="unused",
            candidate_manifest=str(candidate.manifest_digest),
            baseline_manifest=str(champion.manifest_digest),
            corpus_digest="ab" * 32,
            holdout_size=100,
            stages=STAGES,
            min_samples=10,
            max_seq_len=16,
            seed=0,
            gate_policy=None,
            db_url=params.db_url,
            tracking_uri=params.tracking_uri,
        )

    def failing_stage(plan, rollout_id, stage_index, owner=None):
        raise ConnectionError(
            f"lost {os.environ['MLFLOW_TRACKING_URI']} and {os.environ['FP4ROLL_DB_URL']}"
        )

    def passing_stage(plan, rollout_id, stage_index, owner=None):
        decision = record_stage(rollout_id, stage_index, os.environ["FP4ROLL_DB_URL"])
        return StageReport(
            rollout_id=rollout_id,
            stage_index=stage_index,
            traffic_percent=STAGES[stage_index],
            requests=60,
            outcome=Outcome.PASS,
            decision=decision,
            score=100.0,
            reason="all gates passed",
            failed_metrics=(),
            metrics={},
            replay_path="unused",
        )

    # the tasks are the step functions themselves: swap what they run
    monkeypatch.setattr(flows.plan_canary_task, "fn", fake_plan)
    # as in production, the stage's function runs inside the redacting wrapper
    monkeypatch.setattr(flows.canary_stage_task, "fn", flows._redact_errors(failing_stage))
    with pytest.raises(ConnectionError):
        canary_flow(CanaryParams(model_name=name))
    monkeypatch.setattr(flows.canary_stage_task, "fn", passing_stage)
    result = canary_flow(CanaryParams(model_name=name))
    assert result.outcome.value == "promoted"
    aborted = ledger.rollouts(name)[0]
    assert aborted.status.value == "aborted" and "***@" in aborted.reason

    runner = CliRunner()
    outputs = []
    refused = runner.invoke(app, ["promote", "--model", name, "--version", v_a])
    assert refused.exit_code == 4, refused.output
    outputs.append(refused.output)
    for args in (
        ["promote", "--model", name, "--version", v_a, "--force", "--reason", "drill"],
        ["rollback", "--model", name, "--reason", "drill over", "--db", db_url],
        ["status", "--model", name, "--tracking-uri", tracking],
        ["ui", "--tracking-uri", tracking, "--prefect-port", "0"],
    ):
        invoked = runner.invoke(app, args)
        assert invoked.exit_code == 0, (args, invoked.output, invoked.exception)
        outputs.append(invoked.output)
    assert resolve_version(name, "champion", tracking_uri=None).version == v_b

    for i, text in enumerate(outputs):
        _clean(text, f"CLI output {i}")
    _clean("\n".join(r.getMessage() for r in caplog.records), "log records")
    _clean(run_url(None, "1", "abc"), "run_url")
    _clean(str(model_status(name)), "status")
    with db.get_engine(None).connect() as conn:
        for table in ("rollouts", "stage_results", "alias_moves"):
            rows = conn.execute(sa.text(f"SELECT * FROM {table}")).fetchall()
            assert rows, table
            _clean(repr(rows), f"ledger table {table}")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        assert {"canary-stages", "canary-summary"} <= {a.key for a in artifacts}
        _clean(repr([(a.key, a.data, a.description) for a in artifacts]), "Prefect artifacts")
        runs = client.read_flow_runs()
        assert runs
        _clean(repr([r.parameters for r in runs]), "Prefect flow-run parameters")
    results = Path(os.environ["PREFECT_HOME"])
    for path in results.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000 and path.suffix != ".db":
            _clean(path.read_bytes().decode("utf-8", "replace"), f"Prefect file {path}")
