"""MLflow registration and promotion of NVFP4 checkpoints.

* :func:`register` — one run per recalibration in the experiment ``fp4roll/<model>``: params,
  metrics (per-group KL with sanitized names), artifacts (checkpoint, ``calibration.json``, KL plot,
  redacted calibration-set summary), dataset lineage (``mlflow.data`` meta dataset +
  ``log_inputs`` with context ``calibration``), then a model version whose source is the run's
  checkpoint artifact URI, tagged, with alias ``challenger``. The idempotency key (hash of the
  inputs and of the checkpoint's bytes) is stored as a tag and searched before creating anything,
  so registering the same inputs twice returns the same version.
* :func:`promote`, :func:`rollback`, :func:`reject_challenger` — alias moves between ``champion``,
  ``challenger`` and ``previous-champion``; idempotent; versions are tagged with the outcome; each
  returns the :class:`AliasMove` records for the ledger (empty when nothing had to move).

Credentials inside URLs (``scheme://user:pass@host``, ``?password=…``) are redacted before they
reach params, tags or logs. The version is created only after every artifact is uploaded, so a
crash mid-upload never leaves a registered version pointing at a partial checkpoint.

Default tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///$FP4ROLL_HOME/mlflow.db`` with
artifacts under ``$FP4ROLL_HOME/mlartifacts``.

``mlflow`` is imported inside the functions that talk to it: ``import mlflow`` alone takes seconds
(6.9 s measured on the shared 2-core machine, ``python -c "import mlflow"``), which every command that
only imports this module for its records (the CLI, the ledger's callers) would otherwise pay.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from registry import tags as tag
from registry.aliases import Alias, AliasMove, VersionOutcome
from registry.db import fp4roll_home
from registry.faults import crash_point
from registry.integrity import (
    MANIFEST_ARTIFACT,
    Manifest,
    build_manifest,
    manifest_digest,
    manifest_document,
    verify_folder,
)
from registry.url_redaction import redact_urls

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT_PATH = "checkpoint"
GROUP_TABLE = "per_group_kl.json"  # the run's per-group table (MLflow "Evaluation"/artifact view)
CALIBRATION_CONTEXT = "calibration"
_MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value
_MAX_TAG_LENGTH = 8000
_MLFLOW_DIGEST_LENGTH = 36  # datasets.digest is VARCHAR(36) in MLflow's SQL store

_METRIC_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class RegistryError(RuntimeError):
    """A registration or alias move that cannot be carried out as asked."""


def redact(text: str) -> str:
    """``text`` with URL user-info and secret query values replaced by ``***``
    (:func:`registry.url_redaction.redact_urls`)."""
    return redact_urls(text)


def sanitize_metric_name(name: str) -> str:
    """An MLflow-legal metric name (alphanumerics, ``_ - . / space``); other characters → ``_``."""
    cleaned = _METRIC_NAME_BAD_CHARS.sub("_", name).strip()
    if not cleaned:
        raise ValueError(f"metric name {name!r} is empty after sanitizing")
    return cleaned[:250]


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the SQLite store under ``$FP4ROLL_HOME``."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    return f"sqlite:///{fp4roll_home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return fp4roll_home() / "mlartifacts"


def code_version() -> str:
    """``fp4roll <version>`` plus the git commit of the working tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        label = f"fp4roll {version('fp4roll')}"
    except PackageNotFoundError:
        label = "fp4roll (not installed)"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{label} git {sha}" if sha else label


class RegistrationMetrics(BaseModel):
    """Quality and size figures of one recalibration (from the KL sweep / evaluation). A candidate
    built elsewhere (a requantized GGUF of the live demo) registers without them: None is not
    logged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    combined_kl: float | None = None
    p99_kl: float | None = None
    top1_agreement: float | None = Field(None, ge=0, le=1)
    delta_perplexity: float | None = None
    bytes_before: int | None = Field(None, ge=0)
    bytes_after: int | None = Field(None, ge=0)
    bytes_by_tier: dict[str, int] = Field(default_factory=dict)  # checkpoint bytes per tier


class RegistrationRequest(BaseModel):
    """Everything :func:`register` needs; paths must exist. ``corpus_source`` may be a DB URL or
    a path: it is redacted before being stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    source_model: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    block_size: int = Field(16, ge=1)
    corpus_digest: str = Field(pattern=r"^[0-9a-fA-F]{16,128}$")
    corpus_source: str | None = None
    calibration_size: int = Field(ge=1)
    holdout_size: int = Field(0, ge=0)
    sensitivity_prompts: int | None = Field(None, ge=1)
    kl_threshold: float | None = Field(None, ge=0)  # the runbook floor; None: no floor
    target_kl: float | None = Field(None, gt=0)  # None: least KL within the bytes budget
    max_extra_bytes: float | None = Field(None, ge=0)  # fraction over the all-NVFP4 checkpoint
    rounding: str | None = None
    fallback_layers: tuple[str, ...] = ()
    metrics: RegistrationMetrics
    checkpoint_dir: Path
    calibration_json: Path | None = None
    kl_plot: Path | None = None
    calibration_summary: Path | None = None
    #: one row per fused group (name, tier, KL, ...), logged as one MLflow table, not as metrics
    group_table: tuple[dict[str, Any], ...] = ()
    code_version: str = Field(default_factory=code_version)
    extra_params: dict[str, str] = Field(default_factory=dict)

    @field_validator("checkpoint_dir")
    @classmethod
    def _checkpoint_is_dir(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"checkpoint_dir is not a directory: {path}")
        if not any(p.is_file() for p in path.rglob("*")):
            raise ValueError(f"checkpoint_dir is empty: {path}")
        return path

    @field_validator("calibration_json", "kl_plot", "calibration_summary")
    @classmethod
    def _file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"artifact file not found: {path}")
        return path


class RegisteredVersion(BaseModel):
    """Result of :func:`register`."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    source: str
    idempotency_key: str
    reused: bool


def client_for(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """An MLflow client on ``tracking_uri`` (default: :func:`default_tracking_uri`) and that URI."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def checkpoint_digest(checkpoint_dir: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``checkpoint_dir``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(checkpoint_dir).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def idempotency_key(request: RegistrationRequest) -> str:
    """Hash of the registration inputs: settings, corpus digest, fallback list, code version and
    the checkpoint's bytes (not the metrics or the artifact paths, which vary between runs)."""
    inputs = {
        "model_name": request.model_name,
        "source_model": redact(request.source_model),
        "scheme": request.scheme,
        "block_size": request.block_size,
        "corpus_digest": request.corpus_digest.lower(),
        "calibration_size": request.calibration_size,
        "holdout_size": request.holdout_size,
        "sensitivity_prompts": request.sensitivity_prompts,
        "kl_threshold": request.kl_threshold,
        "target_kl": request.target_kl,
        "max_extra_bytes": request.max_extra_bytes,
        "rounding": request.rounding,
        "fallback_layers": sorted(request.fallback_layers),
        "code_version": request.code_version,
        "checkpoint": checkpoint_digest(request.checkpoint_dir),
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _params(request: RegistrationRequest) -> dict[str, str]:
    params: dict[str, Any] = {
        "source_model": request.source_model,
        "scheme": request.scheme,
        "block_size": request.block_size,
        "corpus_digest": request.corpus_digest,
        "corpus_source": request.corpus_source,
        "calibration_size": request.calibration_size,
        "holdout_size": request.holdout_size,
        "sensitivity_prompts": request.sensitivity_prompts,
        "kl_threshold": request.kl_threshold,
        "target_kl": request.target_kl,
        "max_extra_bytes": request.max_extra_bytes,
        "rounding": request.rounding,
        "fallback_count": len(request.fallback_layers),
        "code_version": request.code_version,
        **request.extra_params,
    }
    return {
        key: _clip(redact(str(value)), _MAX_PARAM_LENGTH)
        for key, value in params.items()
        if value is not None
    }


def _metrics(request: RegistrationRequest) -> dict[str, float]:
    figures = request.metrics
    metrics: dict[str, float] = {}
    for name in (
        "combined_kl",
        "p99_kl",
        "top1_agreement",
        "delta_perplexity",
        "bytes_before",
        "bytes_after",
    ):
        value = getattr(figures, name)
        if value is not None:
            metrics[name] = float(value)
    if figures.bytes_before and figures.bytes_after:
        metrics["compression_ratio"] = figures.bytes_before / figures.bytes_after
    for tier, size in figures.bytes_by_tier.items():
        metrics[sanitize_metric_name(f"bytes/{tier}")] = float(size)
    return metrics


def _version_tags(request: RegistrationRequest, key: str, manifest: Manifest) -> dict[str, str]:
    tags = {
        tag.IDEMPOTENCY_KEY: key,
        tag.CHECKPOINT_SHA256: manifest_digest(manifest),
        tag.CORPUS_DIGEST: request.corpus_digest,
        tag.FALLBACK_LAYERS: json.dumps(sorted(request.fallback_layers)),
        tag.SCHEME: request.scheme,
        tag.BLOCK_SIZE: str(request.block_size),
        tag.CODE_VERSION: request.code_version,
        tag.SOURCE_MODEL: request.source_model,
        tag.OUTCOME: VersionOutcome.CHALLENGER.value,
    }
    return {k: _clip(redact(v), _MAX_TAG_LENGTH) for k, v in tags.items()}


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                name, description="NVFP4 checkpoints registered by fp4roll"
            )
        except MlflowException as create_exc:  # created concurrently
            if create_exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if tag.EXPERIMENT_KIND not in (experiment.tags or {}):  # made by an older fp4roll
            client.set_experiment_tag(
                experiment.experiment_id, tag.EXPERIMENT_KIND, tag.EXPERIMENT_KIND_MODEL_DEVELOPMENT
            )
        return experiment.experiment_id
    artifact_location = None
    if not _is_remote(tracking_uri):
        root = default_artifact_root()
        root.mkdir(parents=True, exist_ok=True)
        artifact_location = (root / name.replace("/", "_")).resolve().as_uri()
    try:
        return client.create_experiment(
            name,
            artifact_location=artifact_location,
            tags={tag.EXPERIMENT_KIND: tag.EXPERIMENT_KIND_MODEL_DEVELOPMENT},
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_name(model_name: str) -> str:
    return f"fp4roll/{model_name}"


def find_version_by_key(client: MlflowClient, model_name: str, key: str) -> ModelVersion | None:
    """The model version tagged with idempotency ``key``, or None."""
    found = client.search_model_versions(
        f"name = '{model_name}' and tags.`{tag.IDEMPOTENCY_KEY}` = '{key}'"
    )
    found = sorted(found, key=lambda mv: int(mv.version))
    return found[0] if found else None


def _finished_run_with_key(client: MlflowClient, experiment_id: str, key: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tag.IDEMPOTENCY_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def _log_lineage(client: MlflowClient, run_id: str, request: RegistrationRequest) -> None:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    digest = request.corpus_digest.lower()
    source = CodeDatasetSource(
        tags={
            "kind": "fp4roll calibration corpus",
            "corpus_digest": digest,
            "corpus_source": redact(request.corpus_source or "unspecified"),
            "calibration_size": str(request.calibration_size),
            "holdout_size": str(request.holdout_size),
        }
    )
    dataset = MetaDataset(
        source=source,
        name=f"calibration-{digest[:12]}",
        digest=digest[:_MLFLOW_DIGEST_LENGTH],
    )
    dataset_input = DatasetInput(
        dataset=dataset._to_mlflow_entity(),
        tags=[
            InputTag(key="mlflow.data.context", value=CALIBRATION_CONTEXT),
            InputTag(key=tag.CORPUS_DIGEST, value=digest),
        ],
    )
    client.log_inputs(run_id, datasets=[dataset_input])


def log_checkpoint(
    client: MlflowClient, run_id: str, checkpoint_dir: Path, manifest: Manifest
) -> None:
    """Upload ``checkpoint_dir`` as the run's checkpoint and its manifest beside it; on a local
    artifact store, verify the uploaded copy against the manifest (a partial copy is refused)."""
    client.log_text(run_id, json.dumps(manifest_document(manifest), indent=2), MANIFEST_ARTIFACT)
    client.log_artifacts(run_id, str(checkpoint_dir), CHECKPOINT_ARTIFACT_PATH)
    uploaded = _local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if uploaded is not None:
        verify_folder(
            uploaded / CHECKPOINT_ARTIFACT_PATH,
            manifest_digest(manifest),
            label=f"upload of {checkpoint_dir}",
            expected_manifest=manifest,
        )


def _local_artifact_dir(artifact_uri: str) -> Path | None:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(unquote(parsed.path) if parsed.scheme else artifact_uri)
    return path if path.is_dir() else None


def _log_artifacts(
    client: MlflowClient, run_id: str, request: RegistrationRequest, manifest: Manifest
) -> None:
    log_checkpoint(client, run_id, request.checkpoint_dir, manifest)
    if request.calibration_json is not None:
        # always stored as ``calibration.json`` beside the checkpoint, whatever the local name
        with tempfile.TemporaryDirectory(prefix="fp4roll-calibration-") as staging:
            staged = Path(staging) / "calibration.json"
            shutil.copyfile(request.calibration_json, staged)
            client.log_artifact(run_id, str(staged))
    if request.kl_plot is not None:
        client.log_artifact(run_id, str(request.kl_plot), "plots")
    if request.calibration_summary is not None:
        client.log_artifact(run_id, str(request.calibration_summary), "calibration_set")
    client.log_text(
        run_id,
        json.dumps(sorted(request.fallback_layers), indent=2),
        "fallback_layers.json",
    )
    if request.group_table:
        client.log_table(run_id, data=table_columns(request.group_table), artifact_file=GROUP_TABLE)


def table_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows (dicts) → the column form ``log_table`` takes; a key missing from a row gives None."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    return {name: [row.get(name) for row in rows] for name in names}


def _create_run(
    client: MlflowClient,
    experiment_id: str,
    request: RegistrationRequest,
    key: str,
    manifest: Manifest,
) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(
        experiment_id,
        run_name=f"recalibrate-{request.corpus_digest[:8]}-{key[:8]}",
        tags={
            tag.IDEMPOTENCY_KEY: key,
            tag.MODEL_NAME: request.model_name,
            tag.CORPUS_DIGEST: request.corpus_digest,
        },
    )
    run_id = run.info.run_id
    try:
        now_ms = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
        params = [Param(k, v) for k, v in _params(request).items()]
        metrics = [Metric(k, v, now_ms, 0) for k, v in _metrics(request).items()]
        for start in range(0, max(len(params), len(metrics)), 100):  # MLflow batch limits
            client.log_batch(
                run_id, metrics=metrics[start : start + 100], params=params[start : start + 100]
            )
        client.log_batch(
            run_id,
            tags=[
                RunTag(k, v)
                for k, v in _version_tags(request, key, manifest).items()
                if k != tag.OUTCOME
            ],
        )
        _log_lineage(client, run_id, request)
        _log_artifacts(client, run_id, request, manifest)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def register(
    request: RegistrationRequest, *, tracking_uri: str | None = None, set_challenger: bool = True
) -> RegisteredVersion:
    """Log the recalibration run and create (or reuse) the model version; alias it ``challenger``.

    Idempotent: a version carrying the same idempotency key is returned as is (``reused=True``,
    aliases untouched); a finished run with the key but no version (crash before the version was
    created) is reused instead of logging a second run.
    """
    client, uri = client_for(tracking_uri)
    manifest = build_manifest(request.checkpoint_dir)
    key = idempotency_key(request)
    name = request.model_name
    ensure_registered_model(client, name)
    existing = find_version_by_key(client, name, key)
    experiment_id = ensure_experiment(client, experiment_name(name), uri)
    if existing is not None:
        logger.info("registration of %s reuses version %s (key %s)", name, existing.version, key)
        return RegisteredVersion(
            model_name=name,
            version=str(existing.version),
            run_id=existing.run_id,
            experiment_id=experiment_id,
            source=existing.source,
            idempotency_key=key,
            reused=True,
        )

    run = _finished_run_with_key(client, experiment_id, key)
    if run is not None:
        run_id = run.info.run_id
        logger.info("reusing finished run %s for %s (key %s)", run_id, name, key)
    else:
        run_id = _create_run(client, experiment_id, request, key, manifest)
    artifact_uri = client.get_run(run_id).info.artifact_uri.rstrip("/")
    source = f"{artifact_uri}/{CHECKPOINT_ARTIFACT_PATH}"
    version = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags=_version_tags(request, key, manifest),
        description=redact(
            f"{request.scheme} checkpoint of {request.source_model}, corpus "
            f"{request.corpus_digest[:12]}, {len(request.fallback_layers)} fallback layers"
        ),
    )
    if set_challenger:
        client.set_registered_model_alias(name, Alias.CHALLENGER.value, version.version)
    logger.info(
        "registered %s version %s from run %s (scheme %s, corpus %s)",
        name,
        version.version,
        run_id,
        request.scheme,
        request.corpus_digest[:12],
    )
    return RegisteredVersion(
        model_name=name,
        version=str(version.version),
        run_id=run_id,
        experiment_id=experiment_id,
        source=source,
        idempotency_key=key,
        reused=False,
    )


# ---------------------------------------------------------------------------------------------
# Promotion


def aliases(model_name: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    """Current alias → version map of a registered model."""
    client, _ = client_for(tracking_uri)
    return _aliases(client, model_name)


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {model_name!r} does not exist") from exc
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def _require_version(client: MlflowClient, model_name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{model_name} has no version {version}") from exc
        raise


def move_alias(
    client: MlflowClient,
    model_name: str,
    alias: Alias,
    current: Mapping[str, str],
    to_version: str | None,
    reason: str,
    moves: list[AliasMove],
) -> None:
    from_version = current.get(alias.value)
    if from_version == to_version:
        return
    crash_point(f"move:before:{alias.value}")
    if to_version is None:
        client.delete_registered_model_alias(model_name, alias.value)
    else:
        client.set_registered_model_alias(model_name, alias.value, to_version)
    crash_point(f"move:after:{alias.value}")
    moves.append(
        AliasMove(
            model_name=model_name,
            alias=alias,
            from_version=from_version,
            to_version=to_version,
            reason=reason,
        )
    )
    logger.info(
        "%s: alias %s %s -> %s (%s)", model_name, alias.value, from_version, to_version, reason
    )


def _tag(client: MlflowClient, model_name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(
            model_name, version, key, _clip(redact(value), _MAX_TAG_LENGTH)
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def promote(
    model_name: str,
    version: str,
    *,
    reason: str = "canary passed",
    tracking_uri: str | None = None,
    before: Mapping[str, str] | None = None,
) -> tuple[AliasMove, ...]:
    """Make ``version`` the champion; the old champion becomes ``previous-champion``; the
    ``challenger`` alias is removed if it pointed at ``version``.

    ``before``: the aliases when the promotion was decided (its ledger intent). Given, a retry after
    a crash anywhere midway completes the SAME promotion: the old champion and the
    ``previous_champion_before`` tag come from ``before``, never from a half-moved state, so a retry
    cannot overwrite them; every step is idempotent (aliases already in place are not moved, tags
    already written are kept). Without it the current aliases are used, and promoting the current
    champion moves nothing. Returns the moves made by this call."""
    client, _ = client_for(tracking_uri)
    version = str(version)
    _require_version(client, model_name, version)
    current = _aliases(client, model_name)
    decided = dict(before) if before is not None else current
    moves: list[AliasMove] = []
    old_champion = decided.get(Alias.CHAMPION.value)
    if old_champion != version and (
        before is not None or current.get(Alias.CHAMPION.value) != version
    ):
        tags = client.get_model_version(model_name, version).tags
        promoted = tags.get(tag.OUTCOME) == VersionOutcome.PROMOTED.value
        if not promoted:
            # remember what previous-champion was, so a rollback restores the state exactly
            _tag(
                client,
                model_name,
                version,
                {tag.PREVIOUS_CHAMPION_BEFORE: decided.get(Alias.PREVIOUS_CHAMPION.value) or ""},
            )
        if old_champion is not None:
            move_alias(
                client, model_name, Alias.PREVIOUS_CHAMPION, current, old_champion, reason, moves
            )
        move_alias(client, model_name, Alias.CHAMPION, current, version, reason, moves)
        if not promoted:
            _tag(
                client,
                model_name,
                version,
                {
                    tag.OUTCOME: VersionOutcome.PROMOTED.value,
                    tag.PROMOTED_AT: _now(),
                    tag.PROMOTE_REASON: reason,
                },
            )
            crash_point("tags:after-outcome")
        if old_champion is not None:
            _tag(
                client,
                model_name,
                old_champion,
                {tag.OUTCOME: VersionOutcome.SUPERSEDED.value, tag.SUPERSEDED_BY: version},
            )
    if current.get(Alias.CHALLENGER.value) == version:
        move_alias(client, model_name, Alias.CHALLENGER, current, None, reason, moves)
    return tuple(moves)


def rollback(
    model_name: str,
    to_version: str | None = None,
    *,
    reason: str,
    tracking_uri: str | None = None,
    before: Mapping[str, str] | None = None,
) -> tuple[AliasMove, ...]:
    """Put ``to_version`` (default: ``previous-champion``) back as champion.

    The rolled-back champion is tagged ``rolled_back`` with ``reason``; ``previous-champion`` is
    restored to what it was before that champion's promotion, so promote-then-rollback leaves
    ``champion`` and ``previous-champion`` exactly as they were. ``before`` (the aliases when the
    rollback was decided, its ledger intent): a retry completes the same rollback. Without it:
    idempotent too — when the champion was put in place by a rollback (tag
    ``fp4roll.outcome=restored``) a default call only completes that rollback (after a crash) and
    otherwise moves nothing; to go further back, name ``to_version``. Returns the moves made.
    """
    if not reason or not reason.strip():
        raise ValueError("rollback needs a reason")
    client, _ = client_for(tracking_uri)
    current = _aliases(client, model_name)
    moves: list[AliasMove] = []
    if before is not None:
        champion = before.get(Alias.CHAMPION.value)
        previous_now = before.get(Alias.PREVIOUS_CHAMPION.value)
    else:
        champion = current.get(Alias.CHAMPION.value)
        previous_now = current.get(Alias.PREVIOUS_CHAMPION.value)
        if champion is not None and (to_version is None or str(to_version) == champion):
            champion_tags = client.get_model_version(model_name, champion).tags
            if champion_tags.get(tag.OUTCOME) == VersionOutcome.RESTORED.value:
                _finish_rollback(client, model_name, champion, champion_tags, current, moves)
                return tuple(moves)
            if to_version is not None:
                return ()  # already the champion, nothing to undo
    target = str(to_version) if to_version is not None else previous_now
    if target is None:
        raise RegistryError(f"{model_name}: no previous-champion to roll back to")
    if target == champion:
        return ()
    _require_version(client, model_name, target)
    previous_after = previous_now
    if champion is not None and target == previous_now:
        champion_tags = client.get_model_version(model_name, champion).tags
        previous_after = champion_tags.get(tag.PREVIOUS_CHAMPION_BEFORE) or None
    # the target's tags record the whole rollback first, so a crash midway can be completed
    target_tags = {
        tag.OUTCOME: VersionOutcome.RESTORED.value,
        tag.RESTORED_FROM: champion or "",
        tag.RESTORE_PREVIOUS_CHAMPION: previous_after or "",
        tag.RESTORED_AT: _now(),
        tag.ROLLBACK_REASON: reason,
    }
    existing = client.get_model_version(model_name, target).tags
    if not (
        existing.get(tag.OUTCOME) == VersionOutcome.RESTORED.value
        and existing.get(tag.RESTORED_FROM) == (champion or "")
    ):
        _tag(client, model_name, target, target_tags)
    move_alias(client, model_name, Alias.CHAMPION, current, target, reason, moves)
    _finish_rollback(client, model_name, target, target_tags, current, moves)
    return tuple(moves)


def _finish_rollback(
    client: MlflowClient,
    model_name: str,
    champion: str,
    champion_tags: Mapping[str, str],
    current: Mapping[str, str],
    moves: list[AliasMove],
) -> None:
    """Second half of a rollback to ``champion``: restore previous-champion, tag the loser."""
    reason = champion_tags.get(tag.ROLLBACK_REASON, "rollback")
    previous = champion_tags.get(tag.RESTORE_PREVIOUS_CHAMPION) or None
    move_alias(client, model_name, Alias.PREVIOUS_CHAMPION, current, previous, reason, moves)
    rolled_back = champion_tags.get(tag.RESTORED_FROM) or None
    if rolled_back is not None:
        tags = client.get_model_version(model_name, rolled_back).tags
        if tags.get(tag.OUTCOME) != VersionOutcome.ROLLED_BACK.value:
            _tag(
                client,
                model_name,
                rolled_back,
                {
                    tag.OUTCOME: VersionOutcome.ROLLED_BACK.value,
                    tag.ROLLED_BACK_AT: _now(),
                    tag.ROLLBACK_REASON: reason,
                },
            )


def reject_challenger(
    model_name: str,
    version: str,
    *,
    reason: str,
    tracking_uri: str | None = None,
) -> tuple[AliasMove, ...]:
    """A canary failed before promotion: remove ``challenger`` from ``version`` (the champion keeps
    serving) and tag it ``rejected``. Idempotent."""
    client, _ = client_for(tracking_uri)
    version = str(version)
    _require_version(client, model_name, version)
    current = _aliases(client, model_name)
    if current.get(Alias.CHAMPION.value) == version:
        raise RegistryError(f"{model_name} version {version} is the champion; use rollback")
    moves: list[AliasMove] = []
    if current.get(Alias.CHALLENGER.value) == version:
        move_alias(client, model_name, Alias.CHALLENGER, current, None, reason, moves)
    _tag(
        client,
        model_name,
        version,
        {tag.OUTCOME: VersionOutcome.REJECTED.value, tag.REJECT_REASON: reason},
    )
    crash_point("tags:after-outcome")
    return tuple(moves)


def version_tags(
    model_name: str, version: str, *, tracking_uri: str | None = None
) -> dict[str, str]:
    client, _ = client_for(tracking_uri)
    return dict(client.get_model_version(model_name, str(version)).tags)
