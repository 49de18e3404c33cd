"""What a calibration decided and why: ``calibration.json`` and a per-group KL chart.

The record holds what is needed to audit or reproduce the plan: corpus digest, sample sizes, the
NVFP4 layout, the rounding, per group its tier, why, the estimated KL of each tier it could take, the
exact KL where a decision needed one and the bytes of each tier; the plan's mode (target or budget),
every measured probe of the target search, the measured combined scores of "everything NVFP4" and of
the plan, bytes per tier as written, and the package versions that produced it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from calibration.precision import Rounding, Tier
from calibration.sensitivity import QualityScore
from kernels import FP4_BLOCK_SIZE

CALIBRATION_JSON = "calibration.json"
KL_CHART_PNG = "group_kl.png"
REPORT_VERSION = 2
_PACKAGES = (
    "fp4roll",
    "torch",
    "triton",
    "transformers",
    "compressed-tensors",
    "safetensors",
    "numpy",
)
#: Chart colours by tier (the legend names them).
TIER_COLORS = {
    Tier.NVFP4: "tab:blue",
    Tier.NVFP4A16: "tab:cyan",
    Tier.FP8: "tab:orange",
    Tier.BF16: "tab:red",
}


def package_versions(packages: Iterable[str] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when a package is not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def score_to_dict(score: QualityScore) -> dict[str, Any]:
    data = {
        k: _finite(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(score).items()
    }
    data["delta_perplexity"] = _finite(score.delta_perplexity)
    return data


@dataclass(frozen=True)
class GroupDecision:
    """The tier chosen for one fused group, and the figures it was chosen on."""

    name: str
    kind: str
    block_index: int | None
    members: tuple[str, ...]
    num_params: int
    tier: Tier
    reason: str
    estimates: Mapping[Tier, float]  # estimated KL contribution of each candidate tier (nats)
    bytes: Mapping[Tier, int]  # checkpoint bytes of each candidate tier
    exact_kl: float | None = None  # measured KL of the base tier alone, where a decision needed it

    def row(self) -> dict[str, Any]:
        """One flat table row (MLflow table, Prefect artifact, calibration.json)."""
        row: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "block_index": self.block_index,
            "num_params": self.num_params,
            "tier": self.tier.value,
            "reason": self.reason,
            "exact_kl": _finite(self.exact_kl),
        }
        for tier, estimate in self.estimates.items():
            row[f"estimate_{tier.value}"] = _finite(estimate)
        for tier, size in self.bytes.items():
            row[f"bytes_{tier.value}"] = size
        return row


@dataclass(frozen=True)
class PlanProbe:
    """One measured plan of the search: the first ``upgrades`` upgrades applied."""

    upgrades: int
    extra_bytes_fraction: float
    mean_kl: float


@dataclass(frozen=True)
class PlanSummary:
    """How the plan was chosen (target or budget) and whether it met its goal."""

    target_kl: float | None
    max_extra_bytes: float | None
    kl_threshold: float | None
    extra_bytes: int
    extra_bytes_fraction: float  # of the all-NVFP4 checkpoint
    target_met: bool | None  # None in budget mode
    probes: tuple[PlanProbe, ...] = ()
    floor: tuple[str, ...] = ()
    exact_checked: tuple[str, ...] = ()
    rank_agreement: float | None = None  # Spearman of estimates vs exact KL on the checked groups
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def mode(self) -> str:
        return "target" if self.target_kl is not None else "budget"


def build_calibration_record(
    *,
    corpus_digest: str,
    scheme: Tier,
    rounding: Rounding,
    calibration_sample: Mapping[str, int],
    evaluation_sample: Mapping[str, int],
    decisions: Sequence[GroupDecision],
    summary: PlanSummary,
    all_quantized: QualityScore,
    with_plan: QualityScore,
    ignore: Sequence[str],
    bytes_by_tier: Mapping[str, int],
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``calibration.json`` payload (JSON-able; non-finite floats become null)."""
    scheme = Tier(scheme)
    tiers = {d.name: d.tier for d in decisions}
    return {
        "report_version": REPORT_VERSION,
        "corpus_digest": corpus_digest,
        "calibration_sample": dict(calibration_sample),
        "evaluation_sample": dict(evaluation_sample),
        "format": {
            "scheme": scheme.value,
            "rounding": Rounding(rounding).value,
            "block_size": FP4_BLOCK_SIZE,
            "weight_dtype": "float4_e2m1 (packed 2 per uint8)",
            "weight_scale_dtype": "float8_e4m3fn",
            "weight_global_scale_dtype": "float32",
            "input_global_scale_dtype": "float32" if scheme.quantizes_activations else None,
        },
        "plan": {
            "metric": "mean KL(P_base || P_quant) per token, nats, measured with the whole plan",
            "mode": summary.mode,
            "target_kl": summary.target_kl,
            "max_extra_bytes": summary.max_extra_bytes,
            "kl_threshold": summary.kl_threshold,
            "extra_bytes": summary.extra_bytes,
            "extra_bytes_fraction": summary.extra_bytes_fraction,
            "target_met": summary.target_met,
            "groups_by_tier": {
                t.value: sum(1 for v in tiers.values() if v is t)
                for t in Tier
                if any(v is t for v in tiers.values())
            },
            "floor": list(summary.floor),
            "exact_checked": list(summary.exact_checked),
            "rank_agreement_estimate_vs_exact": _finite(summary.rank_agreement),
            "probes": [dataclasses.asdict(p) for p in summary.probes],
            "notes": list(summary.notes),
        },
        "settings": dict(settings or {}),
        "groups": [d.row() | {"members": list(d.members)} for d in decisions],
        "ignore": list(ignore),
        "bytes_by_tier": dict(bytes_by_tier),
        "combined": {
            "all_quantized_except_lm_head": score_to_dict(all_quantized),
            "plan": score_to_dict(with_plan),
        },
        "package_versions": package_versions(),
    }


def render_kl_chart(
    decisions: Sequence[GroupDecision],
    *,
    kl_threshold: float | None = None,
    title: str = "",
) -> bytes:
    """Per-group KL of the base tier (exact where measured, else the estimate; log y), one bar per
    named group, coloured by the tier the plan chose; the runbook floor as a dashed line. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    floor = 1e-7  # log axis: a zero KL is drawn at the floor

    def base_kl(d: GroupDecision) -> float:
        value = d.exact_kl if d.exact_kl is not None else next(iter(d.estimates.values()), 0.0)
        return max(value, floor)

    values = [base_kl(d) for d in decisions]
    colors = [TIER_COLORS.get(d.tier, "tab:gray") for d in decisions]
    fig = Figure(figsize=(max(6.0, 0.13 * len(values) + 2), 4.8), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=colors, width=0.85)
    ax.set_yscale("log")
    ax.set_ylabel("KL of the group alone at its base tier (nats)")
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(
        [d.name.replace("model.layers.", "") for d in decisions], rotation=90, fontsize=5
    )
    if kl_threshold is not None:
        ax.axhline(kl_threshold, color="black", linestyle="--", linewidth=1)
        ax.text(0, kl_threshold * 1.15, f"runbook floor {kl_threshold:g}", fontsize=7)
    used = [t for t in TIER_COLORS if any(d.tier is t for d in decisions)]
    ax.legend(
        handles=[
            Patch(color=TIER_COLORS[t], label=f"{t.value} ({sum(d.tier is t for d in decisions)})")
            for t in used
        ],
        fontsize=7,
        title="chosen tier",
        title_fontsize=7,
    )
    ax.set_title(title or "per-group KL, coloured by chosen tier", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
