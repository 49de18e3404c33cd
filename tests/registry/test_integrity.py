# ruff: noqa: F811 - pytest fixtures imported from tests/registry/mlflow_fixtures.py
"""Checkpoint integrity: manifests registered with versions, verified on every use; content-keyed cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from registry import tags
from registry.integrity import (
    MANIFEST_ARTIFACT,
    IntegrityError,
    build_manifest,
    manifest_digest,
    verify_folder,
)
from registry.mlflow_registry import register
from registry.versions import local_checkpoint, register_baseline, resolve_version
from tests.registry.mlflow_fixtures import (  # noqa: F401 - fixtures
    make_request,
    mlflow_server,
    mlflow_sqlite_uri,
)


def _folder(tmp_path: Path, name: str = "ckpt", payload: bytes = b"weights") -> Path:
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload * 100)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def _artifact_dir(source: str) -> Path:
    parsed = urlparse(source)
    return Path(unquote(parsed.path))


def test_manifest_names_changed_missing_and_extra_files(tmp_path):
    folder = _folder(tmp_path)
    manifest = build_manifest(folder)
    assert sorted(manifest) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    digest = manifest_digest(manifest)
    assert verify_folder(folder, digest, label="m v1") == manifest
    # same size, same mtime: only the bytes differ
    target = folder / "model.safetensors"
    stat = target.stat()
    target.write_bytes(b"WEIGHTS" * 100)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (folder / "sub" / "tokenizer.json").unlink()
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError) as caught:
        verify_folder(folder, digest, label="m v1", expected_manifest=manifest)
    message = str(caught.value)
    assert message.startswith("m v1:")
    assert "changed: model.safetensors" in message
    assert "missing: sub/tokenizer.json" in message and "extra: extra.bin" in message


def test_registered_version_carries_manifest_and_swapped_file_is_refused(
    mlflow_sqlite_uri, make_request
):
    request = make_request()
    registered = register(request, tracking_uri=mlflow_sqlite_uri)
    info = resolve_version(request.model_name, registered.version, tracking_uri=mlflow_sqlite_uri)
    assert info.manifest_digest == manifest_digest(build_manifest(request.checkpoint_dir))
    folder = local_checkpoint(info, tracking_uri=mlflow_sqlite_uri)
    assert folder == _artifact_dir(info.source)
    document = json.loads((folder.parent / MANIFEST_ARTIFACT).read_text())
    assert document["digest"] == info.manifest_digest
    assert set(document["files"]) == {"model.safetensors", "config.json"}

    (folder / "model.safetensors").write_bytes(b"evil!" * 64)  # same size as the original
    with pytest.raises(IntegrityError, match=r"v\d+: .*changed: model\.safetensors"):
        local_checkpoint(info, tracking_uri=mlflow_sqlite_uri)


def test_version_without_manifest_is_refused(mlflow_sqlite_uri, make_request):
    from registry.mlflow_registry import client_for

    request = make_request()
    registered = register(request, tracking_uri=mlflow_sqlite_uri)
    client, _ = client_for(mlflow_sqlite_uri)
    client.delete_model_version_tag(request.model_name, registered.version, tags.CHECKPOINT_SHA256)
    info = resolve_version(request.model_name, registered.version, tracking_uri=mlflow_sqlite_uri)
    with pytest.raises(IntegrityError, match="has no checkpoint manifest"):
        local_checkpoint(info, tracking_uri=mlflow_sqlite_uri)


def test_baseline_registration_records_the_manifest(mlflow_sqlite_uri, tmp_path):
    folder = _folder(tmp_path)
    info, moves = register_baseline(f"base-{os.getpid()}", folder, tracking_uri=mlflow_sqlite_uri)
    assert moves and info.manifest_digest == manifest_digest(build_manifest(folder))
    assert local_checkpoint(info, tracking_uri=mlflow_sqlite_uri).is_dir()


@pytest.mark.integration
def test_download_cache_is_keyed_by_content_and_evicts_a_tampered_copy(
    mlflow_server, make_request, tmp_path
):
    """Two versions with the same bytes share one cache entry; a changed cached copy is replaced."""
    name = f"cache-{os.getpid()}"
    first = register(make_request(model_name=name, payload=b"same"), tracking_uri=mlflow_server)
    second = register(
        make_request(model_name=name, payload=b"same", code_version="other"),
        tracking_uri=mlflow_server,
    )
    assert first.version != second.version
    cache = tmp_path / "cache"
    info1 = resolve_version(name, first.version, tracking_uri=mlflow_server)
    info2 = resolve_version(name, second.version, tracking_uri=mlflow_server)
    path1 = local_checkpoint(info1, cache_dir=cache, tracking_uri=mlflow_server)
    path2 = local_checkpoint(info2, cache_dir=cache, tracking_uri=mlflow_server)
    assert path1 == path2 == cache / info1.manifest_digest
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [path1.name]

    (path1 / "model.safetensors").write_bytes(b"tampered")
    again = local_checkpoint(info1, cache_dir=cache, tracking_uri=mlflow_server)
    assert (again / "model.safetensors").read_bytes() == b"same" * 64
