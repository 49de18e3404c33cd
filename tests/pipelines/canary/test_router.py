"""Traffic routers: the replay-only one, and nginx with read-back (real nginx, stub upstreams)."""

from __future__ import annotations

import httpx
import pytest

from pipelines.canary.live import MemoryWeightJournal, reconcile_weight, set_weight
from pipelines.canary.nginx import UPSTREAM_HEADER, NginxGateway, nginx_binary
from pipelines.canary.router import NginxRouter, ReplayOnlyRouter, RouterError, TrafficRouter
from tests.serving.stub_upstream import StubUpstream


def test_replay_only_router_remembers_and_validates():
    router = ReplayOnlyRouter()
    assert isinstance(router, TrafficRouter)
    assert router.set_candidate_percent(12.345) == 12.35  # nginx precision
    assert router.candidate_percent() == 12.35
    for bad in (-1, 101, float("nan")):
        with pytest.raises(RouterError):
            router.set_candidate_percent(bad)


def test_set_weight_journals_intent_then_read_back():
    router, journal = ReplayOnlyRouter(), MemoryWeightJournal()
    set_weight(router, journal, 50, stage=2, reason="stage 2")
    assert journal.entries == [(50.0, "intent", 2, "stage 2"), (50.0, "applied", 2, "stage 2")]
    assert reconcile_weight(ReplayOnlyRouter(), MemoryWeightJournal()) is None  # nothing journaled
    assert reconcile_weight(router, journal) == 50.0 and len(journal.entries) == 2  # in sync


@pytest.mark.integration
@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx)")
def test_nginx_router_sets_reads_back_and_routes():
    with (
        StubUpstream("baseline") as base,
        StubUpstream("candidate") as cand,
        NginxGateway(base.url, cand.url) as gateway,
    ):
        router = NginxRouter(gateway)
        assert isinstance(router, TrafficRouter)
        assert router.candidate_percent() == 0.0
        assert router.set_candidate_percent(100) == 100.0
        assert httpx.get(gateway.url, timeout=10).headers[UPSTREAM_HEADER] == "candidate"
        # a fresh journal that says 0 (the rollout was rolled back while nginx kept 100)
        journal = MemoryWeightJournal([(0.0, "applied", None, "rollback")])
        assert reconcile_weight(router, journal) == 0.0
        assert gateway.effective_weights()["candidate_percent"] == 0.0
        assert httpx.get(gateway.url, timeout=10).headers[UPSTREAM_HEADER] == "baseline"
        assert router.history == [100.0, 0.0]
