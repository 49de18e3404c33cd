"""The canary against real servers: llama.cpp's OpenAI-compatible server (the packaged SmolLM2 GGUF as
baseline, requantized GGUFs as candidates) behind a real nginx, driven stage by stage.

Scenarios (issue 12): a good candidate (Q8_0) promotes through every stage with the weights observed
at the gateway; a damaged one (Q2_K) is rolled back at stage 1 with the gateway back at 0; a
candidate failing a deterministic 3 % of requests (nginx answers 503 for them) fails the error-rate
gate; a route-specific regression (the candidate's code answers broken by a proxy in front of it)
fails while the pooled metrics pass.

One baseline server and one server per candidate GGUF for the whole session; few requests, short
generations. Skipped, with the reason, only where a server cannot start here.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from pipelines.canary.endpoints import CanaryRequest, ClientSettings, Endpoint, EndpointEvaluator
from pipelines.canary.judging import build_endpoint_policy
from pipelines.canary.live import MemoryWeightJournal, run_live_canary
from pipelines.canary.llamacpp import (
    LlamaServer,
    gguf_chat_template,
    llama_cpp_server_missing_reason,
    render_chat_template,
)
from pipelines.canary.nginx import ROUTE_HEADER, UPSTREAM_HEADER, NginxGateway, nginx_binary
from pipelines.canary.router import NginxRouter
from registry.judge import Decision

_MISSING = llama_cpp_server_missing_reason() or (
    None if nginx_binary() else "nginx is not installed (apt-get install nginx)"
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

MAX_TOKENS = 8
STEPS = (10.0, 50.0, 100.0)


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def holdout(gguf_files) -> list[CanaryRequest]:
    """Held-out chat requests from the shipped logs (two routes), rendered with the GGUF's template."""
    from benchmarks.serving_candidates import pick_prompts

    template = gguf_chat_template(gguf_files["baseline"])
    wanted = ("chat-support", "code-help")
    # Short messages: llama.cpp's server sorts the whole vocabulary in Python for every echoed
    # position (~0.1 s each on this machine), so the scoring cost grows with the prompt.
    prompts = [p for p in pick_prompts(80, 60) if p["route"] in wanted][:12]
    return [
        CanaryRequest(render_chat_template(template, p["messages"]), route=p["route"])
        for p in prompts
    ]


def _policy(steps=STEPS, min_samples: int = 6, **overrides):
    """Endpoint gates, small windows. Latency gates stay enforced but their limits are generous:
    three llama.cpp servers and the test share 2 CPU cores, so per-request latency here measures
    the machine's contention more than the candidate (see README "Canary gates")."""
    metric_overrides = {
        name: {"max_effect": 3.0, "critical_effect": 5.0}
        for name in ("latency_ms", "ttft_ms", "tpot_ms")
    }
    metric_overrides.update(overrides.pop("metric_overrides", {}))
    return build_endpoint_policy(
        steps,
        min_samples=min_samples,
        overrides={"metric_overrides": metric_overrides, **overrides},
    )


def _evaluator(baseline: LlamaServer, candidate_url: str, **headers) -> EndpointEvaluator:
    return EndpointEvaluator(
        baseline=Endpoint(baseline.url, "smollm2", flavor="llamacpp"),
        candidate=Endpoint(candidate_url, "smollm2", flavor="llamacpp", headers=headers),
        settings=ClientSettings(
            concurrency=2, max_tokens=MAX_TOKENS, top_k=5, kl_top_k=5, read_timeout_s=600
        ),
    )


def _observe(gateway: NginxGateway, seen: list[float]):
    def hook(stage) -> None:
        seen.append(gateway.effective_weights()["candidate_percent"])

    return hook


def _probe_upstream(gateway: NginxGateway) -> str:
    response = httpx.get(f"{gateway.url}/v1/models", timeout=30)
    return response.headers[UPSTREAM_HEADER]


# --------------------------------------------------------------------------------------- scenarios


def test_good_candidate_promotes_through_every_stage(servers, holdout):
    base, cand = servers["baseline"], servers["Q8_0"]
    with NginxGateway(base.url, cand.url) as gateway:
        router, seen = NginxRouter(gateway), []
        result = run_live_canary(
            _evaluator(base, gateway.candidate_front_url),
            router,
            holdout,
            policy=_policy(),
            route_min_samples=5,
            reuse_records=True,
            on_stage=_observe(gateway, seen),
        )
        reasons = [(s.verdict.outcome.value, s.verdict.reason) for s in result.stages]
        assert result.decision is Decision.PROMOTE, reasons
        assert router.history == list(STEPS) and seen == list(STEPS)
        assert _probe_upstream(gateway) == "candidate"  # 100 %: the gateway serves the candidate
    last = result.stages[-1]
    assert last.replay.num_errors == 0
    assert last.verdict.metric("top1_agreement").candidate_statistic > 0.85  # the guard


def test_damaged_candidate_rolled_back_at_stage_one(servers, holdout):
    base, cand = servers["baseline"], servers["Q2_K"]
    with NginxGateway(base.url, cand.url) as gateway:
        router, seen = NginxRouter(gateway), []
        result = run_live_canary(
            _evaluator(base, gateway.candidate_front_url),
            router,
            holdout,
            policy=_policy(),
            route_min_samples=5,
            reuse_records=True,
            on_stage=_observe(gateway, seen),
        )
        assert result.decision is Decision.ROLLBACK and len(result.stages) == 1
        verdict = result.stages[0].verdict
        assert verdict.critical_failure
        assert {"top1_agreement", "kl_mean"} & set(verdict.failed_metrics), verdict.reason
        assert router.history == [10.0, 0.0]
        assert seen == [0.0]  # by the time the stage is recorded the weight is already 0
        assert gateway.effective_weights()["candidate_percent"] == 0.0
        assert _probe_upstream(gateway) == "baseline"


def test_three_percent_errors_fail_the_error_rate_gate(servers):
    """nginx answers 503 for a deterministic 3 % of the candidate's requests (keyed on each held-out
    request's route key, so all calls of one request share its fate). 100 short plain prompts, two
    generated tokens each: the window is cheap enough to count errors on."""
    base, cand = servers["baseline"], servers["Q8_0"]
    requests = [CanaryRequest(f"Say {i}.") for i in range(100)]
    with NginxGateway(base.url, cand.url, candidate_error_percent=3.0) as gateway:
        router = NginxRouter(gateway)
        evaluator = EndpointEvaluator(
            baseline=Endpoint(base.url, "smollm2", flavor="llamacpp"),
            candidate=Endpoint(gateway.candidate_front_url, "smollm2", flavor="llamacpp"),
            settings=ClientSettings(
                concurrency=2, max_tokens=2, top_k=5, kl_top_k=5, read_timeout_s=600
            ),
        )
        result = run_live_canary(
            evaluator, router, requests, policy=_policy((100.0,), min_samples=50)
        )
        assert gateway.effective_weights()["candidate_percent"] == 0.0
    records = result.stages[0].replay.records
    failed = [r for r in records if not r.ok]
    assert len(failed) >= 2, "the deterministic 3 % split should hit at least 2 of 100 keys"
    assert all(r.failed_side == "candidate" and "503" in r.error for r in failed)
    error = result.stages[0].verdict.metric("error_rate")
    assert error.n_candidate == len(records) == 100  # every request counted, none dropped
    assert error.candidate_statistic == pytest.approx(len(failed) / 100)
    assert error.verdict.value == "fail" and error.critical
    assert result.decision is Decision.ROLLBACK and router.history == [100.0, 0.0]


class _BreakCode:
    """A proxy in front of a real server that corrupts streamed answers of one route's prompts
    (those carrying the route's system prompt): every text piece gets an unbalanced ``(`` and the
    first piece opens a Python fence, so code no longer parses. Teacher-forced scoring passes
    through untouched, so the token-level metrics stay those of the real server."""

    def __init__(self, upstream: str, marker: str) -> None:
        self.upstream = upstream
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = json.loads(body or b"{}")
                corrupt = request.get("stream") and marker in request.get("prompt", "")
                answer = httpx.post(
                    f"{outer.upstream}{self.path}",
                    content=body,
                    timeout=300,
                    headers={"Content-Type": "application/json"},
                )
                payload = answer.content
                if corrupt and answer.status_code == 200:
                    lines, first = [], True
                    for line in answer.text.splitlines():
                        if line.startswith("data:") and line[5:].strip() != "[DONE]":
                            event = json.loads(line[5:])
                            for choice in event.get("choices") or []:
                                prefix = "```python\ndef broken(:\n" if first else ""
                                choice["text"] = prefix + (choice.get("text") or "") + "("
                                first = False
                            line = "data: " + json.dumps(event)
                        lines.append(line)
                    payload = ("\n".join(lines) + "\n").encode()
                self.send_response(answer.status_code)
                self.send_header(
                    "Content-Type", answer.headers.get("content-type", "application/json")
                )
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_route_regression_fails_while_the_pool_passes(servers, holdout):
    base = servers["baseline"]
    proxy = _BreakCode(base.url, marker="senior Python engineer")
    try:
        with NginxGateway(base.url, proxy.url) as gateway:
            result = run_live_canary(
                _evaluator(base, gateway.candidate_front_url),
                NginxRouter(gateway),
                holdout,
                policy=_policy((100.0,)),
                route_min_samples=5,
                reuse_records=True,
            )
            assert gateway.effective_weights()["candidate_percent"] == 0.0
    finally:
        proxy.close()
    verdict = result.stages[0].verdict
    pool = [m for m in verdict.metrics if not m.metric.startswith("route:") and m.enforced]
    assert all(m.verdict.value == "pass" for m in pool), [(m.metric, m.reason) for m in pool]
    assert "route:code-help/task_quality" in verdict.failed_metrics, verdict.reason
    assert not any(m.startswith("route:chat-support/") for m in verdict.failed_metrics)
    assert result.decision is Decision.ROLLBACK


def test_route_header_forces_a_side_through_the_gateway(servers):
    """Mirrored replay through the gateway itself: the route header pins a side at any weight."""
    base = servers["baseline"]
    with NginxGateway(base.url, base.url, candidate_percent=0.0) as gateway:
        forced = httpx.get(
            f"{gateway.url}/v1/models", headers={ROUTE_HEADER: "candidate"}, timeout=30
        )
        assert forced.headers[UPSTREAM_HEADER] == "candidate"
        assert MemoryWeightJournal().expected() is None
