"""Replay canary = evaluator + judge: A/A passes on the shipped logs' hold-out, damage fails at once."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import pytest
import torch

from calibration.evaluate import InProcessEvaluator, ReplayRecord, ReplayResult, load_replay, replay
from pipelines.canary import (
    judge_replay,
    judge_samples,
    run_replay_canary,
    run_replay_stage,
    stage_request_indices,
    stage_requests,
    stage_sample_count,
)
from registry.judge import Decision, Outcome
from registry.policy import GatePolicy, Metric
from tests.calibration.replay_helpers import char_tokenizer, fake_quantized_copy, tiny_llama

HOLDOUT_SIZE = 100


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One torch thread: on this shared 2-core box two OpenMP threads collapse (SmolLM2, 8 tokens:
    0.08 s per forward with one thread, 3.5 s with two while another process is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_log_holdout(size: int = HOLDOUT_SIZE, *, lines: int = 600, seed: int = 0) -> list[str]:
    """Redacted hold-out prompts sampled from the shipped sample logs (first ``lines`` lines)."""
    from calibration.config import SamplingConfig
    from calibration.data import SAMPLE_PROMPT_LOGS
    from calibration.sampling import PromptRecord, sample_calibration_set
    from registry.prompt_logs import flatten_prompt, parse_prompt

    with gzip.open(SAMPLE_PROMPT_LOGS, "rt", encoding="utf-8") as handle:
        parsed = [parse_prompt(json.loads(line)) for line in itertools.islice(handle, lines)]
    records = [
        PromptRecord(
            id=i,
            received_at=p.received_at,
            route=p.route,
            model=p.model,
            text=flatten_prompt(p.messages, p.prompt_text),
            token_count=p.token_count,
            source="sample-logs",
            messages=p.messages,
        )
        for i, p in enumerate(parsed)
    ]
    sample = sample_calibration_set(
        records,
        SamplingConfig(calibration_size=16, sensitivity_size=0, holdout_size=size, seed=seed),
    )
    return [member.text for member in sample.holdout]


@pytest.fixture(scope="module")
def holdout() -> list[str]:
    return sample_log_holdout()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.mark.parametrize("window", [10, 200, 5000])
def test_stage_requests_follow_the_policy_plan(window):
    policy = GatePolicy()
    minimum = max(policy.min_samples_for(gate) for gate in policy.metrics)
    for stage, share in enumerate(policy.plan.steps):
        indices = stage_requests(policy, stage, window, seed=3)
        assert len(indices) == min(window, max(minimum, math.ceil(window * share / 100)))
        assert indices == stage_request_indices(window, share, min_samples=minimum, seed=3)


def test_judge_samples_shape(model, tokenizer, holdout):
    result = replay(model, fake_quantized_copy(model), holdout[:4], tokenizer=tokenizer, max_len=24)
    base, cand = judge_samples(result)
    assert set(base) == set(cand) == {m.value for m in Metric}
    assert all(len(v) == 4 for v in [*base.values(), *cand.values()])
    assert base[Metric.TOP1_AGREEMENT] == [1.0] * 4 and base[Metric.KL_MEAN] == [0.0] * 4
    rec = result.records[2]
    assert cand[Metric.LATENCY_MS][2] == pytest.approx(rec.latency_candidate_s * 1000)
    assert cand[Metric.NLL][2] == rec.nll_candidate and base[Metric.NLL][2] == rec.nll_baseline
    assert cand[Metric.KL_P99][2] == rec.kl_p99
    assert cand[Metric.OUTLIER_FALLBACK_RATE][2] == rec.outlier_fallback_rate_candidate


def test_failed_requests_are_missing_on_both_sides_and_counted_as_errors():
    ok = ReplayRecord(0, "a", 5, 0.01, 0.02, 0.1, 0.3, 0.9, 2.0, 2.1, 0.0, 0.001)
    failed = ReplayRecord(1, "b", 0, *[math.nan] * 9, error="boom")
    cand_only = ReplayRecord(2, "c", 0, *[math.nan] * 9, error="HTTP 500", failed_side="candidate")
    result = ReplayResult(
        records=(ok, failed, cand_only),
        baseline_name="b",
        candidate_name="c",
        seed=0,
        max_len=8,
        batch_size=1,
    )
    base, cand = judge_samples(result)
    for metric in Metric:
        assert not math.isnan(base[metric][0]) and not math.isnan(cand[metric][0])
        if metric is Metric.ERROR_RATE:
            continue
        assert math.isnan(base[metric][1]) and math.isnan(cand[metric][1])
    assert cand[Metric.LATENCY_MS][0] == pytest.approx(20.0)
    # failed requests are counted, never NaN: in process a failure is both sides'
    assert cand[Metric.ERROR_RATE] == [0.0, 1.0, 1.0]
    assert base[Metric.ERROR_RATE] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("window", [0, 10, 49, 50, 120, 1000, 12_345])
def test_stage_sampling_meets_minimum_and_nests(window):
    steps = (1.0, 10.0, 50.0, 100.0)
    samples = [stage_request_indices(window, s, min_samples=50, seed=7) for s in steps]
    for step, sample in zip(steps, samples, strict=True):
        assert len(sample) == len(set(sample)) == stage_sample_count(window, step, 50)
        assert len(sample) == min(window, max(50, math.ceil(window * step / 100)))
        assert all(0 <= i < window for i in sample)
    for smaller, larger in zip(samples, samples[1:], strict=False):
        assert set(smaller) <= set(larger)  # each stage is a superset of the previous one
    assert samples[-1] == tuple(range(window))
    assert samples == [stage_request_indices(window, s, min_samples=50, seed=7) for s in steps]


def test_stage_sampling_depends_on_seed():
    a = stage_request_indices(1000, 10.0, min_samples=50, seed=1)
    b = stage_request_indices(1000, 10.0, min_samples=50, seed=2)
    assert len(a) == len(b) == 100 and a != b
    with pytest.raises(ValueError, match="traffic_percent"):
        stage_request_indices(1000, 0.0, min_samples=50, seed=1)


def test_aa_canary_passes_every_stage_on_sample_logs(model, tokenizer, holdout, tmp_path):
    """Same model as baseline and candidate, default thresholds: promote after all four stages."""
    assert len(holdout) == HOLDOUT_SIZE
    evaluator = InProcessEvaluator(model, model, tokenizer=tokenizer, max_len=48)
    decision, progress, stages = run_replay_canary(evaluator, holdout, replay_dir=tmp_path)
    reasons = [(s.stage_index, s.verdict.reason) for s in stages]
    assert decision is Decision.PROMOTE, reasons
    assert [s.verdict.outcome for s in stages] == [Outcome.PASS] * 4
    assert [len(s.request_indices) for s in stages] == [50, 50, 50, 100]
    assert progress.stage_index == 3 and progress.failed_analyses == 0
    first = stages[0].verdict
    assert first.metric("kl_mean").candidate_statistic == 0.0
    assert first.metric("top1_agreement").candidate_statistic == 1.0
    assert first.metric("latency_ms").n_candidate == 50
    saved = load_replay(tmp_path / "replay-stage-0.json")
    assert saved.records == stages[0].replay.records
    assert judge_replay(saved).outcome is Outcome.PASS  # a saved replay judges the same


def test_damaged_candidate_fails_first_stage(model, tokenizer, holdout, tmp_path):
    damaged = fake_quantized_copy(model, global_scale_factor=64.0)
    evaluator = InProcessEvaluator(model, damaged, tokenizer=tokenizer, max_len=64)
    decision, progress, stages = run_replay_canary(evaluator, holdout, replay_dir=tmp_path)
    assert decision is Decision.ROLLBACK
    assert len(stages) == 1 and stages[0].verdict.outcome is Outcome.FAIL
    assert stages[0].verdict.critical_failure
    assert {"kl_mean", "top1_agreement"} <= set(stages[0].verdict.failed_metrics)
    assert progress.failed_analyses == 1


def test_short_window_is_inconclusive(model, tokenizer, holdout):
    evaluator = InProcessEvaluator(model, model, tokenizer=tokenizer, max_len=32)
    stage = run_replay_stage(evaluator, holdout[:20], stage_index=0)
    assert len(stage.request_indices) == 20
    assert stage.verdict.outcome is Outcome.INCONCLUSIVE


def small_model_policy() -> GatePolicy:
    """Default gates with quality limits a 135M model at 4 bits can meet.

    Measured on SmolLM2-135M, plain W4A16 ``pack`` (no fallback), 50 held-out prompts: KL mean
    0.27, KL p99 1.5, top-1 0.74, perplexity ratio 1.12 — far outside the defaults (0.05 / 0.5 /
    0.99 / 1.01), which are set for production-size models. Latency and outlier gates stay default.
    """
    from dataclasses import replace

    limits = {
        "kl_mean": {"ceiling": 0.6},
        "kl_p99": {"ceiling": 3.0},
        "top1_agreement": {"ceiling": 0.6},
        "nll": {"max_effect": 1.3},
    }
    return GatePolicy(
        metrics=tuple(replace(g, **limits.get(g.name, {})) for g in GatePolicy().metrics)
    )


@pytest.mark.slow
def test_smollm2_replay_canary_first_stage(smollm2_dir, holdout, tmp_path):
    """Packed W4A16 SmolLM2 passes stage 1; every layer at global scale × 64 fails it, critically."""
    from calibration.checkpoint import load_checkpoint
    from calibration.models import load_causal_lm
    from tests.calibration.exports import export_all

    baseline = load_causal_lm(smollm2_dir, dtype="float32")
    export_all(baseline.model, tmp_path / "w4a16", source_dir=smollm2_dir)
    packed = load_checkpoint(tmp_path / "w4a16", dtype="float32")
    damaged = fake_quantized_copy(baseline.model, global_scale_factor=64.0)
    policy = small_model_policy()

    good = run_replay_stage(
        InProcessEvaluator(baseline, packed, max_len=32), holdout, stage_index=0, policy=policy
    )
    summary = good.replay.summary()
    assert good.verdict.outcome is Outcome.PASS, (good.verdict.reason, summary)
    assert len(good.request_indices) == 50 and good.replay.num_errors == 0
    assert 0 < summary["kl_mean"] < 0.6 and summary["outlier_fallback_rate"] == 0.0

    bad = run_replay_stage(
        InProcessEvaluator(baseline, damaged, tokenizer=baseline.tokenizer, max_len=32),
        holdout,
        stage_index=0,
        policy=policy,
    )
    assert bad.verdict.outcome is Outcome.FAIL and bad.verdict.critical_failure
    assert {"kl_mean", "top1_agreement", "nll"} <= set(bad.verdict.failed_metrics)
    assert judge_replay(bad.replay).outcome is Outcome.FAIL  # and at the default gates too
