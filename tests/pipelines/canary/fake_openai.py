"""An in-process fake OpenAI-compatible server (``httpx.MockTransport``) speaking vLLM's or llama.cpp's
dialect, with the shapes of ``tests/fixtures/openai`` (the fixture tests pin them against real
servers). A toy model: one token per character; the next-token distribution at every position puts
``confidence`` on the actual character and the rest on two fillers; ``damage`` moves mass to a
wrong token (top-1 flips); answers per route are fixed strings (``answers``); ``fail_every`` makes
every n-th request of a kind answer HTTP 500 (deterministic on the prompt's hash)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx


@dataclass
class FakeModel:
    flavor: str = "llamacpp"  # or "vllm"
    confidence: float = 0.6
    damage: float = 0.0  # 0..1: share of positions whose top-1 is a wrong token
    answer: Callable[[str], str] = lambda prompt: "Paris is the capital."
    fail_percent: float = 0.0  # share of prompts (by hash) whose every request answers 500
    status_sequence: list[int] = field(default_factory=list)  # statuses to answer first, in order
    calls: dict[str, int] = field(default_factory=dict)
    api_key: str | None = None
    seen_auth: list[str | None] = field(default_factory=list)

    # -- toy distributions ---------------------------------------------------------------------

    def _top(self, position: int, actual: str) -> dict[str, float]:
        wrong = position % 100 < self.damage * 100
        fillers = ["~", "^"] if actual not in "~^" else ["#", "@"]
        if wrong:
            probs = {fillers[0]: self.confidence, actual: (1 - self.confidence) * 0.7}
            probs[fillers[1]] = (1 - self.confidence) * 0.3
        else:
            probs = {actual: self.confidence, fillers[0]: (1 - self.confidence) * 0.7}
            probs[fillers[1]] = (1 - self.confidence) * 0.3
        return {k: math.log(v) for k, v in probs.items()}

    def _fails(self, prompt: str) -> bool:
        bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10000
        return bucket < self.fail_percent * 100

    # -- HTTP ----------------------------------------------------------------------------------

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] = self.calls.get(path, 0) + 1
        self.seen_auth.append(request.headers.get("authorization"))
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": {"message": "Invalid API Key"}})
        if self.status_sequence:
            status = self.status_sequence.pop(0)
            if status != 200:
                return httpx.Response(status, json={"error": {"message": f"status {status}"}})
        body = json.loads(request.content or b"{}")
        if path in ("/extras/tokenize/count", "/tokenize"):
            text = body.get("input", body.get("prompt", ""))
            return httpx.Response(200, json={"count": len(text)})
        if path != "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        prompt = body["prompt"]
        if self._fails(prompt) or self._fails(prompt.split("\x00")[0]):
            return httpx.Response(500, json={"error": {"message": "injected"}})
        if body.get("stream"):
            return self._stream(prompt, body)
        if body.get("echo") or "prompt_logprobs" in body:
            return self._score(prompt, body)
        return httpx.Response(400, json={"error": {"message": "unsupported"}})

    def _stream(self, prompt: str, body: dict) -> httpx.Response:
        text = self.answer(prompt)[: body.get("max_tokens", 16) * 4]
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        events = [
            json.dumps({"choices": [{"index": 0, "text": p, "finish_reason": None}]})
            for p in pieces
        ]
        if self.flavor == "vllm" and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(pieces)}
            events.append(json.dumps({"choices": [], "usage": usage}))
        payload = "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(
            200, content=payload.encode(), headers={"content-type": "text/event-stream"}
        )

    def _score(self, prompt: str, body: dict) -> httpx.Response:
        tops = [None] + [self._top(i, prompt[i]) for i in range(1, len(prompt))]
        if self.flavor == "llamacpp":
            logprobs = {
                "tokens": list(prompt),
                "text_offset": list(range(len(prompt))),
                "token_logprobs": [None] + [t[prompt[i]] for i, t in enumerate(tops) if t],
                "top_logprobs": tops,
            }
            choice = {"text": prompt, "index": 0, "logprobs": logprobs, "finish_reason": "length"}
            usage = {"prompt_tokens": len(prompt), "completion_tokens": 0}
            return httpx.Response(200, json={"choices": [choice], "usage": usage})
        k = int(body["prompt_logprobs"])
        entries = [None]
        for i, top in enumerate(tops[1:], start=1):
            ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)
            entry = {
                str(ord(tok)): {"logprob": lp, "rank": rank, "decoded_token": tok}
                for rank, (tok, lp) in enumerate(ranked, start=1)
                if rank <= k or tok == prompt[i]
            }
            entries.append(entry)
        choice = {
            "index": 0,
            "text": "",
            "prompt_logprobs": entries,
            "prompt_token_ids": [ord(c) for c in prompt],
        }
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": 1}})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def route_answers(answers: Mapping[str, str], default: str = "Sure, here it is.") -> Callable:
    """An ``answer`` function picking the answer by a route marker in the prompt (``[route]``)."""

    def answer(prompt: str) -> str:
        for route, text in answers.items():
            if f"[{route}]" in prompt:
                return text
        return default

    return answer
