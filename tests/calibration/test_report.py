"""calibration.json payload and the per-group KL chart."""

from __future__ import annotations

import json

import pytest

from calibration.precision import Rounding, Tier
from calibration.report import (
    GroupDecision,
    PlanProbe,
    PlanSummary,
    build_calibration_record,
    package_versions,
    render_kl_chart,
)
from calibration.sensitivity import QualityScore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def decisions():
    tiers = [Tier.NVFP4, Tier.BF16, Tier.NVFP4, Tier.FP8]
    return [
        GroupDecision(
            name=f"model.layers.{i}.mlp.down_proj",
            kind="mlp_down",
            block_index=i,
            members=(f"model.layers.{i}.mlp.down_proj",),
            num_params=256,
            tier=tier,
            reason="base tier" if tier is Tier.NVFP4 else "upgraded",
            estimates={Tier.NVFP4: kl, Tier.FP8: kl / 20, Tier.BF16: 0.0},
            bytes={Tier.NVFP4: 152, Tier.FP8: 320, Tier.BF16: 512},
            exact_kl=0.21 if i == 1 else None,
        )
        for i, (tier, kl) in enumerate(zip(tiers, [0.001, 0.2, 0.0, 0.03], strict=True))
    ]


def test_record_has_everything_to_reproduce_the_decision(decisions):
    score = QualityScore(0.02, 0.1, 0.95, 10.0, 10.5, 200)
    nan_score = QualityScore(float("nan"), 0.1, 0.95, 10.0, 10.5, 200)
    summary = PlanSummary(
        target_kl=0.03,
        max_extra_bytes=0.1,
        kl_threshold=0.05,
        extra_bytes=528,
        extra_bytes_fraction=0.08,
        target_met=True,
        probes=(PlanProbe(0, 0.0, 0.06), PlanProbe(2, 0.08, 0.02)),
        floor=("model.layers.1.mlp.down_proj",),
        exact_checked=("model.layers.1.mlp.down_proj",),
    )
    record = build_calibration_record(
        corpus_digest="sha256:abc",
        scheme=Tier.NVFP4,
        rounding=Rounding.GPTQ_MSE,
        calibration_sample={"prompts": 8, "tokens": 400},
        evaluation_sample={"prompts": 4, "tokens": 200},
        decisions=decisions,
        summary=summary,
        all_quantized=nan_score,
        with_plan=score,
        ignore=("lm_head",),
        bytes_by_tier={"nvfp4": 304, "fp8": 320, "bf16": 512},
        settings={"max_prompt_tokens": 128},
    )
    data = json.loads(json.dumps(record, allow_nan=False))  # strictly JSON
    assert data["corpus_digest"] == "sha256:abc"
    assert (
        data["format"] | {"scheme": "nvfp4", "rounding": "gptq-mse", "block_size": 16}
        == data["format"]
    )
    assert data["format"]["input_global_scale_dtype"] == "float32"
    plan = data["plan"]
    assert plan["mode"] == "target" and plan["target_met"] is True
    assert plan["groups_by_tier"] == {"nvfp4": 2, "fp8": 1, "bf16": 1}
    assert [p["mean_kl"] for p in plan["probes"]] == [0.06, 0.02]
    assert [g["tier"] for g in data["groups"]] == ["nvfp4", "bf16", "nvfp4", "fp8"]
    assert [g["estimate_nvfp4"] for g in data["groups"]] == [0.001, 0.2, 0.0, 0.03]
    assert data["groups"][1]["exact_kl"] == 0.21 and data["groups"][0]["exact_kl"] is None
    assert data["groups"][3]["bytes_fp8"] == 320
    assert data["combined"]["plan"]["delta_perplexity"] == pytest.approx(0.05)
    assert data["combined"]["all_quantized_except_lm_head"]["mean_kl"] is None  # NaN -> null
    assert data["bytes_by_tier"]["bf16"] == 512 and data["ignore"] == ["lm_head"]
    assert data["package_versions"]["torch"]


def test_kl_chart_is_a_png_with_a_legend_per_tier(decisions):
    png = render_kl_chart(decisions, kl_threshold=0.05, title="t")
    assert png[:8] == PNG_MAGIC and len(png) > 2000
    # the legend and colours depend on the tiers: a different plan draws a different picture
    flat = [GroupDecision(**{**d.__dict__, "tier": Tier.NVFP4}) for d in decisions]
    assert render_kl_chart(flat, kl_threshold=0.05, title="t") != png


def test_package_versions_tolerates_missing():
    assert package_versions(["definitely-not-installed-pkg"]) == {
        "definitely-not-installed-pkg": None
    }
