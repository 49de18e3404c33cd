"""recalibrate(): stats → sweep → plan → export, on the tiny Llama; one slow run on SmolLM2-135M."""

from __future__ import annotations

import json

import pytest

from calibration.checkpoint import load_checkpoint
from calibration.config import CalibrationConfig
from calibration.precision import Tier
from calibration.recalibrate import recalibrate

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Production prompt logs calibrate the activation scales.",
    "Hello world! How are you today?",
    "A staged canary rolls the quantized model out.",
    "NVFP4 packs two four-bit codes into one byte.",
    "Summarize the ticket: the printer jams on floor three.",
]


def test_recalibrate_tiny_llama_w4a4_with_budget(tiny_llama_dir, tmp_path):
    config = CalibrationConfig(
        kl_threshold=None, max_fallback_fraction=0.3, max_prompt_tokens=32, batch_size=3
    )
    out = tmp_path / "ckpt"
    result = recalibrate(
        tiny_llama_dir, TEXTS[:4], TEXTS[4:], "sha256:test", out, config, progress=False
    )

    assert result.checkpoint_dir == out and result.num_groups == 8
    assert result.fallback_groups and result.fallback_param_fraction <= 0.3
    assert result.kl_chart.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(result.calibration_json.read_text())
    assert data["corpus_digest"] == "sha256:test"
    # statistics over every calibration prompt; the sensitivity prompts are a separate slice
    assert data["calibration_sample"]["prompts"] == 4 and data["evaluation_sample"]["prompts"] == 2
    assert len(data["groups"]) == 8
    assert {f["name"] for f in data["fallbacks"] if f["reason"] != "always_high_precision"} == set(
        result.fallback_groups
    )

    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert set(result.ignore) <= set(ignore) | {"lm_head"}
    model, tokenizer, info = load_checkpoint(out)
    assert set(info.tiers.values()) == {Tier.NVFP4}
    assert set(info.ignored_layers) >= set(result.ignore) - {"lm_head"}
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4

    with pytest.raises(FileExistsError):
        recalibrate(tiny_llama_dir, TEXTS, TEXTS, "sha256:test", out, config, progress=False)


def test_recalibrate_requires_digest(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="corpus_digest"):
        recalibrate(tiny_llama_dir, TEXTS, TEXTS, "", tmp_path / "x")


@pytest.mark.slow
def test_recalibrate_smollm2_plan_beats_everything_quantized(smollm2_dir, tmp_path):
    # Kept tiny (6 + 3 prompts of <= 16 tokens): 120 groups x one forward each on a shared 2-core CPU.
    # W4A4 per-group KLs compound and vary with tiny weight changes (DESIGN.md), so the plan keeps a
    # clear 30 % budget back and only the ordering plan < everything-quantized is asserted.
    config = CalibrationConfig(
        max_fallback_fraction=0.3, kl_threshold=None, max_prompt_tokens=16, batch_size=6
    )
    calibration = [*TEXTS[:3], *(t.upper() for t in TEXTS[:3])]  # disjoint from the eval prompts
    result = recalibrate(
        smollm2_dir,
        calibration,
        TEXTS[3:],
        "sha256:smollm2-test",
        tmp_path / "c",
        config,
        progress=False,
    )
    assert result.num_groups == 30 * 4
    assert result.fallback_groups
    assert result.plan_mean_kl < result.all_quantized_mean_kl
    model, tokenizer, info = load_checkpoint(result.checkpoint_dir)
    assert set(info.tiers.values()) == {Tier.NVFP4}
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


@pytest.fixture(scope="module")
def fp32_tiny_dir(tmp_path_factory):
    """The tiny Llama saved in fp32, with weights that bf16 cannot hold exactly."""
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-fp32")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(vocab_size=max(320, len(tokenizer))).float()
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def _weights_bytes(folder) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def test_fp32_source_is_stored_as_served_bf16_and_matches_pack_bytes(fp32_tiny_dir, tmp_path):
    """Unquantized tensors go to the checkpoint in bf16 whatever dtype the source and calibration
    have: a recalibrated all-NVFP4 checkpoint weighs what `fp4roll pack` writes (within 1 %)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    config = CalibrationConfig(  # no fallback; weights only, the scheme pack writes
        scheme="nvfp4a16", kl_threshold=1e9, max_prompt_tokens=32, batch_size=3
    )
    result = recalibrate(
        fp32_tiny_dir, TEXTS[:4], TEXTS[4:], "sha256:t", tmp_path / "r", config, progress=False
    )
    assert not result.fallback_groups
    packed = CliRunner().invoke(app, ["pack", fp32_tiny_dir, str(tmp_path / "p")])
    assert packed.exit_code == 0, packed.output
    recalibrated, pack_bytes = _weights_bytes(tmp_path / "r"), _weights_bytes(tmp_path / "p")
    assert abs(recalibrated - pack_bytes) <= 0.01 * pack_bytes
    assert _weights_bytes(fp32_tiny_dir) > 1.7 * recalibrated  # the fp32 source is far larger
    written = json.loads((tmp_path / "r" / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"
    record = json.loads(result.calibration_json.read_text())
    assert record["bytes_by_tier"] == result.bytes_by_tier
    assert set(record["bytes_by_tier"]) == {"nvfp4a16", "other"}  # lm_head tied: no bf16 Linear
    assert sum(record["bytes_by_tier"].values()) <= result.checkpoint_bytes

    # --storage-dtype keeps another dtype on request
    kept = recalibrate(
        fp32_tiny_dir,
        TEXTS[:4],
        TEXTS[4:],
        "sha256:t",
        tmp_path / "fp32",
        CalibrationConfig(
            scheme="nvfp4a16", kl_threshold=1e9, max_prompt_tokens=32, storage_dtype="fp32"
        ),
        progress=False,
    )
    written = json.loads((kept.checkpoint_dir / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "float32"
    assert kept.bytes_by_tier["other"] == 2 * result.bytes_by_tier["other"]


def test_long_prompts_are_truncated_and_counted(tiny_llama_dir, tmp_path):
    long_prompt = " ".join(TEXTS) * 4
    config = CalibrationConfig(kl_threshold=1e9, max_prompt_tokens=24, batch_size=3)
    result = recalibrate(
        tiny_llama_dir,
        [long_prompt, "Hello", long_prompt.upper()],
        TEXTS[4:],
        "sha256:t",
        tmp_path / "c",
        config,
        progress=False,
    )
    sample = json.loads(result.calibration_json.read_text())["calibration_sample"]
    assert sample["prompts"] == 3 and sample["truncated_prompts"] == 2
    assert sample["over_budget_prompts"] == 0


def test_budget_only_plan_needs_a_budget():
    with pytest.raises(ValueError, match="needs a budget"):
        CalibrationConfig(kl_threshold=None)
    assert CalibrationConfig(kl_threshold=None, max_fallback_fraction=0.1).kl_threshold is None
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 8"):
        CalibrationConfig(max_prompt_tokens=4)
    with pytest.raises(ValueError, match="scheme"):
        CalibrationConfig(scheme="fp8")
