"""llama.cpp's OpenAI-compatible server on the packaged SmolLM2 GGUF, started by the test."""

from __future__ import annotations

import json
import math
import socket

import httpx
import pytest

from pipelines.canary.llamacpp import LlamaServer, llama_cpp_server_missing_reason
from tests.serving.capture import LOGGED_RESPONSE, RENDERED_PROMPT

_MISSING = llama_cpp_server_missing_reason()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]


@pytest.fixture(scope="module")
def gguf_path():
    from calibration.models import ModelLoadError, smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(gguf_path):
    with LlamaServer(gguf_path, api_key="test-key") as running:
        yield running


def _post(server: LlamaServer, endpoint: str, body: dict) -> dict:
    response = httpx.post(
        f"{server.url}{endpoint}", json=body, headers=server.headers(), timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_models_and_auth(server):
    models = httpx.get(f"{server.url}/v1/models", headers=server.headers(), timeout=10).json()
    assert [m["id"] for m in models["data"]] == [server.alias]
    denied = httpx.get(
        f"{server.url}/v1/models", headers={"Authorization": "Bearer no"}, timeout=10
    )
    assert denied.status_code == 401


def test_echo_logprobs_score_the_prompt_tokens_aligned(server, gguf_path):
    """Teacher forcing: the echoed logprob of each token equals the in-process llama.cpp logprob of
    that token given the tokens before it (independent computation of the same model).

    The server skips every token equal to BOS (SmolLM2's BOS is ``<|im_start|>``) and renders
    other special tokens as "": echo entry i is the i-th non-BOS token of the text.
    """
    from llama_cpp import Llama

    text = RENDERED_PROMPT + LOGGED_RESPONSE
    body = {"prompt": text, "echo": True, "logprobs": 5, "max_tokens": 1, "temperature": 0}
    answer = _post(server, "/v1/completions", body)
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(text)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    n = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    for i in range(1, n):
        top = lp["top_logprobs"][i]
        assert lp["tokens"][i] in top  # the actual token is always listed, top-k or not
        assert math.isclose(top[lp["tokens"][i]], lp["token_logprobs"][i], abs_tol=1e-6)

    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=512, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        bos = llm.token_bos()
        llm.eval(tokens)
        scores = [list(row) for row in llm.scores[: len(tokens)]]
    finally:
        llm.close()
    echoed = [p for p, token in enumerate(tokens) if token != bos]
    assert len(echoed) == n - answer["usage"]["completion_tokens"]
    for i, p in enumerate(echoed[1:], start=1):
        row = scores[p - 1]  # the distribution that predicts token p
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row))
        assert lp["token_logprobs"][i] == pytest.approx(row[tokens[p]] - log_z, abs=2e-3)
    # The logged response is the tail of the echo: its tokens spell it.
    response_tokens = len(tokens) - len(llm_free_tokenize(server, RENDERED_PROMPT))
    end = n - answer["usage"]["completion_tokens"]
    assert "".join(lp["tokens"][end - response_tokens : end]) == LOGGED_RESPONSE


def llm_free_tokenize(server: LlamaServer, text: str) -> list[int]:
    """Token ids through the server's own tokenizer endpoint."""
    return _post(server, "/extras/tokenize", {"input": text})["tokens"]


def test_greedy_stream_matches_non_stream(server):
    body = {"prompt": RENDERED_PROMPT, "max_tokens": 8, "temperature": 0}
    whole = _post(server, "/v1/completions", body)["choices"][0]["text"]
    pieces = []
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={**body, "stream": True},
        headers=server.headers(),
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                pieces.append(json.loads(line[5:])["choices"][0]["text"])
    assert "".join(pieces) == whole and whole


def test_errors_are_openai_shaped(server):
    overflow = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "hello " * 5000, "max_tokens": 1},
        headers=server.headers(),
        timeout=120,
    )
    assert overflow.status_code == 400
    assert overflow.json()["error"]["message"]


def test_close_stops_the_process_and_frees_the_port(gguf_path):
    server = LlamaServer(gguf_path)
    port, proc = server.port, server.proc
    server.close()
    assert proc.poll() is not None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free again
