"""The plain functions behind every Prefect task (one task → one function here).

Each step takes and returns paths, URIs, digests and small pydantic records — never tensors or models —
so a task's result persists as JSON and a rerun after a crash picks up where the last run stopped.
Where a step writes files, it writes them under a folder keyed by its inputs (work folder of the
calibration set, the version, the rollout) and is idempotent: a finished output is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from calibration import recalibrate
from calibration.config import CalibrationConfig
from calibration.models import check_model_dir, load_tokenizer, prepare_smollm2
from calibration.prompts import PromptRenderer, RenderedPrompt
from calibration.recalibrate import RecalibrationResult, config_record
from calibration.sampling import Role
from pipelines import prompt_logs
from pipelines.params import PACKAGED_SMOLLM2, DriftCheckParams, RecalibrateParams
from pipelines.prompt_logs import (
    DriftParameters,
    calibration_prompts,
    export_calibration_set,
    sample_and_store,
)
from pipelines.results import DriftRecord
from registry import db, ledger, mlflow_registry, versions
from registry.aliases import Alias
from registry.db import fp4roll_home, safe_url
from registry.mlflow_registry import RegistrationMetrics, RegistrationRequest, default_tracking_uri
from registry.prompt_logs import list_calibration_sets
from registry.url_redaction import redact_urls
from registry.versions import find_alias

logger = logging.getLogger(__name__)


def home_instance_id() -> str:
    """A random id created with ``$FP4ROLL_HOME`` and part of every task cache key: a home that was
    wiped and created again never reuses cached task results that point into the old one."""
    path = fp4roll_home() / ".instance-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(uuid.uuid4().hex)
    for _ in range(50):  # the creator may not have written it yet
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty; delete it and retry")


def work_dir(*parts: str) -> Path:
    path = fp4roll_home().joinpath("work", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ source


def resolve_source_model(source_model: str) -> str:
    """``'smollm2'`` → the packaged SmolLM2 converted once to safetensors; else a checked local folder."""

    if source_model == PACKAGED_SMOLLM2:
        return str(prepare_smollm2())
    path = Path(source_model).expanduser().resolve()
    check_model_dir(path)
    return str(path)


# ----------------------------------------------------------------------------------- calibration set


class CalibrationSetRef(BaseModel):
    """A stored calibration set (by digest) and its exported audit folder (redacted text only)."""

    model_config = ConfigDict(frozen=True)

    digest: str
    calibration_set_id: int
    size: int
    sensitivity_size: int
    holdout_size: int
    export_dir: str  # calibration_set.json + members.jsonl, logged to MLflow with the run


def sample_calibration_set(params: RecalibrateParams, source_dir: str) -> CalibrationSetRef:
    """Sample (stratified, deduplicated, redacted, rendered with the source model's chat template)
    calibration, sensitivity and canary hold-out prompts from the log window, record them in the store
    (idempotent: same content, same digest) and export them."""

    db.ensure_schema(params.db_url)
    tokenizer = load_tokenizer(source_dir)
    if tokenizer is None:
        raise ValueError(f"{source_dir} has no tokenizer: prompts cannot be rendered for it")
    outcome = sample_and_store(params.sampling, PromptRenderer(tokenizer), params.db_url)
    logger.info(
        "calibration set %s (%s): %d calibration + %d sensitivity + %d hold-out prompts",
        outcome.digest[:12],
        "new" if outcome.created else "already stored",
        outcome.size,
        outcome.sensitivity_size,
        outcome.holdout_size,
    )
    export_dir = fp4roll_home() / "work" / "calibration-sets" / outcome.digest
    if not export_dir.exists():
        export_calibration_set(outcome.digest, export_dir, params.db_url)
    return CalibrationSetRef(
        digest=outcome.digest,
        calibration_set_id=outcome.calibration_set_id,
        size=outcome.size,
        sensitivity_size=outcome.sensitivity_size,
        holdout_size=outcome.holdout_size,
        export_dir=str(export_dir),
    )


def sweep_partitions(group_names: Sequence[str], parts: int) -> list[list[str]]:
    """Split groups into ``parts`` contiguous, near-equal slices (model order kept; none empty)."""
    parts = max(1, min(parts, len(group_names)))
    size, extra = divmod(len(group_names), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(group_names[start:end]))
        start = end
    return out


# ----------------------------------------------------------------------------------- calibration


def calibration_work_dir(params: RecalibrateParams, corpus_digest: str, source_dir: str) -> str:
    """The work folder of one calibration run, named by a hash of everything that decides its
    results (the calibration set, the source model's CONTENT — not its path, so a model changed in
    place never reuses stale statistics, sweeps or checkpoints — and the calibration config), so
    reruns resume."""
    from pipelines.content_digest import folder_digest

    settings = {"source_content": folder_digest(source_dir), **config_record(params.calibration)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return str(work_dir(params.model_name, f"{corpus_digest[:16]}-{key}"))


def _prompts(corpus_digest: str, db_url: str | None, role: Role) -> list[RenderedPrompt]:

    prompts = calibration_prompts(corpus_digest, db_url, role)
    if not prompts:
        raise ValueError(f"calibration set {corpus_digest[:12]} has no {role.value} prompts")
    return prompts


def calibration_pass(
    source_dir: str,
    corpus_digest: str,
    db_url: str | None,
    config: CalibrationConfig,
    work_dir: str,
) -> tuple[str, str]:
    """Input statistics and GPTQ / MSE-rounded NVFP4 weights of every group over every calibration
    prompt → (statistics JSON path, rounded safetensors path)."""
    prompts = _prompts(corpus_digest, db_url, Role.CALIBRATION)
    stats, rounded = recalibrate.calibrate_files(
        source_dir,
        prompts,
        Path(work_dir) / "activation_stats.json",
        Path(work_dir) / "rounded.safetensors",
        config,
        progress=False,
    )
    return str(stats), str(rounded)


def tier_scores(
    source_dir: str,
    corpus_digest: str,
    db_url: str | None,
    stats_path: str,
    rounded_path: str,
    config: CalibrationConfig,
    work_dir: str,
) -> str:
    """Estimated KL of every group at every candidate tier (one Fisher pass) → JSON path."""
    out = Path(work_dir) / "tier_scores.json"
    prompts = _prompts(corpus_digest, db_url, Role.CALIBRATION)
    return str(
        recalibrate.score_file(
            source_dir, prompts, stats_path, rounded_path, out, config, progress=False
        )
    )


def exact_candidates(scores_path: str, config: CalibrationConfig) -> list[str]:
    """The groups near the runbook floor, whose decision needs an exact KL."""
    return recalibrate.exact_candidates(scores_path, config)


def kl_sweep_part(
    source_dir: str,
    corpus_digest: str,
    db_url: str | None,
    stats_path: str,
    rounded_path: str,
    groups: Sequence[str],
    part: int,
    config: CalibrationConfig,
    work_dir: str,
) -> str:
    """Exact KL of ``groups`` (each quantized alone) on the sensitivity prompts → JSON path."""
    out = Path(work_dir) / f"sweep-part-{part:03d}.json"
    prompts = _prompts(corpus_digest, db_url, Role.SENSITIVITY)
    return str(
        recalibrate.sweep_file(
            source_dir, prompts, stats_path, rounded_path, groups, out, config, progress=False
        )
    )


class CalibratedCheckpoint(RecalibrationResult):
    """The exported candidate, its headline numbers and its weight bytes (source vs NVFP4)."""

    bytes_before: int
    bytes_after: int


def _weights_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def plan_and_export(
    source_dir: str,
    corpus_digest: str,
    db_url: str | None,
    stats_path: str,
    rounded_path: str,
    scores_path: str,
    part_paths: Sequence[str],
    config: CalibrationConfig,
    work_dir: str,
) -> CalibratedCheckpoint:
    """Plan the tiers (every plan measured), export the checkpoint (idempotent)."""
    prompts = _prompts(corpus_digest, db_url, Role.SENSITIVITY)
    out_dir = Path(work_dir) / "checkpoint"
    result = recalibrate.plan_and_export(
        source_dir,
        prompts,
        stats_path,
        rounded_path,
        scores_path,
        part_paths,
        corpus_digest,
        out_dir,
        config,
        progress=False,
    )
    return CalibratedCheckpoint(
        **dict(result),
        bytes_before=_weights_bytes(source_dir),
        bytes_after=_weights_bytes(result.checkpoint_dir),
    )


# ------------------------------------------------------------------------------------ registration


class Registration(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    reused: bool
    run_url: str


def run_url(tracking_uri: str | None, experiment_id: str, run_id: str) -> str:
    """Where to see a run: the server's page, or the page `fp4roll ui` serves for a local store."""

    uri = tracking_uri or default_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return redact_urls(f"{base}/#/experiments/{experiment_id}/runs/{run_id}")


def register_baseline(
    model_name: str, source_dir: str, *, tracking_uri: str | None = None, db_url: str | None = None
) -> str:
    """Register the unquantized source model once; make it champion if there is none (ledger noted)."""

    info, moves = versions.register_baseline(model_name, source_dir, tracking_uri=tracking_uri)
    if moves:
        db.ensure_schema(db_url)
        ledger.record_alias_moves(moves, db_url=db_url)
    return info.version


def register_challenger(
    params: RecalibrateParams, calibration_set: CalibrationSetRef, checkpoint: CalibratedCheckpoint
) -> Registration:
    """Log the run (params, metrics, artifacts, lineage) and create/reuse the version as challenger."""

    record = json.loads(Path(checkpoint.calibration_json).read_text())
    request = RegistrationRequest(
        model_name=params.model_name,
        source_model=params.source_model,
        scheme=checkpoint.scheme.value,
        block_size=16,
        corpus_digest=calibration_set.digest,
        corpus_source=safe_url(params.db_url),
        calibration_size=calibration_set.size,
        holdout_size=calibration_set.holdout_size,
        sensitivity_prompts=calibration_set.sensitivity_size,
        kl_threshold=params.calibration.kl_threshold,
        target_kl=params.calibration.target_kl,
        max_extra_bytes=params.calibration.max_extra_bytes,
        rounding=checkpoint.rounding.value,
        fallback_layers=(  # every layer not served as NVFP4: ignored ones and upgraded groups
            *checkpoint.ignore,
            *(
                m
                for g in record["groups"]
                if g["tier"] != checkpoint.scheme.value
                for m in g["members"]
            ),
        ),
        metrics=RegistrationMetrics(
            combined_kl=checkpoint.plan_mean_kl,
            p99_kl=checkpoint.plan_p99_kl,
            top1_agreement=checkpoint.plan_top1,
            delta_perplexity=checkpoint.plan_delta_perplexity,
            bytes_before=checkpoint.bytes_before,
            bytes_after=checkpoint.bytes_after,
            bytes_by_tier=checkpoint.bytes_by_tier,
        ),
        checkpoint_dir=checkpoint.checkpoint_dir,
        calibration_json=checkpoint.calibration_json,
        kl_plot=checkpoint.kl_chart,
        calibration_summary=Path(calibration_set.export_dir) / "calibration_set.json",
        group_table=tuple(  # calibration.json's per-group rows (members listed there)
            {k: v for k, v in g.items() if k != "members"} for g in record["groups"]
        ),
        extra_params={
            "all_quantized_mean_kl": f"{checkpoint.all_quantized_mean_kl:.6g}",
            "extra_bytes_fraction": f"{checkpoint.extra_bytes_fraction:.4f}",
            "max_prompt_tokens": str(params.calibration.max_prompt_tokens),
            "seed": str(params.sampling.seed),
        },
    )
    registered = mlflow_registry.register(request, tracking_uri=params.tracking_uri)
    return Registration(
        model_name=registered.model_name,
        version=registered.version,
        run_id=registered.run_id,
        experiment_id=registered.experiment_id,
        reused=registered.reused,
        run_url=run_url(params.tracking_uri, registered.experiment_id, registered.run_id),
    )


def recalibration_summary(
    params: RecalibrateParams,
    calibration_set: CalibrationSetRef,
    checkpoint: CalibratedCheckpoint,
    registration: Registration,
) -> str:
    """Markdown for the Prefect UI: what was decided, and where to review it."""
    tiers = ", ".join(f"{count} {tier}" for tier, count in checkpoint.tiers.items())
    return "\n".join(
        [
            f"# {params.model_name} v{registration.version} ({checkpoint.scheme.value})",
            "",
            f"* MLflow run: [{registration.run_id}]({registration.run_url})"
            + (" (reused: same inputs as before)" if registration.reused else ""),
            f"* Calibration set `{calibration_set.digest[:16]}`: {calibration_set.size} calibration "
            f"prompts, {calibration_set.sensitivity_size} scoring sensitivity, "
            f"{calibration_set.holdout_size} held out for the canary",
            f"* Groups: {checkpoint.num_groups} ({tiers}), rounding {checkpoint.rounding.value}, "
            f"+{checkpoint.extra_bytes_fraction:.1%} bytes over all-{checkpoint.scheme.value}",
            f"* Combined mean KL (measured): all {checkpoint.scheme.value} "
            f"{checkpoint.all_quantized_mean_kl:.4f}, the plan {checkpoint.plan_mean_kl:.4f}"
            + ("" if checkpoint.target_kl is None else f" (target {checkpoint.target_kl:g})")
            + f"; top-1 agreement {checkpoint.plan_top1:.3f}; "
            f"Δ perplexity {checkpoint.plan_delta_perplexity:+.3%}",
            f"* Weights: {checkpoint.bytes_before / 1e6:.1f} MB → {checkpoint.bytes_after / 1e6:.1f} MB "
            "("
            + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in checkpoint.bytes_by_tier.items())
            + ")",
            f"* Checkpoint: `{checkpoint.checkpoint_dir}`",
        ]
    )


# ------------------------------------------------------------------------------------------ drift


def check_drift(params: DriftCheckParams) -> DriftRecord:
    """Compare the last ``window_days`` of logs with the champion's calibration set (or the one given)."""

    digest = params.calibration_digest
    if digest is None:
        for alias in (Alias.CHAMPION, Alias.CHALLENGER):
            info = find_alias(params.model_name, alias, tracking_uri=params.tracking_uri)
            if info is not None and info.corpus_digest:
                digest = info.corpus_digest
                break
    if digest is None:
        stored = list_calibration_sets(params.db_url)
        if not stored:
            raise ValueError("no calibration set stored yet: run the recalibrate flow first")
        digest = max(stored, key=lambda s: s.created_at).digest
    verdict = prompt_logs.check_drift(
        DriftParameters(
            calibration_set=digest,
            window_days=params.window_days,
            js_threshold=params.js_threshold,
            psi_threshold=params.psi_threshold,
        ),
        params.db_url,
    )
    return DriftRecord(calibration_digest=digest, verdict=verdict)


def drift_summary(record: DriftRecord) -> str:
    """Markdown for the Prefect UI: the drift verdict, its metrics and reasons."""
    verdict = record.verdict
    lines = [
        f"# Drift check against calibration set `{record.calibration_digest[:16]}`",
        "",
        f"**{'DRIFT' if verdict.drifted else 'no drift'}**"
        + (" (inconclusive: too few prompts)" if verdict.inconclusive else ""),
        "",
    ]
    lines += [f"* {k}: {v:.4f}" for k, v in verdict.metrics.items()]
    lines += [f"* {reason}" for reason in verdict.reasons]
    return "\n".join(lines)
