"""The Prefect ``canary`` flow in live mode: llama.cpp servers behind a running nginx, the hold-out
of a stored calibration set (rendered text and routes as the store keeps them), MLflow versions and
the rollout ledger of a throw-away ``FP4ROLL_HOME``.

* a good candidate (Q8_0) promotes through 10 → 100 %: nginx ends at 100 % candidate, the weights
  read back are journaled, ``champion`` moves in MLflow;
* a damaged candidate (Q2_K) is rolled back at stage 0: nginx back at 0 before the verdict is
  recorded, the challenger rejected, champion untouched; and the weight an earlier, aborted
  rollout left at the gateway is reconciled from the ledger before the first stage.

The setup is the live demo's (``pipelines/demo_live.py``: the log subset, the store, the GGUF
versions, the flow parameters and gates), small on purpose (12 held-out requests, 8-token answers,
records reused across the nested stage windows) and with two stages (10 → 100 %); the llama.cpp
servers are the session's (tests/serving/conftest.py). Skipped, with the reason, only where a
server cannot start here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from pipelines.canary.nginx import UPSTREAM_HEADER, NginxGateway
from pipelines.demo_live import LIVE_DEMO, live_demo_missing_reason
from pipelines.results import CanaryOutcome
from registry.judge import Decision

_MISSING = live_demo_missing_reason()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

MODEL = "smollm2-gguf"
CONFIG = dataclasses.replace(LIVE_DEMO, stages=(10.0, 100.0))
HOLDOUT = CONFIG.holdout_size


def _register_candidate(root: Path, label: str, gguf: Path, store) -> str:
    from pipelines.demo_live import register_gguf_candidate

    return register_gguf_candidate(MODEL, gguf, label, store, root / label)


@pytest.fixture(scope="module")
def stack(prefect_harness, gguf_files, tmp_path_factory):
    """A fresh FP4ROLL_HOME as the live demo prepares it: short logs of two routes imported, a
    calibration set whose hold-out is rendered with the GGUF's chat template, the packaged GGUF
    registered as champion."""
    from pipelines.demo_live import prepare_live_store

    home = tmp_path_factory.mktemp("live-flow-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("FP4ROLL_HOME", str(home))
    patch.delenv("FP4ROLL_DB_URL", raising=False)
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        store = prepare_live_store(MODEL, gguf_files["baseline"], home, CONFIG)
        assert store.imported == len(CONFIG.routes) * CONFIG.logs_per_route
        assert store.holdout_size == HOLDOUT
        yield store
    finally:
        patch.undo()


def _canary(gateway: NginxGateway, baseline_url: str):
    from pipelines.demo_live import live_canary_params
    from pipelines.flows import canary_flow

    return canary_flow(live_canary_params(MODEL, baseline_url, gateway, CONFIG))


def _aliases() -> dict[str, str]:
    from registry.mlflow_registry import aliases

    return aliases(MODEL)


def _applied(rollout_id: int) -> list[float]:
    from registry import ledger

    return [
        w.candidate_percent
        for w in ledger.traffic_weights(rollout_id)
        if w.phase is ledger.WeightPhase.APPLIED
    ]


def _upstream(gateway: NginxGateway) -> str:
    return httpx.get(f"{gateway.url}/v1/models", timeout=30).headers[UPSTREAM_HEADER]


def test_live_flow_promotes_a_good_candidate(stack, gguf_files, servers, tmp_path):
    from registry import ledger

    version = _register_candidate(tmp_path, "Q8_0", gguf_files["Q8_0"], stack)
    assert _aliases() == {"champion": stack.baseline_version, "challenger": version}
    base, cand = servers["baseline"], servers["Q8_0"]
    with NginxGateway(base.url, cand.url, workdir=tmp_path / "gateway") as gateway:
        result = _canary(gateway, base.url)
        reasons = [(s.outcome.value, s.reason) for s in result.stages]
        assert result.outcome is CanaryOutcome.PROMOTED, reasons
        assert [s.decision for s in result.stages] == [Decision.ADVANCE, Decision.PROMOTE]
        assert gateway.effective_weights()["candidate_percent"] == 100.0  # nginx itself says
        assert _upstream(gateway) == "candidate"
    assert _aliases() == {"champion": version, "previous-champion": stack.baseline_version}
    assert ledger.get_rollout(result.rollout_id).status.value == "promoted"
    assert _applied(result.rollout_id) == [10.0, 100.0]  # read back from nginx, journaled
    assert [s.requests for s in result.stages] == [6, HOLDOUT]
    last = result.stages[-1].metrics
    assert last["ttft_ms"]["enforced"] and last["latency_ms"]["enforced"]  # real latency judged
    assert any(name.startswith("route:code-help/") for name in last)  # judged per route
    assert Path(result.stages[-1].replay_path).is_file()


def test_live_flow_rolls_back_a_damaged_candidate(stack, gguf_files, servers, tmp_path):
    """Before it: an aborted rollout left the gateway at 50 % (its journal says so); the flow
    first puts the gateway where the ledger says (0 for an aborted rollout), then runs stage 0."""
    from registry import ledger
    from registry.versions import resolve_version

    champion = _aliases()["champion"]
    version = _register_candidate(tmp_path, "Q2_K", gguf_files["Q2_K"], stack)
    base, cand = servers["baseline"], servers["Q2_K"]
    with NginxGateway(
        base.url, cand.url, candidate_percent=50.0, workdir=tmp_path / "gateway"
    ) as gateway:
        crashed = ledger.start_rollout(MODEL, version, champion, (10.0, 100.0))
        for phase in (ledger.WeightPhase.INTENT, ledger.WeightPhase.APPLIED):
            ledger.record_weight(crashed.id, 50.0, phase, router="nginx", stage=0)
        ledger.mark_aborted(crashed.id, "worker killed")
        result = _canary(gateway, base.url)
        assert result.outcome is CanaryOutcome.ROLLED_BACK
        assert len(result.stages) == 1 and result.stages[0].decision is Decision.ROLLBACK
        assert {"top1_agreement", "kl_mean"} & set(result.stages[0].failed_metrics)
        assert gateway.effective_weights()["candidate_percent"] == 0.0
        assert _upstream(gateway) == "baseline"
    reconciled = ledger.last_weight(crashed.id)
    assert reconciled.candidate_percent == 0.0 and "reconcile" in reconciled.reason
    assert _applied(result.rollout_id) == [10.0, 0.0]  # rollback: weight 0 first
    rollout = ledger.get_rollout(result.rollout_id)
    assert rollout.status.value == "rolled_back" and "stage 0 failed" in rollout.reason
    assert _aliases()["champion"] == champion  # untouched
    assert resolve_version(MODEL, version).tags["fp4roll.outcome"] == "rejected"
