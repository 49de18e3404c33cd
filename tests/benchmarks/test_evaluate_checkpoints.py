"""benchmarks/peer/evaluate_checkpoints.py: one evaluator for fp4roll's and the peer's checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from benchmarks.peer.evaluate_checkpoints import evaluate_checkpoint, format_table
from calibration.groups import select_targets
from calibration.models import load_causal_lm
from calibration.observers import ActivationStats, tokenize_batches
from calibration.precision import Tier
from calibration.sensitivity import compute_baseline, score_emulation, score_quantized
from tests.calibration.exports import export_all

TEXTS = [
    "hello world, how are you today?",
    "the quick brown fox jumps over the lazy dog",
    "a short prompt",
    "write a haiku about autumn rain and quiet streets",
]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    loaded = load_causal_lm(tiny_llama_dir, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    selection = select_targets(model)
    amax = {g.name: 4.0 + i for i, g in enumerate(selection.groups)}
    stats = ActivationStats(
        group_input_amax=amax,
        member_to_group={m: g.name for g in selection.groups for m in g.members},
        num_prompts=1,
        num_tokens=1,
    )
    root = tmp_path_factory.mktemp("eval")
    for tier in (Tier.NVFP4A16, Tier.NVFP4):
        export_all(model, root / tier.value, tier, input_amax=amax, source_dir=tiny_llama_dir)
    baseline = compute_baseline(
        model, tokenize_batches(tok, TEXTS, max_length=64, batch_size=2), progress=False
    )
    return model, selection, stats, baseline, root


@pytest.mark.parametrize("tier", [Tier.NVFP4A16, Tier.NVFP4])
def test_loaded_checkpoint_scores_like_the_sweeps_emulation(setup, tier):
    """The loader's model scored as is == the KL sweep quantizing every group in memory."""
    model, selection, stats, baseline, root = setup
    row = evaluate_checkpoint(root / tier.value, baseline)
    assert "error" not in row
    assert row["scheme"] == tier.value
    assert row["quantized_layers"] == len(selection.quantized_layers)
    w4a4 = tier is Tier.NVFP4
    assert row["activation_hooks"] == (len(selection.quantized_layers) if w4a4 else 0)
    assert row["input_global_scales"] == (len(selection.quantized_layers) if w4a4 else 0)

    expected = score_quantized(
        model, baseline, selection.groups, stats, tier, use_block_cache=False
    )
    assert row["mean_kl"] > 0
    assert row["mean_kl"] == pytest.approx(expected.mean_kl, rel=1e-4, abs=1e-7)
    assert row["top1_agreement"] == pytest.approx(expected.top1_agreement)
    assert row["perplexity_ratio"] == pytest.approx(
        expected.perplexity / expected.base_perplexity, rel=1e-4
    )
    assert row["tokens"] == baseline.num_tokens
    # the export writes bf16 unquantized tensors: served bytes == file bytes minus the headers
    assert 0 < row["bytes"] - row["served_bytes"] < 64 * 1024


def test_w4a4_scores_worse_than_w4a16(setup):
    *_, baseline, root = setup
    w4a16 = evaluate_checkpoint(root / Tier.NVFP4A16.value, baseline)
    w4a4 = evaluate_checkpoint(root / Tier.NVFP4.value, baseline)
    assert w4a4["mean_kl"] > w4a16["mean_kl"]  # the activation fake-quant is really on


def test_refused_checkpoint_is_a_row_not_a_crash(setup, tmp_path):
    *_, baseline, root = setup
    broken = tmp_path / "broken"
    shutil.copytree(root / Tier.NVFP4.value, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in tensors if k.endswith("weight_global_scale"))
    del tensors[dropped]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "peer_run.json").write_text(
        json.dumps({"recipe": "x", "wall_seconds": 1.0, "peak_rss_mb": 2.0})
    )

    row = evaluate_checkpoint(broken, baseline)
    assert "weight_global_scale" in row["error"] and row["recipe"] == "x"
    missing = evaluate_checkpoint(tmp_path / "nope", baseline)
    assert missing["error"] == "no such checkpoint folder"
    table = format_table([row, missing])
    assert "ERROR" in table and "nope" in table


def test_unquantized_reference_has_zero_kl(setup):
    model, _, _, baseline, _ = setup
    score = score_emulation(model, baseline, [], use_block_cache=False)
    assert score.mean_kl == pytest.approx(0.0, abs=1e-9) and score.top1_agreement == 1.0
