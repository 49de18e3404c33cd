# ruff: noqa: F811 - pytest fixtures imported from tests/registry/mlflow_fixtures.py
"""A checkpoint file swapped after registration is refused at canary, promote and load; the
recalibration work key follows the source model's content, not its path."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipelines.params import CanaryParams, PromoteParams
from pipelines.rollout import CanaryPlan, plan_canary, promote_candidate, promote_version, run_stage
from registry import db, ledger
from registry.integrity import IntegrityError
from registry.mlflow_registry import aliases, register
from registry.versions import register_baseline, resolve_version
from tests.registry.mlflow_fixtures import make_request, mlflow_sqlite_uri  # noqa: F401


@pytest.fixture
def swapped(mlflow_sqlite_uri, make_request, tmp_path):
    """A baseline champion and a challenger whose model.safetensors is replaced after registration
    (same size). Returns (model name, challenger version, db url, a plan made before the swap)."""
    uri = mlflow_sqlite_uri
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"bf16" * 64)
    (base / "config.json").write_text("{}")
    request = make_request()
    name = request.model_name
    register_baseline(name, base, tracking_uri=uri)
    version = register(request, tracking_uri=uri).version
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(db_url)
    champion = resolve_version(name, "champion", tracking_uri=uri)
    challenger = resolve_version(name, version, tracking_uri=uri)
    folder = Path(unquote(urlparse(challenger.source).path))
    plan = CanaryPlan(
        model_name=name,
        candidate_version=version,
        baseline_version=champion.version,
        candidate_dir=str(folder),
        baseline_dir=str(Path(unquote(urlparse(champion.source).path))),
        candidate_manifest=str(challenger.manifest_digest),
        baseline_manifest=str(champion.manifest_digest),
        corpus_digest=challenger.corpus_digest,
        holdout_size=100,
        stages=(50.0, 100.0),
        min_samples=2,
        max_seq_len=16,
        seed=0,
        gate_policy=None,
        db_url=db_url,
        tracking_uri=uri,
    )
    (folder / "model.safetensors").write_bytes(b"EVIL!" * 64)
    yield name, version, db_url, plan
    db.dispose_engines()


def test_canary_refuses_a_swapped_checkpoint(swapped):
    name, version, db_url, plan = swapped
    with pytest.raises(IntegrityError, match=rf"{name} v{version}: .*changed: model\.safetensors"):
        plan_canary(CanaryParams(model_name=name, db_url=db_url, tracking_uri=plan.tracking_uri))
    assert ledger.rollouts(name, db_url=db_url) == []


def test_stage_load_refuses_a_checkpoint_swapped_after_planning(swapped):
    name, version, db_url, plan = swapped
    rollout = ledger.start_rollout(name, version, plan.baseline_version, plan.stages, db_url=db_url)
    with pytest.raises(IntegrityError, match="changed after registration"):
        run_stage(plan, rollout.id, 0)
    assert ledger.stage_results(rollout.id, db_url=db_url) == []


def test_promote_refuses_a_swapped_checkpoint(swapped):
    name, version, db_url, plan = swapped
    before = aliases(name, tracking_uri=plan.tracking_uri)
    rollout = ledger.start_rollout(name, version, plan.baseline_version, plan.stages, db_url=db_url)
    with pytest.raises(IntegrityError, match=r"changed: model\.safetensors"):
        promote_candidate(plan, rollout.id)
    with pytest.raises(IntegrityError, match=r"changed: model\.safetensors"):
        promote_version(
            PromoteParams(
                model_name=name,
                version=version,
                db_url=db_url,
                tracking_uri=plan.tracking_uri,
                force=True,
                reason="even forced, wrong bytes never serve",
            )
        )
    assert aliases(name, tracking_uri=plan.tracking_uri) == before
    assert ledger.get_rollout(rollout.id, db_url=db_url).status.value == "running"


def test_work_key_follows_source_content_not_path(tmp_path, monkeypatch):
    import pipelines.content_digest as content
    from pipelines.params import RecalibrateParams
    from pipelines.steps import calibration_work_dir

    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))
    source = tmp_path / "model"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"a" * 1000)
    (source / "config.json").write_text("{}")
    params = RecalibrateParams(model_name="m", source_model=str(source))
    hashed: list[str] = []
    real = content.file_sha256
    monkeypatch.setattr(content, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))

    first = calibration_work_dir(params, "ab" * 32, str(source))
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert calibration_work_dir(params, "ab" * 32, str(source)) == first
    assert len(hashed) == 2  # cached by (path, size, mtime, inode): not read again

    weights = source / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # changed in place, same path and size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = calibration_work_dir(params, "ab" * 32, str(source))
    assert changed != first
    assert hashed.count("model.safetensors") == 2
