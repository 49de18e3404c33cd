"""Named crash points for fault-injection tests.

``FP4ROLL_CRASH_AT=<point>`` makes the process ``SIGKILL`` itself (no cleanup, no ``finally``, no
flush: what a power cut or ``kill -9`` does) the first time it reaches :func:`crash_point` with that
name. Unset (always, outside tests) it costs one environment lookup. The points sit before and
after every alias move and every ledger write of a stage, a promotion, a rejection and a rollback;
:data:`CRASH_POINTS` lists them for the test matrix.
"""

from __future__ import annotations

import os
import signal

ENV = "FP4ROLL_CRASH_AT"

#: Every named point (``move:<before|after>:<alias>`` in :mod:`registry.mlflow_registry`).
CRASH_POINTS = (
    "stage:before-record",
    "stage:after-record",
    "stage:after-advance",
    "intent:after-begin",
    "move:before:previous-champion",
    "move:after:previous-champion",
    "move:before:champion",
    "move:after:champion",
    "move:before:challenger",
    "move:after:challenger",
    "tags:after-outcome",
    "intent:before-complete",
    "intent:after-complete",
)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``$FP4ROLL_CRASH_AT`` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
