"""Endpoint evaluator against in-process fake servers (httpx.MockTransport) and the pinned fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from calibration.evaluate import load_replay, save_replay
from pipelines.canary.endpoints import (
    CanaryRequest,
    ClientSettings,
    Endpoint,
    EndpointError,
    EndpointEvaluator,
    parse_llamacpp_echo,
    parse_vllm_prompt_logprobs,
    topk_tail_kl,
)
from pipelines.canary.judging import build_endpoint_policy, judge_window, replay_samples
from registry.judge import Outcome
from tests.pipelines.canary.fake_openai import FakeModel, route_answers

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "openai"


def _fixture(flavor: str, name: str) -> dict:
    return json.loads((FIXTURES / flavor / f"{name}.json").read_text())


def _evaluator(base: FakeModel, cand: FakeModel, **settings) -> EndpointEvaluator:
    flavor = base.flavor
    return EndpointEvaluator(
        baseline=Endpoint("http://baseline", "m", flavor=flavor),
        candidate=Endpoint("http://candidate", "m", flavor=flavor),
        settings=ClientSettings(
            concurrency=3, top_k=3, kl_top_k=3, max_tokens=8, retry_backoff_s=0.0, **settings
        ),
        transport_baseline=base.transport(),
        transport_candidate=cand.transport(),
    )


PROMPTS = [f"question {i}: what is the capital?" for i in range(30)]


# --------------------------------------------------------------------------------------- metrics


def test_topk_tail_kl_is_zero_for_equal_lists_and_grows_with_disagreement():
    p = {"a": math.log(0.6), "b": math.log(0.3)}
    assert topk_tail_kl(p, p, 2) == pytest.approx(0.0, abs=1e-12)
    q = {"a": math.log(0.3), "b": math.log(0.6)}
    # exact KL over {a, b, tail}: tails are equal (0.1)
    expected = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6)
    assert topk_tail_kl(p, q, 2) == pytest.approx(expected)
    # a baseline token missing from the candidate's list gets the candidate's smallest listed prob
    r = {"a": math.log(0.6), "c": math.log(0.35)}
    assert topk_tail_kl(p, r, 2) > 0


def test_llamacpp_echo_fixture_gives_response_positions():
    fixture = _fixture("llamacpp", "completions_echo_logprobs")
    positions = parse_llamacpp_echo(fixture["response"], 3)
    tokens = fixture["response"]["choices"][0]["logprobs"]["tokens"]
    assert tokens[-3:] == [" Paris", "."][-3:] or len(positions) == 3
    last = fixture["response"]["choices"][0]["logprobs"]
    assert positions[-1].actual == pytest.approx(last["token_logprobs"][-1])
    assert positions[-1].top == last["top_logprobs"][-1]
    with pytest.raises(EndpointError):  # entry 0 never has a logprob
        parse_llamacpp_echo(fixture["response"], len(tokens))


def test_vllm_prompt_logprobs_fixture_keeps_top_k_and_actual_token():
    fixture = _fixture("vllm", "completions_prompt_logprobs")
    response = fixture["response"]
    k = fixture["request"]["prompt_logprobs"]
    positions = parse_vllm_prompt_logprobs(response, 8, k)
    entries = response["choices"][0]["prompt_logprobs"]
    ids = response["choices"][0]["prompt_token_ids"]
    for offset, pos in enumerate(positions):
        index = len(entries) - 8 + offset
        entry = entries[index]
        assert pos.actual == entry[str(ids[index])]["logprob"]
        assert len(pos.top) == k  # the actual token beyond rank k is not in the top-k
        assert all(entry[key]["rank"] <= k for key in pos.top)
    with pytest.raises(EndpointError):
        parse_vllm_prompt_logprobs(response, len(entries), k)


# --------------------------------------------------------------------------------------- evaluator


@pytest.mark.parametrize("flavor", ["llamacpp", "vllm"])
def test_identical_endpoints_agree_fully(flavor):
    result = _evaluator(FakeModel(flavor=flavor), FakeModel(flavor=flavor))(PROMPTS)
    assert result.num_errors == 0
    for rec in result.records:
        assert rec.kl_mean == pytest.approx(0.0, abs=1e-9)
        assert rec.top1_agreement == 1.0
        assert rec.nll_baseline == pytest.approx(rec.nll_candidate)
        assert rec.num_tokens == len("Paris is the capital.")
        assert rec.ttft_candidate_s <= rec.latency_candidate_s
        assert math.isfinite(rec.tpot_candidate_s)
    verdict = judge_window(result, build_endpoint_policy((1, 100), min_samples=20))
    assert verdict.metric("error_rate").verdict is Outcome.PASS
    assert verdict.metric("kl_mean").verdict is Outcome.PASS


def test_damaged_candidate_loses_top1_and_gains_kl():
    result = _evaluator(FakeModel(), FakeModel(damage=0.5))(PROMPTS)
    summary = result.summary()
    assert summary["top1_agreement"] < 0.7
    assert summary["kl_mean"] > 0.05
    verdict = judge_window(result, build_endpoint_policy((1, 100), min_samples=20))
    assert verdict.outcome is Outcome.FAIL
    assert "top1_agreement" in verdict.failed_metrics


def test_logged_response_is_what_gets_scored():
    requests = [CanaryRequest(text=p, logged_response=" Logged answer!") for p in PROMPTS[:3]]
    result = _evaluator(FakeModel(), FakeModel())(requests)
    assert [r.num_tokens for r in result.records] == [len(" Logged answer!")] * 3


def test_failed_candidate_requests_are_counted_not_dropped():
    cand = FakeModel(fail_percent=10.0)
    result = _evaluator(FakeModel(), cand)(PROMPTS * 3)
    failed = [r for r in result.records if not r.ok]
    assert failed, "the fake should fail about 10 % of prompts"
    assert all(r.failed_side == "candidate" and "HTTP 500" in r.error for r in failed)
    base, cand_samples = replay_samples(result)
    assert len(cand_samples["error_rate"]) == len(result.records)
    assert sum(cand_samples["error_rate"]) == len(failed)
    assert sum(base["error_rate"]) == 0
    verdict = judge_window(result, build_endpoint_policy((1, 100), min_samples=20))
    error = verdict.metric("error_rate")
    assert error.verdict is Outcome.FAIL and error.critical
    assert verdict.outcome is Outcome.FAIL and verdict.critical_failure


def test_baseline_failures_do_not_count_against_the_candidate():
    result = _evaluator(FakeModel(fail_percent=10.0), FakeModel())(PROMPTS * 3)
    failed = [r for r in result.records if not r.ok]
    assert failed and all(r.failed_side == "baseline" for r in failed)
    _, cand = replay_samples(result)
    assert sum(cand["error_rate"]) == 0


def test_500s_are_not_retried_but_429_and_connection_errors_are():
    cand = FakeModel(status_sequence=[429, 429])
    result = _evaluator(FakeModel(), cand, max_retries=2)(PROMPTS[:1])
    assert result.records[0].ok  # two 429s, then served
    cand = FakeModel(status_sequence=[429, 429, 429])
    result = _evaluator(FakeModel(), cand, max_retries=2)(PROMPTS[:1])
    assert not result.records[0].ok and "429" in result.records[0].error  # retries exhausted
    cand = FakeModel(status_sequence=[503])
    result = _evaluator(FakeModel(), cand, max_retries=2)(PROMPTS[:1])
    assert not result.records[0].ok and "HTTP 503" in result.records[0].error
    assert cand.calls["/v1/completions"] == 1  # a 5xx is an answer: counted, never retried

    attempts = {"n": 0}

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts["n"] += 1
        raise httpx.ConnectError("refused", request=request)

    evaluator = _evaluator(FakeModel(), FakeModel(), max_retries=2)
    evaluator = type(evaluator)(
        **{**evaluator.__dict__, "transport_candidate": httpx.MockTransport(refuse)}
    )
    result = evaluator(PROMPTS[:1])
    assert attempts["n"] == 3 and result.records[0].failed_side == "candidate"


def test_timeouts_are_failures_of_that_side():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    evaluator = _evaluator(FakeModel(), FakeModel())
    evaluator = type(evaluator)(
        **{**evaluator.__dict__, "transport_candidate": httpx.MockTransport(slow)}
    )
    result = evaluator(PROMPTS[:2])
    assert all(r.failed_side == "candidate" and "timeout" in r.error for r in result.records)


def test_api_key_comes_from_the_environment_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("FP4ROLL_TEST_KEY", "sk-secret-value")
    base = FakeModel(api_key="sk-secret-value")
    endpoint = Endpoint("http://baseline", "m", flavor="llamacpp", api_key_env="FP4ROLL_TEST_KEY")
    evaluator = EndpointEvaluator(
        baseline=endpoint,
        candidate=Endpoint("http://candidate", "m", flavor="llamacpp"),
        settings=ClientSettings(top_k=3, kl_top_k=3, retry_backoff_s=0.0),
        transport_baseline=base.transport(),
        transport_candidate=FakeModel().transport(),
    )
    result = evaluator(PROMPTS[:2])
    assert result.num_errors == 0
    assert set(base.seen_auth) == {"Bearer sk-secret-value"}
    assert "sk-secret" not in repr(endpoint) and "sk-secret" not in repr(evaluator)
    monkeypatch.delenv("FP4ROLL_TEST_KEY")
    with pytest.raises(EndpointError, match="FP4ROLL_TEST_KEY"):
        endpoint.request_headers()


def test_endpoint_records_round_trip_through_json(tmp_path):
    answers = route_answers({"extract": '{"name": "Ann"}'})
    model = FakeModel(answer=answers)
    result = _evaluator(model, FakeModel(answer=answers, fail_percent=20))(
        [f"[extract] {p}" for p in PROMPTS[:10]], routes=["extract-json"] * 10
    )
    loaded = load_replay(save_replay(result, tmp_path / "r.json"))
    assert loaded == result or [r.task for r in loaded.records] == [r.task for r in result.records]
    assert [r.route for r in loaded.records] == ["extract-json"] * 10
    assert [r.failed_side for r in loaded.records] == [r.failed_side for r in result.records]
