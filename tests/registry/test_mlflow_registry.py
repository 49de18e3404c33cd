# ruff: noqa: F811 - pytest fixtures imported from tests/registry/mlflow_fixtures.py
"""MLflow registration and promotion: embedded SQLite store and a real ``mlflow server``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from registry.aliases import Alias
from registry.mlflow_registry import (
    GROUP_TABLE,
    RegistrationMetrics,
    RegistryError,
    aliases,
    idempotency_key,
    promote,
    redact,
    register,
    reject_challenger,
    rollback,
    sanitize_metric_name,
    version_tags,
)
from tests.registry.mlflow_fixtures import (  # noqa: F401 - fixtures
    make_request,
    mlflow_server,
    mlflow_sqlite_uri,
    rest_get,
)

SECRET = "s3cr3t-pw"


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.integration)])
def tracking_uri(request) -> str:
    if request.param == "sqlite":
        return request.getfixturevalue("mlflow_sqlite_uri")
    return request.getfixturevalue("mlflow_server")


def test_redact_and_sanitize():
    assert redact("postgresql://u:p@h:5432/db") == "postgresql://***@h:5432/db"
    assert redact("https://tok@host/x?token=abc&b=1") == "https://***@host/x?token=***&b=1"
    assert redact("/plain/path") == "/plain/path"
    assert sanitize_metric_name("group_kl/a.b|c:d") == "group_kl/a.b_c_d"


def test_request_validation(make_request, tmp_path):
    with pytest.raises(ValidationError, match="checkpoint_dir"):
        make_request(checkpoint_dir=tmp_path / "missing")
    with pytest.raises(ValidationError, match="corpus_digest"):
        make_request(corpus_digest="not-hex")
    with pytest.raises(ValidationError, match="unexpected|extra"):
        make_request(unknown_field=1)


def test_idempotency_key_tracks_inputs(make_request):
    a = make_request(model_name="m")
    assert idempotency_key(a) == idempotency_key(make_request(model_name="m"))
    assert idempotency_key(a) != idempotency_key(make_request(model_name="m", payload=b"other"))
    assert idempotency_key(a) != idempotency_key(make_request(model_name="m", kl_threshold=0.1))


def test_register_run_version_tags_lineage_and_idempotency(
    tracking_uri, make_request, caplog, tmp_path
):
    caplog.set_level(logging.DEBUG)
    request = make_request()
    name = request.model_name
    registered = register(request, tracking_uri=tracking_uri)
    assert not registered.reused
    assert registered.source.endswith("/checkpoint")

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(registered.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["scheme"] == "nvfp4" and params["block_size"] == "16"
    assert params["calibration_size"] == "8" and params["kl_threshold"] == "0.05"
    assert params["corpus_source"] == "postgresql://***@db.internal:5432/logs"
    metrics = run.data.metrics
    assert metrics["combined_kl"] == pytest.approx(0.012)
    assert metrics["bytes_after"] == 300
    assert not any(key.startswith("group_kl") for key in metrics)  # one table, not a metric each
    artifacts = {a.path for a in client.list_artifacts(registered.run_id)}
    assert {"checkpoint", "calibration.json", "plots", "calibration_set", GROUP_TABLE} <= artifacts
    local = client.download_artifacts(registered.run_id, GROUP_TABLE, str(tmp_path))
    table = json.loads(Path(local).read_text())  # MLflow's table format: columns + row lists
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["name"] for r in rows] == [row["name"] for row in request.group_table]
    assert [r["mean_kl"] for r in rows] == pytest.approx([0.004, 0.02])
    assert [r.get("tier") for r in rows] == [None, "bf16"]
    experiment = client.get_experiment(registered.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    checkpoint_files = {a.path for a in client.list_artifacts(registered.run_id, "checkpoint")}
    assert checkpoint_files == {"checkpoint/model.safetensors", "checkpoint/config.json"}
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == ("ab" * 32)[:36]
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert input_tags["mlflow.data.context"] == "calibration"
    assert input_tags["fp4roll.corpus_digest"] == "ab" * 32

    tags = version_tags(name, registered.version, tracking_uri=tracking_uri)
    assert tags["fp4roll.corpus_digest"] == "ab" * 32
    assert json.loads(tags["fp4roll.fallback_layers"]) == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
    ]
    assert tags["fp4roll.scheme"] == "nvfp4" and tags["fp4roll.block_size"] == "16"
    assert tags["fp4roll.code_version"] == "fp4roll test"
    assert tags["fp4roll.idempotency_key"] == registered.idempotency_key
    assert aliases(name, tracking_uri=tracking_uri) == {"challenger": registered.version}

    again = register(request, tracking_uri=tracking_uri)
    assert again.reused and again.version == registered.version
    assert again.run_id == registered.run_id
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    other = register(make_request(model_name=name, payload=b"v2"), tracking_uri=tracking_uri)
    assert not other.reused and other.version != registered.version

    everything = json.dumps(params) + json.dumps(tags) + caplog.text
    assert SECRET not in everything


def test_promote_then_rollback_restores_previous_champion_exactly(tracking_uri, make_request):
    name = make_request().model_name
    v1 = register(make_request(model_name=name, payload=b"1"), tracking_uri=tracking_uri).version
    promote(name, v1, tracking_uri=tracking_uri)
    v2 = register(make_request(model_name=name, payload=b"2"), tracking_uri=tracking_uri).version
    promote(name, v2, tracking_uri=tracking_uri)
    v3 = register(make_request(model_name=name, payload=b"3"), tracking_uri=tracking_uri).version
    before = aliases(name, tracking_uri=tracking_uri)
    assert before == {"champion": v2, "previous-champion": v1, "challenger": v3}

    moves = promote(name, v3, reason="canary passed", tracking_uri=tracking_uri)
    assert {(m.alias, m.from_version, m.to_version) for m in moves} == {
        (Alias.PREVIOUS_CHAMPION, v1, v2),
        (Alias.CHAMPION, v2, v3),
        (Alias.CHALLENGER, v3, None),
    }
    assert promote(name, v3, tracking_uri=tracking_uri) == ()  # idempotent
    assert aliases(name, tracking_uri=tracking_uri) == {"champion": v3, "previous-champion": v2}
    assert version_tags(name, v3, tracking_uri=tracking_uri)["fp4roll.outcome"] == "promoted"
    assert version_tags(name, v2, tracking_uri=tracking_uri)["fp4roll.outcome"] == "superseded"

    moves = rollback(name, reason="p99 latency 1.6x", tracking_uri=tracking_uri)
    assert {(m.alias, m.from_version, m.to_version) for m in moves} == {
        (Alias.CHAMPION, v3, v2),
        (Alias.PREVIOUS_CHAMPION, v2, v1),
    }
    assert all(m.reason == "p99 latency 1.6x" for m in moves)
    after = aliases(name, tracking_uri=tracking_uri)
    assert after == {"champion": v2, "previous-champion": v1}  # exactly as before promotion
    assert rollback(name, reason="again", tracking_uri=tracking_uri) == ()  # idempotent
    assert aliases(name, tracking_uri=tracking_uri) == after
    rolled = version_tags(name, v3, tracking_uri=tracking_uri)
    assert rolled["fp4roll.outcome"] == "rolled_back"
    assert rolled["fp4roll.rollback_reason"] == "p99 latency 1.6x"
    assert version_tags(name, v2, tracking_uri=tracking_uri)["fp4roll.outcome"] == "restored"

    # going further back needs an explicit version
    # (v2 was promoted when there was no previous-champion: that state comes back too)
    moves = rollback(name, to_version=v1, reason="older", tracking_uri=tracking_uri)
    assert [(m.alias, m.to_version) for m in moves] == [
        (Alias.CHAMPION, v1),
        (Alias.PREVIOUS_CHAMPION, None),
    ]
    assert aliases(name, tracking_uri=tracking_uri) == {"champion": v1}


def test_rollback_completes_after_a_crash_midway(mlflow_sqlite_uri, make_request):
    uri = mlflow_sqlite_uri
    name = make_request().model_name
    v1 = register(make_request(model_name=name, payload=b"1"), tracking_uri=uri).version
    promote(name, v1, tracking_uri=uri)
    v2 = register(make_request(model_name=name, payload=b"2"), tracking_uri=uri).version
    promote(name, v2, tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # simulate the first half of a rollback: target tagged, champion moved, then a crash
    for key, value in {
        "fp4roll.outcome": "restored",
        "fp4roll.restored_from": v2,
        "fp4roll.restore_previous_champion": "",
        "fp4roll.rollback_reason": "crash test",
    }.items():
        client.set_model_version_tag(name, v1, key, value)
    client.set_registered_model_alias(name, "champion", v1)
    moves = rollback(name, reason="retry", tracking_uri=uri)
    assert [(m.alias, m.to_version) for m in moves] == [(Alias.PREVIOUS_CHAMPION, None)]
    assert aliases(name, tracking_uri=uri) == {"champion": v1}
    assert version_tags(name, v2, tracking_uri=uri)["fp4roll.outcome"] == "rolled_back"


def test_reject_challenger_and_errors(mlflow_sqlite_uri, make_request):
    uri = mlflow_sqlite_uri
    name = make_request().model_name
    v1 = register(make_request(model_name=name, payload=b"1"), tracking_uri=uri).version
    with pytest.raises(RegistryError, match="previous-champion"):
        rollback(name, reason="nothing to go back to", tracking_uri=uri)
    promote(name, v1, tracking_uri=uri)
    v2 = register(make_request(model_name=name, payload=b"2"), tracking_uri=uri).version
    moves = reject_challenger(name, v2, reason="stage 0 failed", tracking_uri=uri)
    assert [(m.alias, m.from_version, m.to_version) for m in moves] == [
        (Alias.CHALLENGER, v2, None)
    ]
    assert reject_challenger(name, v2, reason="again", tracking_uri=uri) == ()
    assert aliases(name, tracking_uri=uri) == {"champion": v1}
    assert version_tags(name, v2, tracking_uri=uri)["fp4roll.outcome"] == "rejected"
    with pytest.raises(RegistryError, match="champion"):
        reject_challenger(name, v1, reason="x", tracking_uri=uri)
    with pytest.raises(RegistryError, match="no version 99"):
        promote(name, "99", tracking_uri=uri)
    with pytest.raises(RegistryError, match="does not exist"):
        aliases("no-such-model", tracking_uri=uri)


def test_a_version_registered_without_figures_logs_none(mlflow_sqlite_uri, make_request):
    """A candidate built elsewhere (the live demo's requantized GGUF) has no KL yet: nothing is
    logged for it, and the status reads None, not a made-up 0."""
    from registry.versions import version_summaries

    uri = mlflow_sqlite_uri
    registered = register(make_request(metrics=RegistrationMetrics()), tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(registered.run_id).data.metrics == {}
    (summary,) = version_summaries(registered.model_name, tracking_uri=uri)
    assert summary.combined_kl is None and summary.top1_agreement is None


@pytest.mark.integration
def test_rest_api_shows_version_tags_aliases_and_lineage(mlflow_server, make_request):
    request = make_request()
    name = request.model_name
    registered = register(request, tracking_uri=mlflow_server)
    promote(name, registered.version, tracking_uri=mlflow_server)
    v2 = register(make_request(model_name=name, payload=b"2"), tracking_uri=mlflow_server)

    model = rest_get(mlflow_server, "registered-models/get", name=name)["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {
        "champion": registered.version,
        "challenger": v2.version,
    }
    version = rest_get(mlflow_server, "model-versions/get", name=name, version=registered.version)[
        "model_version"
    ]
    assert version["run_id"] == registered.run_id
    assert version["source"] == registered.source
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["fp4roll.outcome"] == "promoted"
    assert tags["fp4roll.corpus_digest"] == "ab" * 32
    by_alias = rest_get(mlflow_server, "registered-models/alias", name=name, alias="champion")
    assert by_alias["model_version"]["version"] == registered.version

    run = rest_get(mlflow_server, "runs/get", run_id=registered.run_id)["run"]
    (dataset_input,) = run["inputs"]["dataset_inputs"]
    assert {t["key"]: t["value"] for t in dataset_input["tags"]}["mlflow.data.context"] == (
        "calibration"
    )
    assert dataset_input["dataset"]["digest"] == ("ab" * 32)[:36]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert SECRET not in json.dumps(run) and "***@" in params["corpus_source"]
