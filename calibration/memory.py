"""Give freed heap memory back to the operating system between the passes' steps.

Calibration allocates tensors of a different shape at every batch (prompts are sorted by length), so
glibc's heap fragments: freed chunks are too small for the next, larger request, and the resident set
grows batch after batch although nothing is kept (measured on SmolLM2: +0.7 GB over one Fisher pass).
``malloc_trim(0)`` returns every whole free page of every arena. A no-op where the C library has no
``malloc_trim`` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Return free heap pages to the OS (cheap: a walk over the free lists)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
