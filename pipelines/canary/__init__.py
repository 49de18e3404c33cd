"""The canary: replay stages and their judge adapter (:mod:`.replay`), evaluators against live
OpenAI-compatible endpoints (:mod:`.endpoints`), traffic routers (:mod:`.router`, :mod:`.nginx`),
per-route judging and task metrics (:mod:`.judging`, :mod:`.tasks`), the live stage driver
(:mod:`.live`)."""

from pipelines.canary.replay import (
    ReplayStageResult,
    judge_replay,
    judge_samples,
    run_replay_canary,
    run_replay_stage,
    stage_request_indices,
    stage_requests,
    stage_sample_count,
)

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
