"""Atomic writes: a reader sees the old content or the new, never a torn file or a half-written folder.

One helper per job, used by every layer that writes (calibration and pipelines):

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` — temp file in the target's folder,
  flushed and fsynced, renamed over the target, folder fsynced; the temp file is removed on any error.
* :func:`atomic_dir` — a temp folder beside the target to fill; on success it replaces the target (an
  existing one only with ``overwrite``); on any error it is removed and the target is left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    with suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, payload: bytes, *, mode: int = 0o644) -> Path:
    """Write ``payload`` to ``path`` atomically (parents created); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> Path:
    """UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: str | os.PathLike, payload: Any, *, mode: int = 0o644) -> Path:
    """``payload`` as strict JSON (indented, sorted keys; NaN/Inf refused) to ``path`` atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    return write_text(path, text + "\n", mode=mode)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir`` to fill; see the module doc."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir} appeared while writing; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "previous", out_dir)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
