"""Content digests of model folders, cheap on reruns: what a work key hashes instead of a path.

A source model changed in place (same path, new weights) must not reuse statistics, sweeps or
checkpoints computed from the old bytes, so the recalibration work key hashes the folder's content
(:func:`folder_digest`). Hashing a model on every scheduled run would cost seconds to minutes, so
each file's sha256 is remembered in ``$FP4ROLL_HOME/cache/file-digests.json`` under its
``(resolved path, size, mtime_ns, inode)``: a file rewritten in place gets a new mtime (and usually a
new size or inode) and is hashed again. This cache speeds up work keys only; integrity checks of
registered checkpoints (:mod:`registry.integrity`) always rehash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from calibration.atomic import write_json
from registry.db import fp4roll_home
from registry.integrity import file_sha256

logger = logging.getLogger(__name__)

_CACHE_NAME = "file-digests.json"
_MAX_ENTRIES = 20_000
_lock = threading.Lock()


def _cache_path() -> Path:
    return fp4roll_home() / "cache" / _CACHE_NAME


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load(cache_path: Path) -> dict[str, str]:
    try:
        data = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_digest(folder: str | os.PathLike, *, cache_path: Path | None = None) -> str:
    """sha256 over the relative path and content sha256 of every file under ``folder`` (files
    whose stat key is cached are not read again). Precondition: ``folder`` is a directory."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    cache_file = cache_path or _cache_path()
    with _lock:
        cache = _load(cache_file)
        changed = False
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = _stat_key(path)
            file_digest = cache.get(key)
            if file_digest is None:
                file_digest = cache[key] = file_sha256(path)
                changed = True
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0" + file_digest.encode() + b"\0")
        if changed:
            if len(cache) > _MAX_ENTRIES:  # drop the oldest half (insertion order)
                cache = dict(list(cache.items())[len(cache) // 2 :])
            write_json(cache_file, cache, mode=0o600)
    return digest.hexdigest()
