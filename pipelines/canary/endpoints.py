"""Endpoint evaluator: the canary against two live OpenAI-compatible servers (vLLM, llama.cpp).

:class:`EndpointEvaluator` implements :class:`calibration.evaluate.CanaryEvaluator`. Per held-out
request, on both sides at once (mirrored):

1. a streamed greedy generation (``/v1/completions``, temperature 0): the answers compared per route
   (:mod:`pipelines.canary.tasks`), time to first token, seconds per output token, end to end;
2. teacher-forced scoring of prompt + the baseline's response (the logged response when the caller
   gives one, else the baseline's greedy answer from step 1): vLLM's ``prompt_logprobs`` (entries
   keyed by token id) or llama.cpp's ``echo`` + ``logprobs`` (keyed by decoded text) → per response
   token: top-k KL with a tail bucket (:func:`topk_tail_kl`), top-1 agreement, NLL of each side.

HTTP: one ``httpx.AsyncClient`` per side, a semaphore bounding requests in flight, connect/read
timeouts, bounded retries only where the request cannot have been served (connection refused, 429
and the statuses in ``retry_statuses``); a request still failing after them is a FAILED record with
``failed_side`` set, which the judge's ``error_rate`` gate counts. Nothing is dropped. API keys come
from environment variables named by :class:`Endpoint` (never from parameters, never logged).

Traps of the servers (pinned by ``tests/fixtures/openai``): llama.cpp treats ``max_tokens: 0`` as
unlimited (we ask for 1), drops BOS from the echo, keys ``top_logprobs`` by decoded text, and its
echoed prompt's first entry has no logprob; vLLM's ``prompt_logprobs`` entry 0 is ``null`` and each
entry holds the top-k plus the actual token (whose rank can be anything).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from calibration.prompts import Prompt, RenderedPrompt

if TYPE_CHECKING:  # calibration.evaluate imports torch: the flow parameters import this module
    from calibration.evaluate import ReplayRecord, ReplayResult

logger = logging.getLogger(__name__)


class ServerFlavor(str, Enum):
    """How a server exposes prompt log-probabilities."""

    VLLM = "vllm"  # prompt_logprobs, token-id keys, /tokenize
    LLAMACPP = "llamacpp"  # echo + logprobs, text keys, /extras/tokenize/count


class EndpointError(RuntimeError):
    """A request failed for good (after its retries), or answered something unusable."""


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible server. ``base_url`` without ``/v1``; ``api_key_env`` names the
    environment variable holding its key (None: no key)."""

    base_url: str
    model: str
    flavor: ServerFlavor = ServerFlavor.VLLM
    api_key_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. a gateway route header

    def __post_init__(self) -> None:
        object.__setattr__(self, "flavor", ServerFlavor(self.flavor))
        object.__setattr__(self, "base_url", self.base_url.rstrip("/").removesuffix("/v1"))

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointError(f"environment variable {self.api_key_env} (API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def __repr__(self) -> str:  # never show header values (they may carry keys)
        return f"Endpoint({self.base_url!r}, model={self.model!r}, flavor={self.flavor.value})"


@dataclass(frozen=True)
class ClientSettings:
    """HTTP behaviour of the evaluator."""

    concurrency: int = 4  # requests in flight per side
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    max_retries: int = 2  # extra attempts for requests that cannot have been served
    retry_backoff_s: float = 0.2  # doubled per attempt
    retry_statuses: tuple[int, ...] = (429,)  # 5xx are answers of the server: counted, not retried
    top_k: int = 20  # logprobs per position (vLLM's default --max-logprobs is 20)
    kl_top_k: int = 20  # k of the truncated KL (≤ top_k)
    max_tokens: int = 32  # greedy generation length
    # Sent with every call of one held-out request (the prompt's digest): a gateway keys its split
    # and fault injection on it, so both calls of a request take the same path.
    route_key_header: str | None = "X-Fp4roll-Route-Key"

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0 or self.max_tokens < 1:
            raise ValueError("concurrency and max_tokens must be >= 1, max_retries >= 0")
        if not 1 <= self.kl_top_k <= self.top_k:
            raise ValueError(f"kl_top_k must lie in [1, top_k={self.top_k}]")


@dataclass(frozen=True)
class PositionLogprobs:
    """One scored token: the server's top-k (key → logprob) and the actual token's logprob."""

    top: Mapping[str, float]
    actual: float


# --------------------------------------------------------------------------------------- metrics


def topk_tail_kl(base_top: Mapping[str, float], cand_top: Mapping[str, float], k: int) -> float:
    """KL(P‖Q) over the baseline's top-``k`` tokens plus one tail bucket holding the rest.

    A baseline token missing from the candidate's list gets the smallest probability the candidate
    listed (the most it can have: an upper bound on q, so this never overstates the KL); each tail
    is what its side's listed tokens leave. Zero when both lists are equal.
    """
    if not base_top or not cand_top:
        raise EndpointError("empty top-logprob list: cannot compute KL")
    top = sorted(base_top.items(), key=lambda kv: kv[1], reverse=True)[:k]
    floor = min(cand_top.values())
    p = np.array([math.exp(lp) for _, lp in top])
    q = np.array([math.exp(cand_top.get(tok, floor)) for tok, _ in top])
    p_tail = max(1.0 - p.sum(), 1e-12)
    q_tail = max(1.0 - q.sum(), 1e-12)
    kl = float(np.sum(p * (np.log(p) - np.log(q)))) + p_tail * (math.log(p_tail) - math.log(q_tail))
    return max(kl, 0.0)


def top1(top: Mapping[str, float]) -> str:
    return max(top.items(), key=lambda kv: kv[1])[0]


@dataclass(frozen=True)
class ScoredResponse:
    """Per-position comparison of the two sides on the same response tokens."""

    kl: np.ndarray  # float64 [n]
    agree: np.ndarray  # bool [n]
    nll_baseline: np.ndarray  # float64 [n]
    nll_candidate: np.ndarray


def compare_positions(
    base: Sequence[PositionLogprobs], cand: Sequence[PositionLogprobs], k: int
) -> ScoredResponse:
    if len(base) != len(cand):
        raise EndpointError(f"baseline scored {len(base)} response tokens, candidate {len(cand)}")
    kl = np.array([topk_tail_kl(b.top, c.top, k) for b, c in zip(base, cand, strict=True)])
    agree = np.array([top1(b.top) == top1(c.top) for b, c in zip(base, cand, strict=True)])
    return ScoredResponse(
        kl=kl,
        agree=agree,
        nll_baseline=np.array([-b.actual for b in base], dtype=np.float64),
        nll_candidate=np.array([-c.actual for c in cand], dtype=np.float64),
    )


# --------------------------------------------------------------------------------------- parsing


def parse_vllm_prompt_logprobs(
    body: Mapping[str, Any], n_response: int, k: int
) -> list[PositionLogprobs]:
    """The last ``n_response`` prompt positions of a vLLM ``prompt_logprobs`` completion answer.

    Entry i maps token id (a JSON string) → ``{logprob, rank, decoded_token}``: the top-``k`` by
    rank (1-based) plus the actual token i, whose rank may lie beyond ``k`` (then it is kept out of
    the top-k and only gives the NLL)."""
    choice = body["choices"][0]
    entries = choice.get("prompt_logprobs")
    if entries is None:
        entries = body.get("prompt_logprobs")  # chat answers carry it at the top level
    token_ids = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
    if entries is None or token_ids is None:
        raise EndpointError("vLLM answer without prompt_logprobs / prompt_token_ids")
    if not 0 < n_response < len(entries):
        raise EndpointError(f"{n_response} response tokens in a {len(entries)}-token prompt")
    positions = []
    for index in range(len(entries) - n_response, len(entries)):
        entry = entries[index]
        actual_key = str(token_ids[index])
        if not entry or actual_key not in entry:
            raise EndpointError(f"prompt_logprobs entry {index} lacks the actual token")
        top = {key: float(v["logprob"]) for key, v in entry.items() if int(v["rank"]) <= k}
        if not top:
            raise EndpointError(f"prompt_logprobs entry {index} has no top-{k} tokens")
        positions.append(PositionLogprobs(top=top, actual=float(entry[actual_key]["logprob"])))
    return positions


def parse_llamacpp_echo(
    body: Mapping[str, Any], n_response: int, k: int | None = None
) -> list[PositionLogprobs]:
    """The response positions of a llama.cpp ``echo`` + ``logprobs`` answer: the last
    ``n_response`` echoed entries before the generated ones (``usage.completion_tokens``), since its
    ``text_offset`` skips BOS and renders special tokens empty. The server adds the actual token to
    each ``top_logprobs`` entry; with ``k`` given, an entry holding ``k + 1`` keys loses the actual
    token's (it lies beyond the top-k and only gives the NLL)."""
    choice = body["choices"][0]
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens")
    token_logprobs = logprobs.get("token_logprobs")
    tops = logprobs.get("top_logprobs")
    if tokens is None or token_logprobs is None or tops is None:
        raise EndpointError("llama.cpp echo answer without logprobs")
    generated = int((body.get("usage") or {}).get("completion_tokens") or 0)
    end = len(tokens) - generated
    start = end - n_response
    if start < 1:  # entry 0 never has a logprob
        raise EndpointError(f"{n_response} response tokens in a {end}-token echo")
    positions = []
    for index in range(start, end):
        top, actual = tops[index], token_logprobs[index]
        if not top or actual is None:
            raise EndpointError(f"echo entry {index} has no logprobs")
        listed = {key: float(value) for key, value in top.items()}
        if k is not None and len(listed) > k:
            listed.pop(tokens[index], None)
        positions.append(PositionLogprobs(top=listed, actual=float(actual)))
    return positions


# --------------------------------------------------------------------------------------- client


@dataclass
class _Attempts:
    count: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    ttft_s: float
    total_s: float
    output_tokens: int

    @property
    def tpot_s(self) -> float:
        """Seconds per output token after the first (NaN with fewer than two tokens)."""
        if self.output_tokens < 2:
            return math.nan
        return (self.total_s - self.ttft_s) / (self.output_tokens - 1)


class EndpointClient:
    """Async calls to one endpoint, bounded by a semaphore, with bounded retries."""

    def __init__(
        self,
        endpoint: Endpoint,
        settings: ClientSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        timeout = httpx.Timeout(
            settings.read_timeout_s, connect=settings.connect_timeout_s, pool=None
        )
        self._client = httpx.AsyncClient(
            base_url=endpoint.base_url,
            timeout=timeout,
            transport=transport,
            headers=endpoint.request_headers(),
        )

    def _key(self, key: str | None) -> dict[str, str]:
        header = self.settings.route_key_header
        return {header: key} if header and key else {}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _with_retries(self, attempts: _Attempts, call: Callable[[], Any]) -> Any:
        delay = self.settings.retry_backoff_s
        for attempt in range(self.settings.max_retries + 1):
            attempts.count += 1
            try:
                async with self._semaphore:
                    return await call()
            except httpx.ConnectError as exc:  # never reached the server
                error: Exception = exc
            except _RetryableStatus as exc:
                error = exc
            if attempt < self.settings.max_retries:
                await asyncio.sleep(delay)
                delay *= 2
        raise EndpointError(_describe(error)) from error

    def _check(self, response: httpx.Response) -> None:
        if response.status_code in self.settings.retry_statuses:
            raise _RetryableStatus(response.status_code, _error_message(response))
        if response.status_code != 200:
            raise EndpointError(f"HTTP {response.status_code}: {_error_message(response)}")

    async def post_json(
        self, path: str, body: Mapping[str, Any], attempts: _Attempts, key: str | None = None
    ) -> dict:
        async def call() -> dict:
            response = await self._client.post(path, json=dict(body), headers=self._key(key))
            self._check(response)
            try:
                return response.json()
            except ValueError as exc:
                raise EndpointError(f"{path}: answer is not JSON") from exc

        return await self._with_retries(attempts, call)

    async def generate(
        self, prompt: str, attempts: _Attempts, key: str | None = None
    ) -> Generation:
        """Streamed greedy completion: text, TTFT, end-to-end seconds, output tokens."""
        body = {
            "model": self.endpoint.model,
            "prompt": prompt,
            "max_tokens": self.settings.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

        async def call() -> Generation:
            start = time.perf_counter()
            first = None
            pieces: list[str] = []
            chunks = 0
            usage_tokens = None
            async with self._client.stream(
                "POST", "/v1/completions", json=body, headers=self._key(key)
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._check(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                    except ValueError as exc:
                        raise EndpointError("stream event is not JSON") from exc
                    if "error" in event:  # an engine error after the 200 status (vLLM)
                        message = event["error"].get("message", "stream error")
                        raise EndpointError(f"stream error: {str(message)[:200]}")
                    if event.get("usage") and not event.get("choices"):
                        usage_tokens = event["usage"].get("completion_tokens")
                        continue
                    for choice in event.get("choices") or []:
                        text = choice.get("text") or ""
                        if text and first is None:
                            first = time.perf_counter() - start
                        if text:
                            chunks += 1
                        pieces.append(text)
            total = time.perf_counter() - start
            tokens = int(usage_tokens) if usage_tokens is not None else chunks
            return Generation("".join(pieces), first if first is not None else total, total, tokens)

        return await self._with_retries(attempts, call)

    async def count_tokens(self, text: str, attempts: _Attempts, key: str | None = None) -> int:
        if self.endpoint.flavor is ServerFlavor.LLAMACPP:
            body = await self.post_json("/extras/tokenize/count", {"input": text}, attempts, key)
            return int(body["count"])
        body = await self.post_json(
            "/tokenize",
            {"model": self.endpoint.model, "prompt": text, "add_special_tokens": False},
            attempts,
            key,
        )
        return int(body["count"])

    async def score(
        self, text: str, n_response: int, attempts: _Attempts, key: str | None = None
    ) -> list[PositionLogprobs]:
        """Teacher-forced log-probabilities of the last ``n_response`` tokens of ``text``."""
        k = self.settings.top_k
        if self.endpoint.flavor is ServerFlavor.LLAMACPP:
            body = {
                "model": self.endpoint.model,
                "prompt": text,
                "echo": True,
                "logprobs": k,
                "max_tokens": 1,  # 0 means unlimited on llama.cpp
                "temperature": 0,
            }
            answer = await self.post_json("/v1/completions", body, attempts, key)
            return parse_llamacpp_echo(answer, n_response, k)
        body = {
            "model": self.endpoint.model,
            "prompt": text,
            "prompt_logprobs": k,
            "max_tokens": 1,
            "temperature": 0,
            "return_token_ids": True,
        }
        answer = await self.post_json("/v1/completions", body, attempts, key)
        return parse_vllm_prompt_logprobs(answer, n_response, k)


class _RetryableStatus(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))[:200]
        if "detail" in body:
            return str(body["detail"])[:200]
    return str(body)[:200]


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)


# --------------------------------------------------------------------------------------- evaluator


@dataclass(frozen=True)
class CanaryRequest:
    """One held-out request as the endpoint evaluator sends it: the rendered prompt text, its route,
    and the logged response when the log kept one (teacher forcing scores that; else the baseline's
    greedy answer stands in)."""

    text: str
    route: str | None = None
    logged_response: str | None = None


def _prompt_text(prompt: Prompt | RenderedPrompt | CanaryRequest, render: Callable | None) -> str:
    if isinstance(prompt, CanaryRequest):
        return prompt.text
    if isinstance(prompt, RenderedPrompt):
        return prompt.text
    if isinstance(prompt, str):
        return prompt
    if render is None:
        raise EndpointError("chat messages need render= (the served model's chat template)")
    return render(prompt)


@dataclass(frozen=True)
class EndpointEvaluator:
    """:class:`~calibration.evaluate.CanaryEvaluator` against two live endpoints (module docstring).

    ``render``: chat messages → the text the server sees (the served model's chat template); plain
    strings, :class:`RenderedPrompt` and :class:`CanaryRequest` go as they are. ``route_families``
    overrides :func:`pipelines.canary.tasks.route_family`. ``transport``: an httpx transport for
    tests (``httpx.MockTransport``); None = the network.
    """

    baseline: Endpoint
    candidate: Endpoint
    settings: ClientSettings = field(default_factory=ClientSettings)
    render: Callable[[Any], str] | None = None
    route_families: Mapping[str, Any] | None = None
    transport_baseline: httpx.AsyncBaseTransport | None = None
    transport_candidate: httpx.AsyncBaseTransport | None = None

    def __call__(
        self,
        prompts: Sequence[Prompt | RenderedPrompt | CanaryRequest],
        *,
        request_indices: Sequence[int] | None = None,
        routes: Sequence[str | None] | None = None,
    ) -> ReplayResult:
        if not prompts:
            raise EndpointError("no prompts to send")
        indices = list(range(len(prompts)) if request_indices is None else request_indices)
        if len(indices) != len(prompts):
            raise EndpointError(f"{len(indices)} request indices for {len(prompts)} prompts")
        if routes is not None and len(routes) != len(prompts):
            raise EndpointError(f"{len(routes)} routes for {len(prompts)} prompts")
        from calibration.evaluate import ReplayResult

        records = asyncio.run(self._run(prompts, indices, routes))
        result = ReplayResult(
            records=tuple(records),
            baseline_name=f"{self.baseline.base_url} ({self.baseline.model})",
            candidate_name=f"{self.candidate.base_url} ({self.candidate.model})",
            seed=0,
            max_len=self.settings.max_tokens,
            batch_size=self.settings.concurrency,
            metadata={
                "evaluator": "endpoints",
                "flavor": self.baseline.flavor.value,
                "top_k": self.settings.top_k,
                "kl_top_k": self.settings.kl_top_k,
                "max_tokens": self.settings.max_tokens,
                "attempts": sum(r.attempts for r in records),
            },
        )
        if result.num_errors:
            logger.warning("%d of %d requests failed", result.num_errors, len(records))
        return result

    async def _run(self, prompts, indices, routes) -> list[ReplayRecord]:
        base = EndpointClient(self.baseline, self.settings, self.transport_baseline)
        cand = EndpointClient(self.candidate, self.settings, self.transport_candidate)
        try:
            tasks = [
                self._one(
                    base,
                    cand,
                    index,
                    prompt,
                    routes[i] if routes is not None else getattr(prompt, "route", None),
                )
                for i, (index, prompt) in enumerate(zip(indices, prompts, strict=True))
            ]
            return list(await asyncio.gather(*tasks))
        finally:
            await base.aclose()
            await cand.aclose()

    async def _one(
        self, base: EndpointClient, cand: EndpointClient, index: int, prompt, route
    ) -> ReplayRecord:
        from calibration.evaluate import ReplayRecord, failed_record
        from pipelines.canary.tasks import route_family, task_metrics

        text = _prompt_text(prompt, self.render)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        logged = getattr(prompt, "logged_response", None)
        key = digest[:32]
        base_attempts, cand_attempts = _Attempts(), _Attempts()
        nan = math.nan

        def failed(side: str, message: str, n_tokens: int = 0) -> ReplayRecord:
            return failed_record(
                index,
                digest,
                n_tokens,
                message,
                failed_side=side,
                route=route,
                attempts=base_attempts.count + cand_attempts.count,
            )

        base_gen, cand_gen = await asyncio.gather(
            base.generate(text, base_attempts, key),
            cand.generate(text, cand_attempts, key),
            return_exceptions=True,
        )
        errors = {
            name: value
            for name, value in (("baseline", base_gen), ("candidate", cand_gen))
            if isinstance(value, BaseException)
        }
        if errors:
            return failed(_sides(errors), _messages(errors))
        reference = logged if logged is not None else base_gen.text
        n_response = 0
        scored = None
        if reference:
            full = text + reference
            try:
                n_full = await base.count_tokens(full, base_attempts, key)
                n_response = n_full - await base.count_tokens(text, base_attempts, key)
            except Exception as exc:  # noqa: BLE001 - a failed request is a record, not a crash
                return failed("baseline", _message(exc))
            if n_response > 0:
                base_lp, cand_lp = await asyncio.gather(
                    base.score(full, n_response, base_attempts, key),
                    cand.score(full, n_response, cand_attempts, key),
                    return_exceptions=True,
                )
                errors = {
                    name: value
                    for name, value in (("baseline", base_lp), ("candidate", cand_lp))
                    if isinstance(value, BaseException)
                }
                if errors:
                    return failed(_sides(errors), _messages(errors), n_response)
                try:
                    scored = compare_positions(base_lp, cand_lp, self.settings.kl_top_k)
                except EndpointError as exc:
                    return failed("both", str(exc), n_response)
        family = route_family(route, self.route_families)
        return ReplayRecord(
            request_index=index,
            prompt_digest=digest,
            num_tokens=n_response,
            latency_baseline_s=base_gen.total_s,
            latency_candidate_s=cand_gen.total_s,
            kl_mean=float(scored.kl.mean()) if scored is not None else nan,
            kl_p99=float(np.quantile(scored.kl, 0.99)) if scored is not None else nan,
            top1_agreement=float(scored.agree.mean()) if scored is not None else nan,
            nll_baseline=float(scored.nll_baseline.mean()) if scored is not None else nan,
            nll_candidate=float(scored.nll_candidate.mean()) if scored is not None else nan,
            outlier_fallback_rate_baseline=nan,  # not exposed by the servers
            outlier_fallback_rate_candidate=nan,
            route=route,
            ttft_baseline_s=base_gen.ttft_s,
            ttft_candidate_s=cand_gen.ttft_s,
            tpot_baseline_s=base_gen.tpot_s,
            tpot_candidate_s=cand_gen.tpot_s,
            attempts=base_attempts.count + cand_attempts.count,
            task=task_metrics(family, base_gen.text, cand_gen.text),
        )


def _message(exc: BaseException) -> str:
    if isinstance(exc, EndpointError):
        return str(exc)
    return _describe(exc) if isinstance(exc, Exception) else type(exc).__name__


def _sides(errors: Mapping[str, BaseException]) -> str:
    return "both" if len(errors) == 2 else next(iter(errors))


def _messages(errors: Mapping[str, BaseException]) -> str:
    return "; ".join(f"{name}: {_message(exc)}" for name, exc in errors.items())
