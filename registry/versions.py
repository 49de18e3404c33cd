"""Model versions as the flows need them: the serving baseline, alias look-ups, local copies.

* :func:`register_baseline` — the unquantized model that serves today, registered once as a version
  of the same registered model and made ``champion`` when there is none, so the first canary has a
  baseline and a rollback target like every later one.
* :func:`resolve_version` — ``"3"``, ``"champion"``, ``"challenger"`` … → the version, its source and tags.
* :func:`local_checkpoint` — a local folder for a version, verified against the sha256 manifest
  registered with it (:mod:`registry.integrity`) every time it is asked for: the artifact folder
  itself on a local store, otherwise a download cached under
  ``$FP4ROLL_HOME/cache/checkpoints/<manifest digest>`` (keyed by content, not by version number;
  atomic rename; a cached copy that no longer verifies is evicted and downloaded again).
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
from registry.integrity import (
    MANIFEST_ARTIFACT,
    IntegrityError,
    Manifest,
    build_manifest,
    manifest_digest,
    parse_manifest_document,
    verify_folder,
)
from registry.mlflow_registry import (
    CHECKPOINT_ARTIFACT_PATH,
    RegistryError,
    checkpoint_digest,
    client_for,
    code_version,
    default_tracking_uri,
    ensure_experiment,
    ensure_registered_model,
    experiment_name,
    find_version_by_key,
    fp4roll_home,
    log_checkpoint,
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

    @property
    def manifest_digest(self) -> str | None:
        """sha256 of the checkpoint manifest registered with the version (None: registered
        before manifests existed)."""
        return self.tags.get(tag.CHECKPOINT_SHA256) or None

    @property
    def label(self) -> str:
        return f"{self.model_name} v{self.version}"


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
    manifest = build_manifest(model_dir)
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
            log_checkpoint(client, run.info.run_id, model_dir, manifest)
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
                tag.CHECKPOINT_SHA256: manifest_digest(manifest),
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


def registered_manifest(info: VersionInfo, *, tracking_uri: str | None = None) -> Manifest | None:
    """The manifest document logged with ``info``'s run, if it can be read and matches the tag."""
    if not info.run_id or not info.manifest_digest:
        return None
    import mlflow.artifacts

    try:
        with tempfile.TemporaryDirectory(prefix="fp4roll-manifest-") as staging:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=info.source.rsplit("/", 1)[0] + "/" + MANIFEST_ARTIFACT,
                dst_path=staging,
                tracking_uri=tracking_uri or default_tracking_uri(),
            )
            digest, manifest = parse_manifest_document(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001 - only used to name the files in an error message
        logger.warning("%s: manifest artifact unreadable: %s", info.label, type(exc).__name__)
        return None
    return manifest if digest == info.manifest_digest else None


def verify_checkpoint(
    info: VersionInfo, folder: str | os.PathLike, *, tracking_uri: str | None = None
) -> Path:
    """Rehash ``folder`` against ``info``'s registered manifest; :class:`IntegrityError` (naming
    the files) when it differs or the version has no manifest. Returns the folder."""
    _require_manifest(info)
    try:
        verify_folder(folder, str(info.manifest_digest), label=info.label)
    except IntegrityError:
        verify_folder(
            folder,
            str(info.manifest_digest),
            label=info.label,
            expected_manifest=registered_manifest(info, tracking_uri=tracking_uri),
        )
    return Path(folder)


def _require_manifest(info: VersionInfo) -> None:
    if not info.manifest_digest:
        raise IntegrityError(
            f"{info.label} has no checkpoint manifest (tag {tag.CHECKPOINT_SHA256}): it was registered "
            "before checkpoint integrity was recorded, so its bytes cannot be verified. Register "
            "the checkpoint again as a new version."
        )


def _local_source(info: VersionInfo) -> Path | None:
    parsed = urlparse(info.source)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else info.source)
        if path.is_dir():
            return path
    return None


def local_checkpoint(
    info: VersionInfo,
    *,
    cache_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """A local folder holding ``info``'s checkpoint, verified against its registered manifest
    (see module doc). Never partially written; raises :class:`IntegrityError` when the bytes differ."""
    _require_manifest(info)
    local = _local_source(info)
    if local is not None:
        return verify_checkpoint(info, local, tracking_uri=tracking_uri)
    cache_root = Path(cache_dir) if cache_dir else fp4roll_home() / "cache" / "checkpoints"
    target = cache_root / str(info.manifest_digest)
    if target.is_dir():
        try:
            return verify_checkpoint(info, target, tracking_uri=tracking_uri)
        except IntegrityError as exc:
            logger.warning("evicting a cached checkpoint that no longer verifies: %s", exc)
            shutil.rmtree(target, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    import mlflow.artifacts

    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_root))
    try:
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=info.source,
                dst_path=str(staging),
                tracking_uri=tracking_uri or default_tracking_uri(),
            )
        )
        verify_checkpoint(info, downloaded, tracking_uri=tracking_uri)
        try:
            os.replace(downloaded, target)
        except OSError:  # another process put the same content there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("downloaded %s to %s", info.label, target)
    return target
