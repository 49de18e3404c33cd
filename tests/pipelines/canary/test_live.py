"""Live stage driver on fake endpoints: weights per stage, rollback to 0 first, per-route failure,
the ledger's weight journal and reconciliation after a crash; task metrics."""

from __future__ import annotations

import math

import pytest

from pipelines.canary.endpoints import ClientSettings, Endpoint, EndpointEvaluator
from pipelines.canary.judging import build_endpoint_policy
from pipelines.canary.live import (
    LedgerWeightJournal,
    MemoryWeightJournal,
    ledger_stage_recorder,
    reconcile_weight,
    run_live_canary,
)
from pipelines.canary.router import ReplayOnlyRouter, RouterError
from pipelines.canary.tasks import RouteFamily, code_parses, route_family, task_metrics
from registry import db, ledger
from registry.judge import Decision, RolloutProgress
from tests.pipelines.canary.fake_openai import FakeModel, route_answers

ROUTES = ["chat-support", "code-help"]
CODE_OK = "Here:\n```python\ndef f(x):\n    return x + 1\n```\n"
CODE_BAD = "Here:\n```python\ndef f(x)\n    return x + \n```\n"
HOLDOUT = [f"[{ROUTES[i % 2]}] request {i}: please help" for i in range(120)]
HOLDOUT_ROUTES = [ROUTES[i % 2] for i in range(120)]


def _evaluator(base: FakeModel, cand: FakeModel) -> EndpointEvaluator:
    return EndpointEvaluator(
        baseline=Endpoint("http://baseline", "m", flavor="llamacpp"),
        candidate=Endpoint("http://candidate", "m", flavor="llamacpp"),
        settings=ClientSettings(concurrency=4, top_k=3, kl_top_k=3, max_tokens=16),
        transport_baseline=base.transport(),
        transport_candidate=cand.transport(),
    )


def _policy(steps=(10.0, 50.0, 100.0)):
    # latency of in-process fakes is noise; this test is about the quality and error gates
    return build_endpoint_policy(
        steps,
        min_samples=20,
        overrides={
            "metric_overrides": {
                name: {"enforced": False} for name in ("latency_ms", "ttft_ms", "tpot_ms")
            }
        },
    )


class RecordingRouter(ReplayOnlyRouter):
    """Replay-only router that can refuse a weight (a gateway that fails)."""

    def __init__(self, refuse: float | None = None) -> None:
        super().__init__()
        self.refuse = refuse

    def set_candidate_percent(self, percent: float) -> float:
        if percent == self.refuse:
            raise RouterError("gateway down")
        return super().set_candidate_percent(percent)


def test_good_candidate_promotes_through_every_stage_with_each_weight_set():
    answers = route_answers({"code-help": CODE_OK, "chat-support": "Sure, I can help."})
    router, journal = RecordingRouter(), MemoryWeightJournal()
    result = run_live_canary(
        _evaluator(FakeModel(answer=answers), FakeModel(answer=answers)),
        router,
        HOLDOUT,
        policy=_policy(),
        routes=HOLDOUT_ROUTES,
        journal=journal,
    )
    assert result.decision is Decision.PROMOTE, [s.verdict.reason for s in result.stages]
    assert router.history == [10.0, 50.0, 100.0]
    assert [s.weight_applied for s in result.stages] == [10.0, 50.0, 100.0]
    assert [e[1] for e in journal.entries] == ["intent", "applied"] * 3
    assert result.final_weight == 100.0


def test_damaged_candidate_is_rolled_back_at_stage_one_weight_zero_first():
    events: list[str] = []
    router = RecordingRouter()
    original = router.set_candidate_percent

    def tracking(percent: float) -> float:
        events.append(f"weight {percent:g}")
        return original(percent)

    router.set_candidate_percent = tracking  # type: ignore[method-assign]
    result = run_live_canary(
        _evaluator(FakeModel(), FakeModel(damage=0.6)),
        router,
        HOLDOUT,
        policy=_policy(),
        routes=HOLDOUT_ROUTES,
        on_stage=lambda stage: events.append(f"record {stage.decision.value}"),
    )
    assert result.decision is Decision.ROLLBACK and len(result.stages) == 1
    assert events == ["weight 10", "weight 0", "record rollback"]
    assert router.candidate_percent() == 0.0 and result.final_weight == 0.0


def test_route_regression_fails_the_stage_while_the_pool_passes():
    base = FakeModel(answer=route_answers({"code-help": CODE_OK}))
    cand = FakeModel(answer=route_answers({"code-help": CODE_BAD}))
    result = run_live_canary(
        _evaluator(base, cand), RecordingRouter(), HOLDOUT, policy=_policy(), routes=HOLDOUT_ROUTES
    )
    # stage 1 (10 %: 20 requests) has too few per route: inconclusive there, the pool passes
    assert "routes without enough data" in result.stages[0].verdict.reason
    verdict = result.stages[-1].verdict
    assert result.decision is Decision.ROLLBACK and len(result.stages) == 2
    pool = [m for m in verdict.metrics if not m.metric.startswith("route:")]
    assert all(m.verdict.value == "pass" for m in pool if m.enforced), [
        (m.metric, m.reason) for m in pool
    ]
    assert "route:code-help/task_quality" in verdict.failed_metrics
    assert "route:chat-support/task_quality" not in verdict.failed_metrics


def test_small_route_is_inconclusive_for_that_route_only():
    holdout = HOLDOUT[:60] + ["[rare-route] one request"]
    routes = HOLDOUT_ROUTES[:60] + ["rare-route"]
    result = run_live_canary(
        _evaluator(FakeModel(), FakeModel()),
        RecordingRouter(),
        holdout,
        policy=_policy((100.0,)),
        routes=routes,
    )
    verdict = result.stages[0].verdict
    assert result.decision is Decision.PROMOTE
    assert "rare-route" in verdict.reason
    rare = [m for m in verdict.metrics if m.metric.startswith("route:rare-route/")]
    assert rare and all(m.verdict.value == "inconclusive" for m in rare)


def test_three_percent_errors_fail_the_error_rate_gate():
    cand = FakeModel(fail_percent=3.0)
    result = run_live_canary(
        _evaluator(FakeModel(), cand),
        RecordingRouter(),
        [f"prompt number {i}" for i in range(400)],
        policy=_policy((100.0,)),
    )
    error = result.stages[0].verdict.metric("error_rate")
    assert error.candidate_statistic > 0.01 and error.verdict.value == "fail" and error.critical
    assert result.decision is Decision.ROLLBACK and result.final_weight == 0.0


def test_ledger_journal_records_weights_and_a_rerun_reconciles(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db.upgrade(url)
    rollout = ledger.start_rollout("m", "2", "1", (10.0, 50.0, 100.0), db_url=url)
    journal = LedgerWeightJournal(rollout.id, "replay-only", db_url=url)
    router = RecordingRouter(refuse=50.0)  # the gateway dies when stage 2 sets its weight
    with pytest.raises(RouterError):
        run_live_canary(
            _evaluator(FakeModel(), FakeModel()),
            router,
            HOLDOUT,
            policy=_policy(),
            journal=journal,
            on_stage=ledger_stage_recorder(rollout.id, url),
        )
    rows = ledger.traffic_weights(rollout.id, db_url=url)
    assert [(r.candidate_percent, r.phase.value) for r in rows] == [
        (10.0, "intent"),
        (10.0, "applied"),
        (50.0, "intent"),
    ]
    # the rerun: a fresh gateway at 0; the ledger says 50 (intent of the crashed change)
    fresh = RecordingRouter()
    assert reconcile_weight(fresh, journal) == 50.0
    # a rollout that ended other than promoted must carry 0 whatever the gateway says
    assert ledger.get_rollout(rollout.id, db_url=url).current_stage == 1  # stage 0 recorded
    ledger.mark_aborted(rollout.id, "operator stop", db_url=url)
    assert reconcile_weight(fresh, journal) == 0.0 and fresh.candidate_percent() == 0.0
    result = run_live_canary(
        _evaluator(FakeModel(), FakeModel()),
        RecordingRouter(),
        HOLDOUT,
        policy=_policy(),
        progress=RolloutProgress(stage_index=2),
    )
    assert result.decision is Decision.PROMOTE
    db.dispose_engines()


# --------------------------------------------------------------------------------------- tasks


def test_route_families_and_task_metrics():
    assert route_family("extract-json") is RouteFamily.EXTRACTION
    assert route_family("code-help") is RouteFamily.CODE
    assert route_family("ticket-classifier") is RouteFamily.CLASSIFICATION
    assert route_family("chat-support") is RouteFamily.CHAT
    assert route_family("x", {"x": "code"}) is RouteFamily.CODE
    assert code_parses(CODE_OK) == 1.0 and code_parses(CODE_BAD) == 0.0
    assert math.isnan(code_parses("Just words, no code."))

    m = task_metrics(
        RouteFamily.EXTRACTION, '{"a": 1, "b": "X"}', '```json\n{"a": 1, "b": "y"}\n```'
    )
    assert m["task_quality_candidate"] == 1.0 and m["task_agreement"] == 0.5
    assert m["answer_flip"] == 1.0
    m = task_metrics(RouteFamily.EXTRACTION, '{"a": 1}', "not json")
    assert m["task_quality_candidate"] == 0.0 and m["task_agreement"] == 0.0
    m = task_metrics(RouteFamily.CLASSIFICATION, "Billing", "billing.")
    assert m["task_agreement"] == 1.0 and m["answer_flip"] == 0.0
    m = task_metrics(RouteFamily.CHAT, "Sure!", "I'm sorry, but I cannot help with that.")
    assert m["refusal_candidate"] == 1.0 and m["task_quality_candidate"] == 0.0
    m = task_metrics(RouteFamily.CHAT, "Sure!", "   ")
    assert m["empty_candidate"] == 1.0 and math.isnan(m["task_agreement"])


def test_reuse_records_sends_only_each_stage_increment():
    base, cand = FakeModel(), FakeModel()
    result = run_live_canary(
        _evaluator(base, cand),
        RecordingRouter(),
        HOLDOUT[:40],
        policy=_policy(),
        reuse_records=True,
    )
    assert result.decision is Decision.PROMOTE
    sizes = [len(s.request_indices) for s in result.stages]
    assert sizes == [20, 20, 40]  # min 20, then 50 % of 40, then all
    assert [len(s.replay.records) for s in result.stages] == sizes
    # one streamed generation per distinct request, not per stage sample
    assert base.calls["/v1/completions"] == 40 * 2  # generation + scoring
