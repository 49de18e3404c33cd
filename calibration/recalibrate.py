"""Calibration end to end, in one call or in file-backed stages.

stats (every calibration prompt) → baseline on the sensitivity prompts → per-group KL sweep → fallback
plan → combined scores of the whole plan (a real forward of the emulated checkpoint) → export with
``calibration.json`` and the KL chart inside the checkpoint folder.

* :func:`recalibrate` — everything in one process (one model load, one baseline).
* The stages the Prefect flow runs as separate tasks, passing only paths (so the sweep can fan out
  over threads, processes or a Dask cluster, and a rerun resumes from the last finished stage):
  :func:`collect_stats_file` → :func:`target_group_names` → :func:`sweep_file` (one per group subset)
  → :func:`plan_and_export`. Each writes its output atomically and returns it unchanged when it
  already exists.

Prompts are :class:`~calibration.prompts.RenderedPrompt` (what the server sees; a ``str`` is a plain
prompt), already redacted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from torch import nn

from calibration import atomic
from calibration.checkpoint import checkpoint_bytes_by_tier, export_checkpoint
from calibration.config import CalibrationConfig
from calibration.emulate import quantize_groups, selection_groups
from calibration.groups import TargetSelection, select_targets
from calibration.models import load_causal_lm
from calibration.observers import (
    ActivationStats,
    TokenizedPrompts,
    collect_activation_stats,
    tokenize_prompts,
)
from calibration.plan import FallbackPolicy, FallbackReason, build_fallback_plan
from calibration.precision import Tier
from calibration.prompts import RenderedPrompt
from calibration.report import (
    CALIBRATION_JSON,
    KL_CHART_PNG,
    build_calibration_record,
    render_kl_chart,
)
from calibration.sensitivity import (
    Baseline,
    GroupSensitivity,
    blocks_to_cache,
    compute_baseline,
    merge_sensitivities,
    score_emulation,
    sweep_groups,
)

logger = logging.getLogger(__name__)

Prompts = Sequence[RenderedPrompt | str]


class RecalibrationResult(BaseModel):
    """Paths written and the headline numbers (for MLflow params/metrics)."""

    model_config = ConfigDict(frozen=True)

    checkpoint_dir: Path
    calibration_json: Path
    kl_chart: Path
    scheme: Tier
    corpus_digest: str
    num_groups: int
    fallback_groups: tuple[str, ...]
    ignore: tuple[str, ...]
    fallback_param_fraction: float
    all_quantized_mean_kl: float
    all_quantized_p99_kl: float
    all_quantized_top1: float
    plan_mean_kl: float
    plan_p99_kl: float
    plan_top1: float
    plan_delta_perplexity: float
    calibration_tokens: int
    evaluation_tokens: int
    bytes_by_tier: dict[str, int]
    checkpoint_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Loaded:
    model: nn.Module
    tokenizer: Any
    source_dir: Path
    selection: TargetSelection


def _load(model_dir: str | Path, config: CalibrationConfig) -> _Loaded:
    """Model (in the compute dtype), tokenizer, source folder and target selection."""
    loaded = load_causal_lm(model_dir, dtype=config.compute_dtype, device=config.device)
    if loaded.tokenizer is None:
        raise ValueError(
            f"{model_dir} has no tokenizer files; calibration needs to tokenize prompts"
        )
    selection = select_targets(loaded.model, config.ignore)
    if not selection.groups:
        raise ValueError(
            f"{model_dir}: no Linear layer can be quantized with ignore={config.ignore}"
        )
    return _Loaded(loaded.model, loaded.tokenizer, loaded.source_dir, selection)


def _tokenize(
    loaded: _Loaded, prompts: Prompts, config: CalibrationConfig, *, budget: bool
) -> TokenizedPrompts:
    return tokenize_prompts(
        loaded.tokenizer,
        prompts,
        max_length=config.max_prompt_tokens,
        batch_size=config.batch_size,
        token_budget=config.token_budget if budget else None,
    )


def _stats(
    loaded: _Loaded, prompts: Prompts, config: CalibrationConfig, progress: bool
) -> ActivationStats:
    """Input amax of every targeted group over the calibration prompts (within the token budget)."""
    tokenized = _tokenize(loaded, prompts, config, budget=True)
    if tokenized.truncated:
        logger.warning(
            "%d of %d calibration prompts were longer than %d tokens and were truncated",
            tokenized.truncated,
            tokenized.num_prompts,
            config.max_prompt_tokens,
        )
    stats = collect_activation_stats(
        loaded.model, tokenized.batches, loaded.selection, progress=progress
    )
    return dataclasses.replace(
        stats, truncated_prompts=tokenized.truncated, over_budget_prompts=tokenized.over_budget
    )


def _baseline(
    loaded: _Loaded, prompts: Prompts, config: CalibrationConfig, progress: bool
) -> Baseline:
    tokenized = _tokenize(loaded, prompts, config, budget=False)
    return compute_baseline(
        loaded.model,
        tokenized.batches,
        cache_blocks=blocks_to_cache(loaded.selection.groups) if config.use_block_cache else (),
        logprob_dtype=config.logprob_dtype.torch_dtype,
        progress=progress,
    )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; set overwrite=True to replace it")


def _plan_score_export(
    loaded: _Loaded,
    *,
    model_dir: str | Path,
    stats: ActivationStats,
    baseline: Baseline,
    sensitivities: Sequence[GroupSensitivity],
    corpus_digest: str,
    out_dir: Path,
    config: CalibrationConfig,
    overwrite: bool,
    started: float,
) -> RecalibrationResult:
    """Fallback plan → combined scores (everything quantized, the plan: the emulated checkpoint) →
    atomic export of exactly what was scored."""
    model, selection = loaded.model, loaded.selection
    policy = FallbackPolicy(config.kl_threshold, config.max_fallback_fraction)
    plan = build_fallback_plan(selection, sensitivities, policy)
    storage_dtype = config.storage_dtype.torch_dtype
    amax = stats.group_input_amax
    fallback_names = {f.name for f in plan.fallbacks}
    tiers = {
        g.name: Tier.BF16 if g.name in fallback_names else config.scheme for g in selection.groups
    }
    planned = quantize_groups(model, selection.groups, tiers, amax)
    all_groups = quantize_groups(model, selection.groups, config.scheme, amax)
    all_quantized = score_emulation(model, baseline, all_groups, storage_dtype=storage_dtype)
    with_plan = score_emulation(model, baseline, planned, storage_dtype=storage_dtype)
    logger.info(
        "combined mean KL: everything quantized %.5f, plan %.5f (%d fallback groups)",
        all_quantized.mean_kl,
        with_plan.mean_kl,
        len(plan.fallbacks) - len(selection.skipped),
    )
    skipped = dict(selection.skipped)
    for fallback in plan.fallbacks:
        skipped.update(
            dict.fromkeys(fallback.members, f"{fallback.reason.value}: {fallback.detail}")
        )
    chart = render_kl_chart(
        sensitivities, plan, title=f"{Path(model_dir).name}: per-group KL ({config.scheme.value})"
    )

    def record(bytes_by_tier: dict[str, int] | None) -> dict[str, Any]:
        return build_calibration_record(
            corpus_digest=corpus_digest,
            scheme=config.scheme,
            calibration_sample={
                "prompts": stats.num_prompts,
                "tokens": stats.num_tokens,
                "truncated_prompts": stats.truncated_prompts,
                "over_budget_prompts": stats.over_budget_prompts,
            },
            evaluation_sample={"prompts": baseline.num_prompts, "tokens": baseline.num_tokens},
            sensitivities=sensitivities,
            plan=plan,
            all_quantized=all_quantized,
            with_plan=with_plan,
            settings=config_record(config) | {"source_model": str(loaded.source_dir)},
            bytes_by_tier=bytes_by_tier,
        )

    bytes_by_tier = checkpoint_bytes_by_tier(model, planned, storage_dtype)
    summary = export_checkpoint(
        model,
        out_dir,
        planned,
        skipped=skipped,
        source_dir=loaded.source_dir,
        tokenizer=loaded.tokenizer,
        extra_files={CALIBRATION_JSON: record(bytes_by_tier), KL_CHART_PNG: chart},
        overwrite=overwrite,
        dtype=storage_dtype,
    )
    group_fallbacks = tuple(
        f.name for f in plan.fallbacks if f.reason is not FallbackReason.ALWAYS_HIGH_PRECISION
    )
    return RecalibrationResult(
        checkpoint_dir=out_dir,
        calibration_json=out_dir / CALIBRATION_JSON,
        kl_chart=out_dir / KL_CHART_PNG,
        scheme=config.scheme,
        corpus_digest=corpus_digest,
        num_groups=len(selection.groups),
        fallback_groups=group_fallbacks,
        ignore=plan.ignore,
        fallback_param_fraction=plan.fallback_param_fraction,
        all_quantized_mean_kl=all_quantized.mean_kl,
        all_quantized_p99_kl=all_quantized.p99_kl,
        all_quantized_top1=all_quantized.top1_agreement,
        plan_mean_kl=with_plan.mean_kl,
        plan_p99_kl=with_plan.p99_kl,
        plan_top1=with_plan.top1_agreement,
        plan_delta_perplexity=with_plan.delta_perplexity,
        calibration_tokens=stats.num_tokens,
        evaluation_tokens=baseline.num_tokens,
        bytes_by_tier=dict(summary.bytes_by_tier),
        checkpoint_bytes=summary.bytes_after,
        seconds=time.perf_counter() - started,
    )


def config_record(config: CalibrationConfig) -> dict[str, Any]:
    """The config as JSON-able values (enums by value), for calibration.json and MLflow params."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=lambda v: v.value))


def recalibrate(
    model_dir: str | Path,
    calibration_prompts: Prompts,
    sensitivity_prompts: Prompts,
    corpus_digest: str,
    out_dir: str | Path,
    config: CalibrationConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> RecalibrationResult:
    """Calibrate the safetensors model at ``model_dir`` and write its quantized checkpoint to ``out_dir``.

    ``calibration_prompts`` set the activation statistics (all of them, within the token budget);
    ``sensitivity_prompts`` (disjoint) score each group and the plan. Both are rendered, already
    redacted prompts; ``corpus_digest`` identifies the calibration set. The checkpoint folder is
    written atomically; ``out_dir`` must not exist unless ``overwrite``.
    """
    config = config or CalibrationConfig()
    started = time.perf_counter()
    if not corpus_digest:
        raise ValueError(
            "corpus_digest is required (it ties the checkpoint to its calibration set)"
        )
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    loaded = _load(model_dir, config)
    stats = _stats(loaded, calibration_prompts, config, progress)
    baseline = _baseline(loaded, sensitivity_prompts, config, progress)
    sensitivities = sweep_groups(
        loaded.model,
        baseline,
        loaded.selection.groups,
        stats,
        config.scheme,
        use_block_cache=config.use_block_cache,
        num_workers=config.num_workers,
        progress=progress,
    )
    return _plan_score_export(
        loaded,
        model_dir=model_dir,
        stats=stats,
        baseline=baseline,
        sensitivities=sensitivities,
        corpus_digest=corpus_digest,
        out_dir=out_dir,
        config=config,
        overwrite=overwrite,
        started=started,
    )


# ------------------------------------------------------------------------------------------ stages

SWEEP_FORMAT = "fp4roll.kl-sweep"


def collect_stats_file(
    model_dir: str | Path,
    calibration_prompts: Prompts,
    out_path: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Stage 1: input amax of every targeted group over the calibration prompts → JSON."""
    config = config or CalibrationConfig()
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    stats = _stats(_load(model_dir, config), calibration_prompts, config, progress)
    return atomic.write_text(out_path, stats.to_json())


def target_group_names(
    model_dir: str | Path, config: CalibrationConfig | None = None
) -> tuple[str, ...]:
    """Stage 2: the fused groups to score, in model order (what the sweep is split over)."""
    return tuple(g.name for g in _load(model_dir, config or CalibrationConfig()).selection.groups)


def sweep_file(
    model_dir: str | Path,
    sensitivity_prompts: Prompts,
    stats_path: str | Path,
    group_names: Sequence[str],
    out_path: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Stage 3 (fans out): baseline + per-group KL for a subset of groups → JSON records.

    Results do not depend on how the groups are split (each group is scored alone against the same
    baseline), so any partition merged with :func:`plan_and_export` gives the same plan.
    """
    config = config or CalibrationConfig()
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    loaded = _load(model_dir, config)
    stats = ActivationStats.from_json(Path(stats_path).read_text())
    baseline = _baseline(loaded, sensitivity_prompts, config, progress)
    records = sweep_groups(
        loaded.model,
        baseline,
        selection_groups(loaded.selection, group_names),
        stats,
        config.scheme,
        use_block_cache=config.use_block_cache,
        num_workers=config.num_workers,
        progress=progress,
    )
    payload = {
        "format": SWEEP_FORMAT,
        "version": 1,
        "records": [dataclasses.asdict(r) for r in records],
    }
    return atomic.write_json(out_path, payload)


def load_sweep_file(path: str | Path) -> tuple[GroupSensitivity, ...]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path} is not a KL-sweep file (format {data.get('format')!r})")
    return tuple(GroupSensitivity(**{**r, "members": tuple(r["members"])}) for r in data["records"])


def plan_and_export(
    model_dir: str | Path,
    sensitivity_prompts: Prompts,
    stats_path: str | Path,
    sweep_paths: Sequence[str | Path],
    corpus_digest: str,
    out_dir: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> RecalibrationResult:
    """Stage 4: merge the sweep files, plan, score the plan, export the checkpoint.

    A finished ``out_dir`` (its ``calibration.json`` exists) is reused as is.
    """
    config = config or CalibrationConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / CALIBRATION_JSON).exists():
        logger.info("%s already holds a finished checkpoint; reusing it", out_dir)
        return result_from_checkpoint(out_dir, config)
    loaded = _load(model_dir, config)
    stats = ActivationStats.from_json(Path(stats_path).read_text())
    sensitivities = merge_sensitivities((load_sweep_file(p) for p in sweep_paths), loaded.selection)
    covered = {s.group for s in sensitivities}
    missing = [g.name for g in loaded.selection.groups if g.name not in covered]
    if missing:
        raise ValueError(f"the sweep files do not cover {len(missing)} groups, e.g. {missing[:3]}")
    baseline = _baseline(loaded, sensitivity_prompts, config, progress)
    return _plan_score_export(
        loaded,
        model_dir=model_dir,
        stats=stats,
        baseline=baseline,
        sensitivities=sensitivities,
        corpus_digest=corpus_digest,
        out_dir=out_dir,
        config=config,
        overwrite=True,
        started=started,
    )


def result_from_checkpoint(out_dir: Path, config: CalibrationConfig) -> RecalibrationResult:
    """Rebuild the result of a finished export from its ``calibration.json``."""
    record = json.loads((out_dir / CALIBRATION_JSON).read_text())
    combined_all = record["combined"]["all_quantized_except_lm_head"]
    combined = record["combined"]["plan"]

    def num(value: float | None) -> float:  # null in JSON for non-finite values
        return float("nan") if value is None else float(value)

    bytes_by_tier = dict(record.get("bytes_by_tier") or {})
    return RecalibrationResult(
        checkpoint_dir=out_dir,
        calibration_json=out_dir / CALIBRATION_JSON,
        kl_chart=out_dir / KL_CHART_PNG,
        scheme=config.scheme,
        corpus_digest=record["corpus_digest"],
        num_groups=len(record["groups"]),
        fallback_groups=tuple(
            f["name"]
            for f in record["fallbacks"]
            if f["reason"] != FallbackReason.ALWAYS_HIGH_PRECISION.value
        ),
        ignore=tuple(record["ignore"]),
        fallback_param_fraction=record["fallback_param_fraction"],
        all_quantized_mean_kl=num(combined_all["mean_kl"]),
        all_quantized_p99_kl=num(combined_all["p99_kl"]),
        all_quantized_top1=num(combined_all["top1_agreement"]),
        plan_mean_kl=num(combined["mean_kl"]),
        plan_p99_kl=num(combined["p99_kl"]),
        plan_top1=num(combined["top1_agreement"]),
        plan_delta_perplexity=num(combined["delta_perplexity"]),
        calibration_tokens=record["calibration_sample"]["tokens"],
        evaluation_tokens=record["evaluation_sample"]["tokens"],
        bytes_by_tier=bytes_by_tier,
        checkpoint_bytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")),
        seconds=0.0,
    )
