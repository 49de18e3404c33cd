"""The whole calibration as one plain function (what the Prefect ``recalibrate`` flow calls).

stats → baseline → per-group KL sweep → fallback plan → combined scores → NVFP4 export with
``calibration.json`` and the KL chart inside the checkpoint folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from calibration.checkpoint import export_nvfp4_checkpoint
from calibration.groups import DEFAULT_IGNORE, select_targets
from calibration.models import load_causal_lm
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.plan import FallbackPolicy, FallbackReason, build_fallback_plan
from calibration.report import (
    CALIBRATION_JSON,
    KL_CHART_PNG,
    build_calibration_record,
    write_kl_chart,
)
from calibration.sensitivity import (
    QuantScheme,
    blocks_to_cache,
    compute_baseline,
    score_quantized,
    sweep_groups,
)

logger = logging.getLogger(__name__)


class RecalibrationConfig(BaseModel):
    """Knobs of one calibration run (defaults follow DESIGN.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: QuantScheme = QuantScheme.W4A4
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
    scheme: QuantScheme
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
    if out_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{out_dir} already exists; set overwrite=True to replace it")

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

    calibration = tokenize_batches(
        tokenizer, calibration_texts, max_length=config.max_seq_len, batch_size=config.batch_size
    )
    evaluation = tokenize_batches(
        tokenizer, eval_texts, max_length=config.max_seq_len, batch_size=config.batch_size
    )
    stats = collect_activation_stats(model, calibration, selection, progress=config.progress)
    baseline = compute_baseline(
        model,
        evaluation,
        cache_blocks=blocks_to_cache(selection.groups) if config.use_block_cache else (),
        logprob_dtype=getattr(torch, config.logprob_dtype),
        progress=config.progress,
    )
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
    policy = FallbackPolicy(config.kl_threshold, config.max_fallback_fraction)
    plan = build_fallback_plan(selection, sensitivities, policy)
    all_quantized = score_quantized(model, baseline, selection.groups, stats, config.scheme)
    with_plan = score_quantized(model, baseline, plan.quantized_groups, stats, config.scheme)
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
    export_nvfp4_checkpoint(
        model,
        out_dir,
        scheme=config.scheme,
        selection=selection,
        fallback=group_fallbacks,
        input_amax=stats.group_input_amax if config.scheme.quantizes_activations else None,
        source_dir=source_dir,
        tokenizer=tokenizer,
        extra_files={CALIBRATION_JSON: record},
        overwrite=config.overwrite,
    )
    chart = write_kl_chart(
        sensitivities,
        plan,
        out_dir / KL_CHART_PNG,
        title=f"{Path(model_dir).name}: per-group KL ({config.scheme.value})",
    )
    return RecalibrationResult(
        checkpoint_dir=out_dir,
        calibration_json=out_dir / CALIBRATION_JSON,
        kl_chart=chart,
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
