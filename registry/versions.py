"""Model versions as the flows need them: the serving baseline, alias look-ups, local copies.

* :func:`register_baseline` — the unquantized model that serves today, registered once as a version
  of the same registered model and made ``champion`` when there is none, so the first canary has a
  baseline and a rollback target like every later one.
* :func:`resolve_version` — ``"3"``, ``"champion"``, ``"challenger"`` … → the version, its source and tags.
* :func:`local_checkpoint` — a local folder for a version: the artifact folder itself on a local
  store, otherwise a download cached under ``$FP4ROLL_HOME/cache/versions`` (atomic rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict

from registry import tags as tag
from registry.aliases import Alias, AliasMove, VersionOutcome
from registry.mlflow_registry import (
    CHECKPOINT_ARTIFACT_PATH,
    RegistryError,
    checkpoint_digest,
    client_for,
    code_version,
    ensure_experiment,
    ensure_registered_model,
    experiment_name,
    find_version_by_key,
    fp4roll_home,
    move_alias,
    redact,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

BASELINE_SCHEME = "bf16"


class VersionInfo(BaseModel):
    """One model version as the flows see it."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def scheme(self) -> str:
        return self.tags.get(tag.SCHEME, "unknown")

    @property
    def corpus_digest(self) -> str | None:
        return self.tags.get(tag.CORPUS_DIGEST) or None


def _info(model_name: str, mv: ModelVersion) -> VersionInfo:
    return VersionInfo(
        model_name=model_name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id or None,
        tags=dict(mv.tags or {}),
    )


def resolve_version(
    model_name: str, version_or_alias: str, *, tracking_uri: str | None = None
) -> VersionInfo:
    """A version number or an alias name → :class:`VersionInfo`. Raises :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(tracking_uri)
    ref = str(version_or_alias)
    try:
        if ref.isdigit():
            mv = client.get_model_version(model_name, ref)
        else:
            mv = client.get_model_version_by_alias(model_name, ref)
    except MlflowException as exc:
        raise RegistryError(
            f"{model_name}: no version or alias {ref!r} ({exc.error_code})"
        ) from exc
    return _info(model_name, mv)


class VersionSummary(BaseModel):
    """One version as ``fp4roll status`` lists it: scheme, headline quality figures, lineage, outcome."""

    model_config = ConfigDict(frozen=True)

    version: str
    scheme: str
    combined_kl: float | None
    top1_agreement: float | None
    fallback_count: int | None  # layers kept high precision; None for the unquantized baseline
    corpus_digest: str | None
    outcome: str | None  # registry.aliases.VersionOutcome value
    source: str


def version_summaries(model_name: str, *, tracking_uri: str | None = None) -> list[VersionSummary]:
    """Every version of ``model_name`` in version order (empty when the model is not registered)."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(tracking_uri)
    try:
        found = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return []
    summaries = []
    for mv in sorted(found, key=lambda v: int(v.version)):
        tags = dict(mv.tags or {})
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = client.get_run(mv.run_id).data.metrics
            except MlflowException:
                metrics = {}
        fallback = tags.get(tag.FALLBACK_LAYERS)
        summaries.append(
            VersionSummary(
                version=str(mv.version),
                scheme=tags.get(tag.SCHEME, ""),
                combined_kl=metrics.get("combined_kl"),
                top1_agreement=metrics.get("top1_agreement"),
                fallback_count=len(json.loads(fallback)) if fallback else None,
                corpus_digest=tags.get(tag.CORPUS_DIGEST),
                outcome=tags.get(tag.OUTCOME),
                source=mv.source,
            )
        )
    return summaries


def find_alias(
    model_name: str, alias: Alias, *, tracking_uri: str | None = None
) -> VersionInfo | None:
    """The version under ``alias``, or None when the alias (or the model) does not exist."""
    try:
        return resolve_version(model_name, alias.value, tracking_uri=tracking_uri)
    except RegistryError:
        return None


def register_baseline(
    model_name: str, model_dir: str | os.PathLike, *, tracking_uri: str | None = None
) -> tuple[VersionInfo, tuple[AliasMove, ...]]:
    """Register the unquantized ``model_dir`` as a version (once) and make it ``champion`` if the
    model has no champion yet. Returns the version and the alias moves made (for the ledger)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RegistryError(f"baseline model folder not found: {model_dir}")
    client, uri = client_for(tracking_uri)
    ensure_registered_model(client, model_name)
    key = "baseline-" + checkpoint_digest(model_dir)
    existing = find_version_by_key(client, model_name, key)
    if existing is None:
        experiment_id = ensure_experiment(client, experiment_name(model_name), uri)
        run = client.create_run(
            experiment_id,
            run_name=f"baseline-{model_dir.name}",
            tags={
                tag.IDEMPOTENCY_KEY: key,
                tag.MODEL_NAME: model_name,
                tag.KIND: "baseline",
            },
        )
        try:
            client.log_param(run.info.run_id, "source_model", redact(str(model_dir)))
            client.log_param(run.info.run_id, "scheme", BASELINE_SCHEME)
            client.log_artifacts(run.info.run_id, str(model_dir), CHECKPOINT_ARTIFACT_PATH)
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")
        artifact_uri = client.get_run(run.info.run_id).info.artifact_uri.rstrip("/")
        existing = client.create_model_version(
            model_name,
            source=f"{artifact_uri}/{CHECKPOINT_ARTIFACT_PATH}",
            run_id=run.info.run_id,
            tags={
                tag.IDEMPOTENCY_KEY: key,
                tag.SCHEME: BASELINE_SCHEME,
                tag.SOURCE_MODEL: redact(str(model_dir)),
                tag.CODE_VERSION: code_version(),
                tag.OUTCOME: VersionOutcome.BASELINE.value,
            },
            description=f"unquantized baseline ({model_dir.name})",
        )
        logger.info("registered baseline %s version %s", model_name, existing.version)
    moves: list[AliasMove] = []
    registered = client.get_registered_model(model_name)
    current = {alias: str(v) for alias, v in (registered.aliases or {}).items()}
    if Alias.CHAMPION.value not in current:
        move_alias(
            client,
            model_name,
            Alias.CHAMPION,
            current,
            str(existing.version),
            "initial champion: the unquantized baseline",
            moves,
        )
    return _info(model_name, client.get_model_version(model_name, str(existing.version))), tuple(
        moves
    )


def local_checkpoint(info: VersionInfo, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding ``info``'s checkpoint (see module doc). Never partially written."""
    parsed = urlparse(info.source)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else info.source)
        if path.is_dir():
            return path
    cache_root = Path(cache_dir) if cache_dir else fp4roll_home() / "cache" / "versions"
    target = cache_root / info.model_name / f"v{info.version}"
    if target.is_dir():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    import mlflow.artifacts

    staging = Path(
        tempfile.mkdtemp(
            prefix=f".v{info.version}-", dir=target.parent if target.parent.exists() else cache_root
        )
    )
    try:
        downloaded = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(staging))
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("downloaded %s v%s to %s", info.model_name, info.version, target)
    return target
