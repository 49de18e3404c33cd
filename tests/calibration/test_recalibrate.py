"""recalibrate(): stats → rounding → tier scores → exact checks → measured plan → export, on the tiny
Llama; one slow run on SmolLM2-135M."""

from __future__ import annotations

import json

import pytest

from calibration.checkpoint import load_checkpoint
from calibration.config import CalibrationConfig
from calibration.observers import tokenize_prompts
from calibration.precision import Tier
from calibration.recalibrate import recalibrate
from calibration.sensitivity import compute_baseline, score_emulation

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Production prompt logs calibrate the activation scales.",
    "Hello world! How are you today?",
    "A staged canary rolls the quantized model out.",
    "NVFP4 packs two four-bit codes into one byte.",
    "Summarize the ticket: the printer jams on floor three.",
]
#: W4A4 with a generous budget, small prompts: every stage runs, upgrades are affordable.
BUDGET = CalibrationConfig(
    max_extra_bytes=0.5, max_prompt_tokens=32, batch_size=3, logprob_dtype="fp32"
)


@pytest.fixture(scope="module")
def w4a4(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recal") / "ckpt"
    result = recalibrate(
        tiny_llama_dir, TEXTS[:4], TEXTS[4:], "sha256:test", out, BUDGET, progress=False
    )
    return result, json.loads(result.calibration_json.read_text())


def test_budget_plan_upgrades_groups_and_reports_them(w4a4):
    result, record = w4a4
    assert result.num_groups == 8 and result.rounding.value == "gptq-mse"
    assert result.upgraded_groups and 0 < result.extra_bytes_fraction <= 0.5
    assert result.plan_mean_kl < result.all_quantized_mean_kl
    assert result.kl_chart.read_bytes()[:4] == b"\x89PNG"
    assert record["corpus_digest"] == "sha256:test"
    # statistics over every calibration prompt; the sensitivity prompts are a separate slice
    assert (
        record["calibration_sample"]["prompts"] == 4 and record["evaluation_sample"]["prompts"] == 2
    )
    rows = {g["name"]: g for g in record["groups"]}
    assert len(rows) == 8
    assert {n for n, g in rows.items() if g["tier"] != "nvfp4"} == set(result.upgraded_groups)
    for row in rows.values():  # every candidate tier has its estimate and its bytes
        assert row["estimate_nvfp4"] >= row["estimate_fp8"] >= 0 == row["estimate_bf16"]
        assert row["bytes_nvfp4"] < row["bytes_fp8"] < row["bytes_bf16"]
    assert record["plan"]["mode"] == "budget" and record["plan"]["target_met"] is None
    assert sum(record["plan"]["groups_by_tier"].values()) == 8
    assert set(record["bytes_by_tier"]) >= {"nvfp4"} | {g["tier"] for g in rows.values()}


def test_the_measured_plan_is_what_the_checkpoint_serves(w4a4, tiny_llama_dir):
    """calibration.json's plan KL is a real forward of the emulated plan; the exported checkpoint,
    reloaded, gives the same KL against the same baseline (one emulation, DESIGN.md)."""
    result, record = w4a4
    from calibration.models import load_causal_lm

    source = load_causal_lm(tiny_llama_dir, dtype="fp32")
    batches = tokenize_prompts(source.tokenizer, TEXTS[4:], max_length=32, batch_size=3).batches
    baseline = compute_baseline(source.model, batches, progress=False)
    model, _, info = load_checkpoint(result.checkpoint_dir, dtype="float32")
    quantized = {g["tier"] for g in record["groups"]} - {"bf16"}  # bf16 groups are plain weights
    assert {t.value for t in info.tiers.values()} == quantized
    served = score_emulation(model, baseline, ())
    assert served.mean_kl == pytest.approx(result.plan_mean_kl, rel=1e-4, abs=1e-7)


def test_a_target_takes_the_fewest_upgrades_that_reach_it(tiny_llama_dir, w4a4, tmp_path):
    budget, record = w4a4
    probes = record["plan"]["probes"]
    assert len(probes) == 1 and probes[0]["mean_kl"] == pytest.approx(budget.plan_mean_kl)
    target = (budget.plan_mean_kl + budget.all_quantized_mean_kl) / 2
    config = CalibrationConfig(
        target_kl=target, max_extra_bytes=0.5, max_prompt_tokens=32, batch_size=3
    )
    result = recalibrate(
        tiny_llama_dir, TEXTS[:4], TEXTS[4:], "sha256:test", tmp_path / "t", config, progress=False
    )
    data = json.loads(result.calibration_json.read_text())
    assert result.target_met is True and result.plan_mean_kl <= target
    assert result.extra_bytes_fraction <= budget.extra_bytes_fraction
    measured = sorted(data["plan"]["probes"], key=lambda p: p["upgrades"])
    chosen = next(p for p in measured if p["mean_kl"] == pytest.approx(result.plan_mean_kl))
    # every shorter prefix that was measured missed the target
    assert all(p["mean_kl"] > target for p in measured if p["upgrades"] < chosen["upgrades"])

    unreachable = CalibrationConfig(
        target_kl=1e-9, max_extra_bytes=0.01, max_prompt_tokens=32, batch_size=3
    )
    missed = recalibrate(
        tiny_llama_dir,
        TEXTS[:4],
        TEXTS[4:],
        "sha256:t",
        tmp_path / "m",
        unreachable,
        progress=False,
    )
    assert missed.target_met is False and missed.extra_bytes_fraction <= 0.01
    assert "not reached" in json.loads(missed.calibration_json.read_text())["plan"]["notes"][0]


def test_the_runbook_floor_moves_a_group_off_nvfp4_whatever_the_budget(tiny_llama_dir, tmp_path):
    config = CalibrationConfig(
        kl_threshold=0.0, max_extra_bytes=0.0, max_prompt_tokens=32, batch_size=3, rounding="rtn"
    )
    result = recalibrate(
        tiny_llama_dir, TEXTS[:4], TEXTS[4:], "sha256:t", tmp_path / "f", config, progress=False
    )
    record = json.loads(result.calibration_json.read_text())
    assert record["plan"]["floor"] and record["plan"]["exact_checked"]
    floored = {g["name"]: g for g in record["groups"] if g["name"] in record["plan"]["floor"]}
    assert all(g["exact_kl"] > 0 and g["tier"] == "fp8" for g in floored.values())
    assert all("runbook floor" in g["reason"] for g in floored.values())


def test_recalibrate_requires_digest(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="corpus_digest"):
        recalibrate(tiny_llama_dir, TEXTS, TEXTS, "", tmp_path / "x")
    with pytest.raises(FileExistsError):
        (tmp_path / "y").mkdir()
        recalibrate(tiny_llama_dir, TEXTS, TEXTS, "sha256:t", tmp_path / "y")


@pytest.mark.slow
def test_recalibrate_smollm2_plan_beats_everything_quantized(smollm2_dir, tmp_path):
    """SmolLM2, W4A4, GPTQ+MSE, the default +10 % budget: the measured plan beats all-NVFP4 and the
    mixed checkpoint reloads and generates. Kept small (6 + 3 prompts of <= 16 tokens)."""
    config = CalibrationConfig(max_prompt_tokens=16, batch_size=6)
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
    assert result.upgraded_groups and result.extra_bytes_fraction <= 0.10
    assert result.plan_mean_kl < result.all_quantized_mean_kl
    model, tokenizer, info = load_checkpoint(result.checkpoint_dir)
    assert Tier.NVFP4 in set(info.tiers.values())
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

    config = CalibrationConfig(  # no upgrade; weights only, the scheme pack writes
        scheme="nvfp4a16", max_extra_bytes=0.0, max_prompt_tokens=32, batch_size=3
    )
    result = recalibrate(
        fp32_tiny_dir, TEXTS[:4], TEXTS[4:], "sha256:t", tmp_path / "r", config, progress=False
    )
    assert not result.upgraded_groups
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
            scheme="nvfp4a16", max_extra_bytes=0.0, max_prompt_tokens=32, storage_dtype="fp32"
        ),
        progress=False,
    )
    written = json.loads((kept.checkpoint_dir / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "float32"
    assert kept.bytes_by_tier["other"] == 2 * result.bytes_by_tier["other"]


def test_long_prompts_are_truncated_and_counted(tiny_llama_dir, tmp_path):
    long_prompt = " ".join(TEXTS) * 4
    config = CalibrationConfig(max_extra_bytes=0.0, max_prompt_tokens=24, batch_size=3)
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


def test_config_validation():
    with pytest.raises(ValueError, match="needs a target"):
        CalibrationConfig(max_extra_bytes=None)
    assert CalibrationConfig(kl_threshold=None).kl_threshold is None  # no floor: budget alone
    unlimited = CalibrationConfig(max_extra_bytes=None, target_kl=0.1)
    assert unlimited.max_extra_bytes is None and unlimited.target_kl == 0.1
    assert CalibrationConfig(upgrade_tiers=["fp8"]).upgrade_tiers == (Tier.FP8,)
    with pytest.raises(ValueError, match="upgrade_tiers"):
        CalibrationConfig(upgrade_tiers=["nvfp4"])
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 8"):
        CalibrationConfig(max_prompt_tokens=4)
    with pytest.raises(ValueError, match="scheme"):
        CalibrationConfig(scheme="fp8")
    with pytest.raises(ValueError, match="rounding must be one of"):
        CalibrationConfig(rounding="awq")
