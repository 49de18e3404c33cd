"""The canary: replay stages and their judge adapter (:mod:`.replay`), evaluators against live
OpenAI-compatible endpoints (:mod:`.endpoints`), traffic routers (:mod:`.router`, :mod:`.nginx`),
per-route judging and task metrics (:mod:`.judging`, :mod:`.tasks`), the live stage driver
(:mod:`.live`), llama.cpp's server and GGUF helpers for endpoints on one machine (:mod:`.llamacpp`).

The replay names below are loaded on first use: :mod:`.replay` imports torch, and the flow
parameters (imported by every ``fp4roll`` command) only need the light modules of this package.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ReplayStageResult",
    "judge_replay",
    "judge_samples",
    "run_replay_canary",
    "run_replay_stage",
    "stage_request_indices",
    "stage_requests",
    "stage_sample_count",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipelines.canary import replay

        return getattr(replay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
