"""calibration.json payload and the per-group KL chart."""

from __future__ import annotations

import json

import pytest

from calibration.groups import GroupKind, LinearGroup, TargetSelection
from calibration.plan import FallbackPolicy, build_fallback_plan
from calibration.precision import Tier
from calibration.report import (
    build_calibration_record,
    package_versions,
    write_calibration_json,
    write_kl_chart,
)
from calibration.sensitivity import GroupSensitivity, QualityScore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def decided():
    groups = tuple(
        LinearGroup(
            f"model.layers.{i}.mlp.down_proj",
            (f"model.layers.{i}.mlp.down_proj",),
            GroupKind.MLP_DOWN,
            i,
            16,
            256,
        )
        for i in range(4)
    )
    selection = TargetSelection(groups=groups, skipped={"lm_head": "ignored by pattern"})
    kls = [0.001, 0.2, 0.0, 0.03]
    records = [
        GroupSensitivity(
            g.name, g.kind.value, g.block_index, g.members, g.num_params, kl, 3 * kl, 0.9, 0.01, 50
        )
        for g, kl in zip(groups, kls, strict=True)
    ]
    plan = build_fallback_plan(selection, records, FallbackPolicy(threshold=0.05))
    return records, plan


def test_record_has_everything_to_reproduce_the_decision(decided, tmp_path):
    records, plan = decided
    score = QualityScore(0.02, 0.1, 0.95, 10.0, 10.5, 200)
    nan_score = QualityScore(float("nan"), 0.1, 0.95, 10.0, 10.5, 200)
    record = build_calibration_record(
        corpus_digest="sha256:abc",
        scheme=Tier.NVFP4,
        calibration_sample={"prompts": 8, "tokens": 400},
        evaluation_sample={"prompts": 4, "tokens": 200},
        sensitivities=records,
        plan=plan,
        all_quantized=nan_score,
        with_plan=score,
        settings={"max_seq_len": 128},
    )
    path = write_calibration_json(record, tmp_path / "calibration.json")
    data = json.loads(path.read_text())
    assert data["corpus_digest"] == "sha256:abc"
    assert data["format"]["block_size"] == 16
    assert data["format"]["weight_scale_dtype"] == "float8_e4m3fn"
    assert data["format"]["input_global_scale_dtype"] == "float32"
    assert data["policy"]["threshold"] == 0.05
    assert [g["mean_kl"] for g in data["groups"]] == [0.001, 0.2, 0.0, 0.03]
    assert [g["fallback"] for g in data["groups"]] == [False, True, False, False]
    assert [(f["name"], f["reason"]) for f in data["fallbacks"]] == [
        ("model.layers.1.mlp.down_proj", "kl_above_threshold"),
        ("lm_head", "always_high_precision"),
    ]
    assert data["combined"]["plan"]["delta_perplexity"] == pytest.approx(0.05)
    assert data["combined"]["all_quantized_except_lm_head"]["mean_kl"] is None  # NaN -> null
    assert data["package_versions"]["torch"]
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_kl_chart_is_a_png(decided, tmp_path):
    records, plan = decided
    path = write_kl_chart(records, plan, tmp_path / "sub" / "group_kl.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 2000


def test_package_versions_tolerates_missing():
    assert package_versions(["definitely-not-installed-pkg"]) == {
        "definitely-not-installed-pkg": None
    }
