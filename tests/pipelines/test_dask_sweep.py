"""The exact KL checks fanned out over a local two-worker Dask cluster give the thread pool's plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_kl_sweep_on_dask_matches_thread_pool(
    prefect_harness, tiny_llama_dir, tmp_path, monkeypatch
):
    from distributed import LocalCluster
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from pipelines import steps
    from pipelines.demo import shipped_logs
    from pipelines.flows import kl_sweep_flow
    from pipelines.params import RecalibrateParams
    from pipelines.prompt_logs import import_logs

    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))  # inherited by the Dask workers
    import_logs([shipped_logs()])
    params = RecalibrateParams(
        source_model=tiny_llama_dir,
        sampling={"calibration_size": 18, "sensitivity_size": 6, "holdout_size": 8},
        calibration={"max_prompt_tokens": 32, "kl_threshold": 0.0},  # every group checked
    )
    config = params.calibration
    digest = steps.sample_calibration_set(params, tiny_llama_dir).digest
    work = str(tmp_path / "shared")
    stats, rounded = steps.calibration_pass(tiny_llama_dir, digest, None, config, work)
    scores = steps.tier_scores(tiny_llama_dir, digest, None, stats, rounded, config, work)
    partitions = steps.sweep_partitions(steps.exact_candidates(scores, config), 2)
    assert sum(map(len, partitions)) == 8

    def sweep(runner, name: str):
        # its own work folder, so neither run reuses the other's files or cached task results
        work = str(tmp_path / name)
        parts = kl_sweep_flow.with_options(task_runner=runner)(
            tiny_llama_dir, digest, None, stats, rounded, partitions, config, work
        )
        return parts, steps.plan_and_export(
            tiny_llama_dir, digest, None, stats, rounded, scores, parts, config, work
        )

    threads, threads_plan = sweep(ThreadPoolTaskRunner(max_workers=2), "threads")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        dask, dask_plan = sweep(DaskTaskRunner(address=cluster.scheduler_address), "dask")

    assert dask_plan.upgraded_groups == threads_plan.upgraded_groups
    assert dask_plan.ignore == threads_plan.ignore
    assert dask_plan.plan_mean_kl == pytest.approx(threads_plan.plan_mean_kl, rel=1e-6, abs=1e-12)
    for a, b in zip(threads, dask, strict=True):
        left = json.loads(Path(a).read_text())["records"]
        right = json.loads(Path(b).read_text())["records"]
        assert [r["group"] for r in left] == [r["group"] for r in right]
        for x, y in zip(left, right, strict=True):
            assert x["mean_kl"] == pytest.approx(y["mean_kl"], rel=1e-6, abs=1e-12)
