"""Replay evaluator on a tiny random Llama: self-comparison is exact, quantization shows, JSON
round-trips."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from calibration.evaluate import (
    ReplayError,
    calibrated_input_ranges,
    compare_logits,
    load_replay,
    replay,
    save_replay,
)
from tests.calibration.replay_helpers import (
    SAMPLE_PROMPTS,
    attach_w4a4,
    char_tokenizer,
    fake_quantized_copy,
    tiny_llama,
)

PROMPTS = SAMPLE_PROMPTS[:6]


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One torch thread: on this shared 2-core box two OpenMP threads collapse (SmolLM2, 8 tokens:
    0.08 s per forward with one thread, 3.5 s with two while another process is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


def test_self_replay_is_exact(model, tokenizer):
    result = replay(model, model, PROMPTS, tokenizer=tokenizer, max_len=48)
    assert len(result.records) == len(PROMPTS)
    for index, rec in enumerate(result.records):
        assert rec.ok and rec.request_index == index
        assert rec.num_tokens == min(48, len(PROMPTS[index]) + 1)  # + BOS
        assert rec.kl_mean == 0.0 and rec.kl_p99 == 0.0
        assert rec.top1_agreement == 1.0
        assert rec.nll_baseline == rec.nll_candidate and math.isfinite(rec.nll_baseline)
        assert rec.outlier_fallback_rate_candidate == 0.0
        assert rec.latency_baseline_s > 0 and rec.latency_candidate_s > 0
    # a separate but identical copy gives the same exact zeros
    twin = replay(model, copy.deepcopy(model), PROMPTS[:2], tokenizer=tokenizer, max_len=48)
    assert all(r.kl_mean == 0.0 and r.top1_agreement == 1.0 for r in twin.records)


def test_fake_quantized_candidate_diverges(model, tokenizer):
    good = replay(model, fake_quantized_copy(model), PROMPTS, tokenizer=tokenizer, max_len=48)
    damaged = replay(
        model, fake_quantized_copy(model, 64.0), PROMPTS, tokenizer=tokenizer, max_len=48
    )
    good_kl = good.summary()["kl_mean"]
    damaged_kl = damaged.summary()["kl_mean"]
    assert all(r.kl_mean > 0 for r in good.records)
    assert all(r.kl_p99 >= r.kl_mean for r in good.records)
    assert damaged_kl > 5 * good_kl
    assert damaged.summary()["top1_agreement"] < good.summary()["top1_agreement"] <= 1.0


def test_metrics_match_direct_computation(tokenizer):
    torch.manual_seed(1)
    logits_b = torch.randn(10, 7)
    logits_c = logits_b + 0.3 * torch.randn(10, 7)
    ids = torch.randint(0, 7, (10,))
    metrics = compare_logits(logits_b, logits_c, ids, chunk_positions=3)  # chunk edges inside
    p = torch.softmax(logits_b, -1)
    expected_kl = (p * (torch.log_softmax(logits_b, -1) - torch.log_softmax(logits_c, -1))).sum(-1)
    torch.testing.assert_close(metrics.kl, expected_kl.clamp_min(0))
    assert torch.equal(metrics.agree, logits_b.argmax(-1) == logits_c.argmax(-1))
    expected_nll = torch.nn.functional.cross_entropy(logits_c[:-1], ids[1:], reduction="none")
    torch.testing.assert_close(metrics.nll_candidate, expected_nll)
    with pytest.raises(ReplayError, match="vocabulary"):
        compare_logits(logits_b, logits_c[:, :5], ids)


def test_outlier_rate_counts_tokens_beyond_calibrated_range(model, tokenizer):
    wide = copy.deepcopy(model)
    wide_layers = attach_w4a4(wide, input_amax=1e6)  # nothing exceeds the range
    narrow = copy.deepcopy(model)
    attach_w4a4(narrow, input_amax=0.5)  # RMSNorm outputs exceed 0.5 on most tokens
    ranges = calibrated_input_ranges(wide)
    assert set(ranges) == set(wide_layers) and len(ranges) == 14
    assert ranges[wide_layers[0]] == pytest.approx(1e6, rel=1e-6)

    result_wide = replay(model, wide, PROMPTS[:3], tokenizer=tokenizer, max_len=32)
    result_narrow = replay(model, narrow, PROMPTS[:3], tokenizer=tokenizer, max_len=32)
    assert result_wide.outlier_layers_candidate == tuple(wide_layers)
    assert result_wide.outlier_layers_baseline == ()
    assert all(r.outlier_fallback_rate_candidate == 0.0 for r in result_wide.records)
    # the watch hook runs before the loader's fake-quant hook, so it sees the raw activations
    assert all(r.outlier_fallback_rate_candidate > 0.5 for r in result_narrow.records)
    assert all(0.0 <= r.outlier_fallback_rate_candidate <= 1.0 for r in result_narrow.records)
    # W4A4 fake-quant changes the output: KL > 0 also without weight quantization
    assert all(r.kl_mean > 0 for r in result_narrow.records)


def test_outlier_rate_is_per_token(model, tokenizer):
    """Exactly the tokens with an out-of-range element count, whatever the layer."""
    candidate = copy.deepcopy(model)
    layer = "model.layers.0.mlp.down_proj"
    seen: list[torch.Tensor] = []
    module = dict(candidate.named_modules())[layer]
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    replay(model, candidate, PROMPTS[:1], tokenizer=tokenizer, max_len=32, warmup=0)
    handle.remove()
    token_amax = seen[-1].abs().amax(-1).reshape(-1)  # [T]
    limit = float(token_amax.median())
    expected = float((token_amax > limit).float().mean())
    result = replay(
        model,
        candidate,
        PROMPTS[:1],
        tokenizer=tokenizer,
        max_len=32,
        input_ranges_candidate={layer: limit},
    )
    assert result.records[0].outlier_fallback_rate_candidate == pytest.approx(expected)
    assert 0 < expected < 1


def test_batched_replay_matches_single(model, tokenizer):
    candidate = fake_quantized_copy(model)
    single = replay(model, candidate, PROMPTS, tokenizer=tokenizer, max_len=40)
    batched = replay(model, candidate, PROMPTS, tokenizer=tokenizer, max_len=40, batch_size=4)
    for a, b in zip(single.records, batched.records, strict=True):
        assert a.request_index == b.request_index and a.num_tokens == b.num_tokens
        assert b.kl_mean == pytest.approx(a.kl_mean, rel=1e-3, abs=1e-6)
        assert b.top1_agreement == a.top1_agreement
        assert b.nll_candidate == pytest.approx(a.nll_candidate, rel=1e-4)


def test_failures_are_recorded_not_lost(model, tokenizer):
    class Flaky(torch.nn.Module):
        """Fails on long inputs only."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, **kwargs):
            if input_ids.shape[1] > 30:
                raise RuntimeError("boom")
            return self.inner(input_ids=input_ids, **kwargs)

    prompts = ["short one", PROMPTS[0], ""]
    result = replay(model, Flaky(model), prompts, tokenizer=tokenizer, max_len=64, warmup=0)
    ok, failed, empty = result.records
    assert ok.ok and ok.kl_mean == 0.0
    assert not failed.ok and "boom" in failed.error and math.isnan(failed.kl_mean)
    assert empty.num_tokens == 1 and empty.ok  # BOS only: KL defined, NLL has no target
    assert math.isnan(empty.nll_candidate)


def test_bad_arguments_raise(model, tokenizer):
    with pytest.raises(ReplayError, match="no prompts"):
        replay(model, model, [], tokenizer=tokenizer)
    with pytest.raises(ReplayError, match="tokenizer"):
        replay(model, model, ["x"])
    with pytest.raises(ReplayError, match=">= 1"):
        replay(model, model, ["x"], tokenizer=tokenizer, max_len=0)
    with pytest.raises(ReplayError, match="vocabulary"):
        replay(model, tiny_llama(len(tokenizer) + 5), ["x"], tokenizer=tokenizer)
    with pytest.raises(ReplayError, match="pair up"):
        replay(model, model, ["x"], tokenizer=tokenizer, request_indices=[1, 2])


def test_sources_may_be_loaders(model, tokenizer):
    calls = []

    def load_candidate():
        calls.append(1)
        return model, tokenizer, {"scheme": "nvfp4"}

    result = replay(model, load_candidate, PROMPTS[:2], max_len=16)  # tokenizer from the loader
    assert calls == [1] and result.candidate_name == "load_candidate"
    assert all(r.kl_mean == 0.0 for r in result.records)


def test_records_round_trip_json(model, tokenizer, tmp_path):
    result = replay(
        model, fake_quantized_copy(model), PROMPTS[:3] + ("",), tokenizer=tokenizer, max_len=24
    )
    path = save_replay(result, tmp_path / "nested" / "replay.json")
    data = json.loads(path.read_text())  # strict JSON: NaN stored as null
    assert data["format"] == "fp4roll.replay" and data["records"][3]["nll_candidate"] is None
    loaded = load_replay(path)
    assert loaded.records[:3] == result.records[:3]
    assert math.isnan(loaded.records[3].nll_candidate)
    assert loaded.baseline_name == result.baseline_name and loaded.seed == result.seed
    assert not list(path.parent.glob("*.tmp"))
    data["version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(ReplayError, match="version"):
        load_replay(tmp_path / "new.json")
    with pytest.raises(FileNotFoundError):
        load_replay(tmp_path / "missing.json")


def test_replay_from_checkpoint_folders(model, tokenizer, tmp_path):
    """Folders in, loaders chosen by config.json; W4A4 layers come from the checkpoint's scales."""
    from calibration.groups import select_targets
    from calibration.precision import Tier
    from tests.calibration.exports import export_all

    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    layers = sorted(
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n
    )
    groups = [g.name for g in select_targets(model).groups]
    export_all(
        model,
        tmp_path / "w4a4",
        Tier.NVFP4,
        input_amax=dict.fromkeys(groups, 0.5),  # far too narrow: most tokens fall outside
        tokenizer=tokenizer,
    )
    same = replay(base_dir, base_dir, PROMPTS[:2], max_len=24)
    assert all(r.kl_mean == 0.0 and r.top1_agreement == 1.0 for r in same.records)
    result = replay(base_dir, tmp_path / "w4a4", PROMPTS[:2], max_len=24)
    assert sorted(result.outlier_layers_candidate) == layers
    assert result.candidate_name == str(tmp_path / "w4a4")
    assert all(r.kl_mean > 0 and r.outlier_fallback_rate_candidate > 0.5 for r in result.records)
    assert all(r.outlier_fallback_rate_baseline == 0.0 for r in result.records)
