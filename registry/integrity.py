"""Checkpoint integrity: a sha256 manifest of every file, registered with the version, verified on use.

* :func:`build_manifest` — ``{relative path: {"sha256", "size"}}`` over every file under a folder.
* :func:`manifest_digest` — sha256 of the manifest's canonical JSON: one hex string that names the
  checkpoint's content. It is stored as the version tag :data:`MANIFEST_TAG`; the whole manifest is
  logged beside the checkpoint as the run artifact :data:`MANIFEST_ARTIFACT` (to name what changed).
* :func:`verify_folder` — rehash a folder (never trusting sizes or mtimes) and raise
  :class:`IntegrityError` naming every changed, missing or extra file when it differs.

Pure hashlib/json: no MLflow, no torch. :mod:`registry.versions` applies it to registered versions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry import tags

MANIFEST_TAG = tags.CHECKPOINT_SHA256
MANIFEST_ARTIFACT = "checkpoint_manifest.json"
MANIFEST_FORMAT = "fp4roll-checkpoint-manifest/1"
_CHUNK = 1 << 20

Manifest = dict[str, dict[str, Any]]  # relative posix path -> {"sha256": hex, "size": bytes}


class IntegrityError(RuntimeError):
    """A checkpoint's bytes differ from the manifest registered with its version (or it has none)."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def build_manifest(folder: str | os.PathLike) -> Manifest:
    """Every file under ``folder`` (recursively; symlinks followed) → its sha256 and size.
    Precondition: ``folder`` is a directory holding at least one file."""
    root = Path(folder)
    if not root.is_dir():
        raise IntegrityError(f"checkpoint folder not found: {root}")
    manifest = {
        path.relative_to(root).as_posix(): {
            "sha256": file_sha256(path),
            "size": path.stat().st_size,
        }
        for path in _files(root)
    }
    if not manifest:
        raise IntegrityError(f"checkpoint folder is empty: {root}")
    return manifest


def manifest_digest(manifest: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(
        {"format": MANIFEST_FORMAT, "files": manifest}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_document(manifest: Manifest) -> dict[str, Any]:
    """The JSON document logged as :data:`MANIFEST_ARTIFACT`."""
    return {"format": MANIFEST_FORMAT, "digest": manifest_digest(manifest), "files": manifest}


def parse_manifest_document(text: str) -> tuple[str, Manifest]:
    """(digest, manifest) of a :data:`MANIFEST_ARTIFACT`; the digest is recomputed, not trusted."""
    document = json.loads(text)
    if document.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"unknown manifest format {document.get('format')!r}")
    files = document["files"]
    return manifest_digest(files), files


def describe_difference(expected: Manifest, actual: Manifest, limit: int = 10) -> str:
    """``changed: a, b; missing: c; extra: d`` (at most ``limit`` names per kind)."""

    def names(items: list[str]) -> str:
        shown = ", ".join(items[:limit])
        return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

    changed = sorted(
        k for k in expected.keys() & actual.keys() if expected[k]["sha256"] != actual[k]["sha256"]
    )
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    parts = [
        f"{kind}: {names(items)}"
        for kind, items in (("changed", changed), ("missing", missing), ("extra", extra))
        if items
    ]
    return "; ".join(parts) or "no file differs (manifest document and tag disagree)"


def verify_folder(
    folder: str | os.PathLike,
    expected_digest: str,
    *,
    label: str,
    expected_manifest: Manifest | None = None,
) -> Manifest:
    """Rehash ``folder`` and compare with ``expected_digest`` (the registered manifest's digest).

    Raises :class:`IntegrityError` starting with ``label`` (e.g. ``"m v3"``) and naming the files
    that differ when ``expected_manifest`` is given. Returns the folder's manifest."""
    actual = build_manifest(folder)
    digest = manifest_digest(actual)
    if digest == expected_digest:
        return actual
    detail = (
        describe_difference(expected_manifest, actual)
        if expected_manifest is not None
        else "the registered manifest could not be read to name the files"
    )
    raise IntegrityError(
        f"{label}: checkpoint at {folder} does not match the manifest registered with the version "
        f"(sha256 {digest[:16]}… != registered {expected_digest[:16]}…; {detail}). Refusing to use "
        "it: the files changed after registration. Register the checkpoint again as a new version."
    )
