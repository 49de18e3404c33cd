"""What a calibration decided and why: ``calibration.json`` and a per-group KL bar chart.

The record holds everything needed to reproduce or audit the decision: corpus digest, sample sizes,
NVFP4 layout (block size, scale dtypes), the fallback policy, per-group KL / p99 / top-1, the fallback
list with reasons, combined scores of "everything quantized except lm_head" and of the plan, and the
package versions that produced it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from calibration import atomic
from calibration.plan import FallbackPlan, FallbackReason
from calibration.precision import Tier
from calibration.sensitivity import GroupSensitivity, QualityScore
from kernels import FP4_BLOCK_SIZE

logger = logging.getLogger(__name__)

CALIBRATION_JSON = "calibration.json"
KL_CHART_PNG = "group_kl.png"
REPORT_VERSION = 1
_PACKAGES = (
    "fp4roll",
    "torch",
    "triton",
    "transformers",
    "compressed-tensors",
    "safetensors",
    "numpy",
)


def package_versions(packages: Iterable[str] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when a package is not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def score_to_dict(score: QualityScore) -> dict[str, Any]:
    data = {
        k: _finite(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(score).items()
    }
    data["delta_perplexity"] = _finite(score.delta_perplexity)
    return data


def build_calibration_record(
    *,
    corpus_digest: str,
    scheme: Tier,
    calibration_sample: Mapping[str, int],
    evaluation_sample: Mapping[str, int],
    sensitivities: Sequence[GroupSensitivity],
    plan: FallbackPlan,
    all_quantized: QualityScore,
    with_plan: QualityScore,
    settings: Mapping[str, Any] | None = None,
    bytes_by_tier: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``calibration.json`` payload (JSON-able; non-finite floats become null)."""
    scheme = Tier(scheme)
    fallback_of = {f.name: f for f in plan.fallbacks}
    return {
        "report_version": REPORT_VERSION,
        "corpus_digest": corpus_digest,
        "calibration_sample": dict(calibration_sample),
        "evaluation_sample": dict(evaluation_sample),
        "format": {
            "scheme": scheme.value,
            "block_size": FP4_BLOCK_SIZE,
            "weight_dtype": "float4_e2m1 (packed 2 per uint8)",
            "weight_scale_dtype": "float8_e4m3fn",
            "weight_global_scale_dtype": "float32",
            "input_global_scale_dtype": "float32" if scheme.quantizes_activations else None,
            "activation_scales": "dynamic fp8 per 16 at run time"
            if scheme.quantizes_activations
            else None,
        },
        "policy": {
            "metric": "mean KL(P_base || P_quant) per token, nats",
            "threshold": plan.policy.threshold,
            "max_fallback_param_fraction": plan.policy.max_fallback_param_fraction,
        },
        "settings": dict(settings or {}),
        "groups": [
            {
                "name": s.group,
                "kind": s.kind,
                "block_index": s.block_index,
                "members": list(s.members),
                "num_params": s.num_params,
                "mean_kl": _finite(s.mean_kl),
                "p99_kl": _finite(s.p99_kl),
                "top1_agreement": s.top1_agreement,
                "delta_perplexity": _finite(s.delta_perplexity),
                "fallback": s.group in fallback_of,
            }
            for s in sensitivities
        ],
        "fallbacks": [
            {
                "name": f.name,
                "members": list(f.members),
                "reason": f.reason.value,
                "detail": f.detail,
                "mean_kl": None if f.mean_kl is None else _finite(f.mean_kl),
                "num_params": f.num_params,
            }
            for f in plan.fallbacks
        ],
        "over_threshold_kept_quantized": list(plan.over_threshold_kept_quantized),
        "ignore": list(plan.ignore),
        "fallback_param_fraction": plan.fallback_param_fraction,
        "bytes_by_tier": dict(bytes_by_tier or {}),
        "combined": {
            "all_quantized_except_lm_head": score_to_dict(all_quantized),
            "plan": score_to_dict(with_plan),
        },
        "package_versions": package_versions(),
    }


def write_calibration_json(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``record`` atomically (temp file, then rename)."""
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic.write_bytes(path, text.encode())


def render_kl_chart(
    sensitivities: Sequence[GroupSensitivity], plan: FallbackPlan, *, title: str = ""
) -> bytes:
    """Per-group mean KL bars (log y), threshold line, fallbacks in red. Returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fallback = {
        f.name for f in plan.fallbacks if f.reason is not FallbackReason.ALWAYS_HIGH_PRECISION
    }
    floor = 1e-7  # log axis: a zero KL is drawn at the floor
    values = [max(s.mean_kl, floor) for s in sensitivities]
    colors = ["tab:red" if s.group in fallback else "tab:blue" for s in sensitivities]
    fig = Figure(figsize=(max(6.0, 0.12 * len(values) + 2), 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=colors, width=0.85)
    ax.set_yscale("log")
    ax.set_xlabel("fused group (model order)")
    ax.set_ylabel("mean KL per token (nats)")
    ax.set_xlim(-0.6, len(values) - 0.4)
    if len(values) <= 40:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(
            [s.group.replace("model.layers.", "") for s in sensitivities], rotation=90, fontsize=6
        )
    if plan.policy.threshold is not None:
        ax.axhline(plan.policy.threshold, color="black", linestyle="--", linewidth=1)
        ax.text(0, plan.policy.threshold * 1.15, f"threshold {plan.policy.threshold:g}", fontsize=7)
    ax.set_title(title or f"per-group KL, {len(fallback)} fallback group(s) in red", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_kl_chart(
    sensitivities: Sequence[GroupSensitivity],
    plan: FallbackPlan,
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Render the KL chart and write it atomically to ``path``."""
    return atomic.write_bytes(path, render_kl_chart(sensitivities, plan, title=title))
