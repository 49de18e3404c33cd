"""Calibration end to end, in one call or in file-backed stages.

stats → baseline → per-group KL sweep → fallback plan → combined scores → NVFP4 export with
``calibration.json`` and the KL chart inside the checkpoint folder.

* :func:`recalibrate` — everything in one process (one model load, one baseline).
* The stages the Prefect flow runs as separate tasks, passing only paths (so the sweep can fan out
  over threads, processes or a Dask cluster, and a rerun resumes from the last finished stage):
  :func:`collect_stats_file` → :func:`target_group_names` → :func:`sweep_file` (one per group subset)
  → :func:`finalize`. Each writes its output atomically and returns it unchanged when it already exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from calibration.checkpoint import DEFAULT_STORAGE_DTYPE, export_checkpoint
from calibration.emulate import quantize_groups
from calibration.groups import DEFAULT_IGNORE, select_targets
from calibration.models import load_causal_lm
from calibration.observers import ActivationStats, collect_activation_stats, tokenize_batches
from calibration.plan import FallbackPolicy, FallbackReason, build_fallback_plan
from calibration.precision import Tier
from calibration.report import (
    CALIBRATION_JSON,
    KL_CHART_PNG,
    build_calibration_record,
    render_kl_chart,
)
from calibration.sensitivity import (
    Baseline,
    GroupSensitivity,
    SweepConfig,
    blocks_to_cache,
    compute_baseline,
    merge_sensitivities,
    run_sensitivity_sweep,
    score_emulation,
    sweep_groups,
)

logger = logging.getLogger(__name__)


class RecalibrationConfig(BaseModel):
    """Knobs of one calibration run (defaults follow DESIGN.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Tier = Tier.NVFP4
    kl_threshold: float | None = Field(0.05, ge=0, description="Mean-KL limit per group (nats).")
    max_fallback_fraction: float | None = Field(
        None, ge=0, le=1, description="Max share of quantizable parameters kept high precision."
    )
    max_seq_len: int = Field(128, ge=2, le=8192)
    batch_size: int = Field(8, ge=1)
    dtype: str = Field("float32", description="Model dtype during calibration and scoring.")
    device: str = "cpu"
    num_workers: int = Field(1, ge=1, description="Thread-pool workers for the KL sweep.")
    logprob_dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    use_block_cache: bool = True
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    overwrite: bool = False
    progress: bool = True


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
    seconds: float


def _load(model_dir: str | Path, config: RecalibrationConfig):  # noqa: ANN202
    """Model, tokenizer, source folder and target selection; clear errors for unusable models."""
    model, tokenizer, source_dir = load_causal_lm(
        model_dir, dtype=config.dtype, device=config.device
    )
    if tokenizer is None:
        raise ValueError(
            f"{model_dir} has no tokenizer files; calibration needs to tokenize prompts"
        )
    selection = select_targets(model, config.ignore)
    if not selection.groups:
        raise ValueError(
            f"{model_dir}: no Linear layer can be quantized with ignore={config.ignore}"
        )
    return model, tokenizer, source_dir, selection


def _batches(tokenizer, texts: Sequence[str], config: RecalibrationConfig):  # noqa: ANN001, ANN202
    return tokenize_batches(
        tokenizer, texts, max_length=config.max_seq_len, batch_size=config.batch_size
    )


def _baseline(model, evaluation, groups, config: RecalibrationConfig) -> Baseline:  # noqa: ANN001
    return compute_baseline(
        model,
        evaluation,
        cache_blocks=blocks_to_cache(groups) if config.use_block_cache else (),
        logprob_dtype=getattr(torch, config.logprob_dtype),
        progress=config.progress,
    )


def _check_out_dir(out_dir: Path, config: RecalibrationConfig) -> None:
    if out_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{out_dir} already exists; set overwrite=True to replace it")


def _plan_score_export(
    *,
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    model_dir: str | Path,
    source_dir: Path,
    selection,  # noqa: ANN001
    stats: ActivationStats,
    baseline: Baseline,
    sensitivities: Sequence[GroupSensitivity],
    corpus_digest: str,
    out_dir: Path,
    config: RecalibrationConfig,
    started: float,
) -> RecalibrationResult:
    """Fallback plan → combined scores (everything quantized, the plan) → atomic export."""
    policy = FallbackPolicy(config.kl_threshold, config.max_fallback_fraction)
    plan = build_fallback_plan(selection, sensitivities, policy)
    storage_dtype = DEFAULT_STORAGE_DTYPE
    amax = stats.group_input_amax
    all_groups = quantize_groups(model, selection.groups, config.scheme, amax)
    fallback_names = {f.name for f in plan.fallbacks}
    tiers = {
        g.name: Tier.BF16 if g.name in fallback_names else config.scheme for g in selection.groups
    }
    planned = quantize_groups(model, selection.groups, tiers, amax)
    all_quantized = score_emulation(model, baseline, all_groups, storage_dtype=storage_dtype)
    with_plan = score_emulation(model, baseline, planned, storage_dtype=storage_dtype)
    logger.info(
        "combined mean KL: everything quantized %.5f, plan %.5f (%d fallback groups)",
        all_quantized.mean_kl,
        with_plan.mean_kl,
        len(plan.fallbacks) - len(selection.skipped),
    )
    record = build_calibration_record(
        corpus_digest=corpus_digest,
        scheme=config.scheme,
        calibration_sample={"prompts": stats.num_prompts, "tokens": stats.num_tokens},
        evaluation_sample={"prompts": baseline.num_prompts, "tokens": baseline.num_tokens},
        sensitivities=sensitivities,
        plan=plan,
        all_quantized=all_quantized,
        with_plan=with_plan,
        settings=config.model_dump(mode="json", exclude={"overwrite", "progress"})
        | {"source_model": str(source_dir)},
    )
    group_fallbacks = {
        f.name: f"{f.reason.value}: {f.detail}"
        for f in plan.fallbacks
        if f.reason is not FallbackReason.ALWAYS_HIGH_PRECISION
    }
    chart = render_kl_chart(
        sensitivities, plan, title=f"{Path(model_dir).name}: per-group KL ({config.scheme.value})"
    )
    skipped = dict(selection.skipped)
    for fallback in plan.fallbacks:
        skipped.update(
            dict.fromkeys(fallback.members, f"{fallback.reason.value}: {fallback.detail}")
        )
    export_checkpoint(
        model,
        out_dir,
        planned,
        skipped=skipped,
        source_dir=source_dir,
        tokenizer=tokenizer,
        extra_files={CALIBRATION_JSON: record, KL_CHART_PNG: chart},
        overwrite=config.overwrite,
        dtype=storage_dtype,
    )
    return RecalibrationResult(
        checkpoint_dir=out_dir,
        calibration_json=out_dir / CALIBRATION_JSON,
        kl_chart=out_dir / KL_CHART_PNG,
        scheme=config.scheme,
        corpus_digest=corpus_digest,
        num_groups=len(selection.groups),
        fallback_groups=tuple(group_fallbacks),
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
        seconds=time.perf_counter() - started,
    )


def recalibrate(
    model_dir: str | Path,
    calibration_texts: Sequence[str],
    eval_texts: Sequence[str],
    corpus_digest: str,
    out_dir: str | Path,
    config: RecalibrationConfig | None = None,
) -> RecalibrationResult:
    """Calibrate the safetensors model at ``model_dir`` and write an NVFP4 checkpoint to ``out_dir``.

    ``calibration_texts`` (activation stats) and ``eval_texts`` (held-out KL scoring) are rendered,
    already-redacted prompts; ``corpus_digest`` identifies the calibration set. The checkpoint folder
    is written atomically; ``out_dir`` must not exist unless ``config.overwrite``.
    """
    config = config or RecalibrationConfig()
    started = time.perf_counter()
    if not corpus_digest:
        raise ValueError(
            "corpus_digest is required (it ties the checkpoint to its calibration set)"
        )
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, config)
    model, tokenizer, source_dir, selection = _load(model_dir, config)
    stats = collect_activation_stats(
        model, _batches(tokenizer, calibration_texts, config), selection, progress=config.progress
    )
    baseline = _baseline(model, _batches(tokenizer, eval_texts, config), selection.groups, config)
    sensitivities = sweep_groups(
        model,
        baseline,
        selection.groups,
        stats,
        config.scheme,
        use_block_cache=config.use_block_cache,
        num_workers=config.num_workers,
        progress=config.progress,
    )
    return _plan_score_export(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        source_dir=source_dir,
        selection=selection,
        stats=stats,
        baseline=baseline,
        sensitivities=sensitivities,
        corpus_digest=corpus_digest,
        out_dir=out_dir,
        config=config,
        started=started,
    )


# ------------------------------------------------------------------------------------------ stages

SWEEP_FORMAT = "fp4roll.kl-sweep"


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def collect_stats_file(
    model_dir: str | Path,
    calibration_texts: Sequence[str],
    out_path: str | Path,
    config: RecalibrationConfig | None = None,
) -> Path:
    """Stage 1: input amax of every targeted group over the calibration prompts → JSON."""
    config = config or RecalibrationConfig()
    out_path = Path(out_path)
    if out_path.exists() and not config.overwrite:
        return out_path
    model, tokenizer, _, selection = _load(model_dir, config)
    stats = collect_activation_stats(
        model, _batches(tokenizer, calibration_texts, config), selection, progress=config.progress
    )
    return _write_atomic(out_path, stats.to_json())


def target_group_names(
    model_dir: str | Path, config: RecalibrationConfig | None = None
) -> tuple[str, ...]:
    """Stage 2: the fused groups to score, in model order (what the sweep is split over)."""
    _, _, _, selection = _load(model_dir, config or RecalibrationConfig())
    return tuple(g.name for g in selection.groups)


def _groups_by_name(selection, names: Sequence[str]):  # noqa: ANN001, ANN202
    known = {g.name: g for g in selection.groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown groups (not targeted in this model): {unknown[:5]}")
    return [known[n] for n in names]


def sweep_file(
    model_dir: str | Path,
    eval_texts: Sequence[str],
    stats_path: str | Path,
    group_names: Sequence[str],
    out_path: str | Path,
    config: RecalibrationConfig | None = None,
) -> Path:
    """Stage 3 (fans out): baseline + per-group KL for a subset of groups → JSON records.

    Results do not depend on how the groups are split (each group is scored alone against the same
    baseline), so any partition merged with :func:`finalize` gives the same plan.
    """
    config = config or RecalibrationConfig()
    out_path = Path(out_path)
    if out_path.exists() and not config.overwrite:
        return out_path
    model, tokenizer, _, selection = _load(model_dir, config)
    stats = ActivationStats.from_json(Path(stats_path).read_text())
    records = run_sensitivity_sweep(
        model,
        tokenizer,
        eval_texts,
        _groups_by_name(selection, group_names),
        stats,
        SweepConfig(
            tier=config.scheme,
            max_length=config.max_seq_len,
            batch_size=config.batch_size,
            logprob_dtype=config.logprob_dtype,
            use_block_cache=config.use_block_cache,
            num_workers=config.num_workers,
        ),
        progress=config.progress,
    )
    payload = {
        "format": SWEEP_FORMAT,
        "version": 1,
        "records": [dataclasses.asdict(r) for r in records],
    }
    return _write_atomic(out_path, json.dumps(payload, indent=2))


def load_sweep_file(path: str | Path) -> tuple[GroupSensitivity, ...]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path} is not a KL-sweep file (format {data.get('format')!r})")
    return tuple(GroupSensitivity(**{**r, "members": tuple(r["members"])}) for r in data["records"])


def _result_from_checkpoint(out_dir: Path, config: RecalibrationConfig) -> RecalibrationResult:
    """Rebuild the result of a finished :func:`finalize` from its ``calibration.json``."""
    record = json.loads((out_dir / CALIBRATION_JSON).read_text())
    combined_all = record["combined"]["all_quantized_except_lm_head"]
    combined = record["combined"]["plan"]

    def num(value) -> float:  # noqa: ANN001 - null in JSON for non-finite values
        return float("nan") if value is None else float(value)

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
        seconds=0.0,
    )


def finalize(
    model_dir: str | Path,
    eval_texts: Sequence[str],
    stats_path: str | Path,
    sweep_paths: Sequence[str | Path],
    corpus_digest: str,
    out_dir: str | Path,
    config: RecalibrationConfig | None = None,
) -> RecalibrationResult:
    """Stage 4: merge the sweep files, plan, score, export. A finished ``out_dir`` is reused."""
    config = config or RecalibrationConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / CALIBRATION_JSON).exists() and not config.overwrite:
        logger.info("%s already holds a finished checkpoint; reusing it", out_dir)
        return _result_from_checkpoint(out_dir, config)
    _check_out_dir(out_dir, config)
    model, tokenizer, source_dir, selection = _load(model_dir, config)
    stats = ActivationStats.from_json(Path(stats_path).read_text())
    sensitivities = merge_sensitivities((load_sweep_file(p) for p in sweep_paths), selection)
    missing = [g.name for g in selection.groups if g.name not in {s.group for s in sensitivities}]
    if missing:
        raise ValueError(f"the sweep files do not cover {len(missing)} groups, e.g. {missing[:3]}")
    baseline = _baseline(model, _batches(tokenizer, eval_texts, config), selection.groups, config)
    return _plan_score_export(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        source_dir=source_dir,
        selection=selection,
        stats=stats,
        baseline=baseline,
        sensitivities=sensitivities,
        corpus_digest=corpus_digest,
        out_dir=out_dir,
        config=config,
        started=started,
    )
