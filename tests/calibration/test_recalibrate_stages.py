"""The file-backed stages the flow runs give what recalibrate() gives, however the exact checks are
split, and a rerun resumes instead of recomputing."""

from __future__ import annotations

import json

import pytest

from calibration.config import CalibrationConfig
from calibration.recalibrate import (
    calibrate_files,
    exact_candidates,
    load_score_file,
    load_sweep_file,
    plan_and_export,
    recalibrate,
    score_file,
    sweep_file,
)
from tests.calibration.test_recalibrate import TEXTS

#: a floor of 0 makes every group a candidate for the exact check (so splitting them is exercised)
CONFIG = CalibrationConfig(
    kl_threshold=0.0, max_extra_bytes=0.3, max_prompt_tokens=32, batch_size=3
)


def _run_stages(model_dir, tmp_path, partitions, config=CONFIG):
    stats, rounded = calibrate_files(
        model_dir, TEXTS[:4], tmp_path / "stats.json", tmp_path / "rounded.safetensors", config
    )
    scores = score_file(model_dir, TEXTS[:4], stats, rounded, tmp_path / "scores.json", config)
    groups = exact_candidates(scores, config)
    parts = [
        sweep_file(
            model_dir,
            TEXTS[4:],
            stats,
            rounded,
            [groups[i] for i in part],
            tmp_path / f"part-{n}.json",
            CONFIG,
        )
        for n, part in enumerate(partitions)
    ]
    result = plan_and_export(
        model_dir,
        TEXTS[4:],
        stats,
        rounded,
        scores,
        parts,
        "sha256:test",
        tmp_path / "ckpt",
        CONFIG,
    )
    return groups, parts, result


def test_stages_match_recalibrate_and_any_split(tiny_llama_dir, tmp_path):
    whole = recalibrate(
        tiny_llama_dir,
        TEXTS[:4],
        TEXTS[4:],
        "sha256:test",
        tmp_path / "whole",
        CONFIG,
        progress=False,
    )
    groups, _, one = _run_stages(tiny_llama_dir, tmp_path / "one", [range(8)])
    _, parts, split = _run_stages(
        tiny_llama_dir, tmp_path / "split", [[0, 5, 2], [7, 1], [3, 4, 6]]
    )

    assert len(groups) == 8 and len(parts) == 3
    for result in (one, split):
        assert result.upgraded_groups == whole.upgraded_groups
        assert result.ignore == whole.ignore
        assert result.plan_mean_kl == pytest.approx(whole.plan_mean_kl, rel=1e-5, abs=1e-9)
    by_group = {r.group: r.mean_kl for p in parts for r in load_sweep_file(p)}
    record = json.loads(whole.calibration_json.read_text())
    for group in record["groups"]:
        assert by_group[group["name"]] == pytest.approx(group["exact_kl"], rel=1e-5, abs=1e-9)
    assert (
        json.loads((tmp_path / "split" / "ckpt" / "config.json").read_text())["quantization_config"]
        == json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    )


def test_stages_resume_instead_of_recomputing(tiny_llama_dir, tmp_path):
    _, _, first = _run_stages(tiny_llama_dir, tmp_path, [range(8)])
    files = ("stats.json", "rounded.safetensors", "scores.json", "part-0.json")
    stamps = {p: (tmp_path / p).stat().st_mtime_ns for p in (*files, "ckpt/calibration.json")}
    _, _, again = _run_stages(tiny_llama_dir, tmp_path, [range(8)])
    assert again.upgraded_groups == first.upgraded_groups
    assert again.plan_mean_kl == first.plan_mean_kl
    assert stamps == {p: (tmp_path / p).stat().st_mtime_ns for p in stamps}


def test_stage_errors_are_specific(tiny_llama_dir, tmp_path):
    stats, rounded = calibrate_files(
        tiny_llama_dir, TEXTS[:4], tmp_path / "stats.json", tmp_path / "r.safetensors", CONFIG
    )
    with pytest.raises(ValueError, match="unknown group name"):
        sweep_file(
            tiny_llama_dir,
            TEXTS,
            stats,
            rounded,
            ["model.layers.9.mlp.gate_up"],
            tmp_path / "p.json",
            CONFIG,
        )
    with pytest.raises(ValueError, match="not a KL-sweep file"):
        load_sweep_file(stats)
    with pytest.raises(ValueError, match="not a tier-scores file"):
        load_score_file(stats)
    scores = tmp_path / "partial.json"
    scores.write_text(json.dumps({"format": "fp4roll.tier-scores", "version": 1, "scores": {}}))
    with pytest.raises(ValueError, match="do not cover 8 groups"):
        plan_and_export(
            tiny_llama_dir,
            TEXTS[4:],
            stats,
            rounded,
            scores,
            [],
            "sha256:t",
            tmp_path / "c",
            CONFIG,
        )


def test_export_stores_unquantized_tensors_in_bf16(tiny_llama_dir, tmp_path):
    """Calibration runs in fp32; the checkpoint stores embeddings, norms and BF16 tiers in bf16."""
    from safetensors import safe_open

    mostly_nvfp4 = CalibrationConfig(max_extra_bytes=0.05, max_prompt_tokens=32, batch_size=3)
    _, _, result = _run_stages(tiny_llama_dir, tmp_path, [], mostly_nvfp4)
    assert result.tiers.get("nvfp4")
    config = json.loads((result.checkpoint_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(next(result.checkpoint_dir.glob("*.safetensors"))), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    packed = [n[: -len(".weight_packed")] for n in dtypes if n.endswith(".weight_packed")]
    assert packed
    for layer in packed:
        assert dtypes[f"{layer}.weight_packed"] == "U8"
        assert dtypes[f"{layer}.weight_scale"] == "F8_E4M3"
        assert dtypes[f"{layer}.weight_global_scale"] == "F32"
        assert dtypes[f"{layer}.input_global_scale"] == "F32"
    assert {d for n, d in dtypes.items() if n.endswith(".weight")} <= {"BF16", "F8_E4M3"}
