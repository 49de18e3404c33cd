"""Rollout test helpers without models: a registered baseline champion and challengers over tiny
fake checkpoints (embedded MLflow), stage verdicts made by the real judge from synthetic samples.
Used in process by the guard tests and in killed subprocesses by the fault-injection matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from registry.judge import Decision, Outcome, decide, judge_stage
from registry.mlflow_registry import RegistrationMetrics, RegistrationRequest, register
from registry.policy import GatePolicy, MetricGate, StagePlan
from registry.versions import register_baseline

STAGES = (10.0, 100.0)
POLICY = GatePolicy(
    metrics=(MetricGate(name="kl", direction="lower", statistic="mean", max_effect=1.2),),
    min_samples=10,
    plan=StagePlan(steps=STAGES, failure_limit=1, inconclusive_limit=2),
)


def verdict(stage: int, outcome: Outcome = Outcome.PASS):
    """A real judge verdict for ``stage`` (pass: same distribution; fail: candidate 2x worse)."""
    rng = np.random.default_rng(stage)
    base = rng.normal(1.0, 0.05, 60)
    cand = rng.normal(1.0 if outcome is Outcome.PASS else 2.0, 0.05, 60)
    result = judge_stage({"kl": base}, {"kl": cand}, POLICY, stage_index=stage)
    assert result.outcome is outcome, result.reason
    return result


def record_stage(rollout_id: int, stage: int, db_url: str, outcome: Outcome = Outcome.PASS):
    """Judge, record and (on ADVANCE) advance, as ``pipelines.rollout.run_stage`` does."""
    from registry import ledger

    result = verdict(stage, outcome)
    decision, _ = decide(result, ledger.progress(rollout_id, db_url=db_url), POLICY)
    ledger.record_stage_result(rollout_id, result, decision, db_url=db_url)
    if decision is Decision.ADVANCE:
        ledger.advance(rollout_id, db_url=db_url)
    return decision


def register_baseline_and_challenger(
    model_name: str, root: Path, tracking_uri: str, payloads: tuple[bytes, ...] = (b"nvfp4",)
) -> tuple[str, list[str]]:
    """Register a baseline (champion) and one challenger per payload; (baseline, challengers)."""
    base = root / "baseline"
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.safetensors").write_bytes(b"bf16" * 64)
    (base / "config.json").write_text("{}")
    info, _ = register_baseline(model_name, base, tracking_uri=tracking_uri)
    versions = []
    for payload in payloads:
        folder = root / f"candidate-{payload.decode()}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(payload * 64)
        (folder / "config.json").write_text(json.dumps({"quantization_config": {}}))
        registered = register(
            RegistrationRequest(
                model_name=model_name,
                source_model="test",
                scheme="nvfp4",
                corpus_digest="ab" * 32,
                calibration_size=8,
                holdout_size=16,
                metrics=RegistrationMetrics(combined_kl=0.01),
                checkpoint_dir=folder,
                code_version="fp4roll test",
            ),
            tracking_uri=tracking_uri,
        )
        versions.append(registered.version)
    return info.version, versions
