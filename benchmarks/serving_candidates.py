"""Differently quantized SmolLM2 GGUFs served by llama.cpp, scored against the packaged Q4_1 server.

    .venv/bin/python benchmarks/serving_candidates.py [--prompts 30] [--types Q8_0 Q2_K] [--k 5 10]

What the canary's endpoint evaluator will do, measured on real servers:

1. make each candidate GGUF from the packaged Q4_1 file with ``llama_model_quantize`` (requantizing a
   4-bit source compounds: the source's error stays, the target's is added);
2. baseline greedy generation (temperature 0) on prompts from the shipped logs = the "logged response";
3. teacher-forced prompt log-probabilities of prompt + logged response on both servers
   (``/v1/completions`` with ``echo: true, logprobs: K, max_tokens: 1``), response tokens only:
   top-1 agreement, top-k KL with a tail bucket (k ≤ K), NLL;
4. the same KL over the full vocabulary, in process (llama.cpp's Python API, ``logits_all``), to see
   what the top-k truncation loses, and to check that the server's echo logprobs are aligned;
5. candidate greedy generation: exact-match rate against the baseline's;
6. time per request (echo scoring, generation, time to first token when streaming).

Timings are wall clock on a shared 2-core machine: indicative.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

from calibration.data import SAMPLE_PROMPT_LOGS
from calibration.models import smollm2_gguf_path
from pipelines.canary.endpoints import top1, topk_tail_kl
from pipelines.canary.llamacpp import (
    LlamaServer,
    gguf_chat_template,
    quantize_gguf,
    render_chat_template,
)

GEN_TOKENS = 24
TOP_K_REQUEST = 20  # vLLM's default --max-logprobs is 20 as well


# --------------------------------------------------------------------------------------- prompts


def pick_prompts(count: int, max_chars: int) -> list[dict]:
    """``count`` logged chat requests, round-robin over routes, user content cut to ``max_chars``."""
    by_route: dict[str, list[dict]] = defaultdict(list)
    with gzip.open(SAMPLE_PROMPT_LOGS, "rt") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record.get("messages")
            if not messages:
                continue
            route = record.get("metadata", {}).get("route", "?")
            cut = [{**m, "content": m["content"][:max_chars]} for m in messages]
            by_route[route].append({"route": route, "messages": cut})
    picked: list[dict] = []
    routes = sorted(by_route)
    index = 0
    while len(picked) < count:
        route = routes[index % len(routes)]
        bucket = by_route[route]
        picked.append(bucket[(index // len(routes)) * 7 % len(bucket)])
        index += 1
    return picked


# --------------------------------------------------------------------------------------- metrics


def response_positions(choice: dict, usage: dict, n_response_tokens: int) -> list[int]:
    """Indices of the logged response's tokens in an echo+logprobs answer of llama.cpp's server.

    Its ``text_offset`` counts characters of the text with special tokens rendered empty, so it
    cannot be compared with the prompt's length; and it skips every token equal to BOS (SmolLM2's
    BOS is ``<|im_start|>``). The response holds neither, so it is the last ``n_response_tokens``
    entries before the generated ones (``usage.completion_tokens``: 0 when EOS came first).
    """
    end = len(choice["logprobs"]["tokens"]) - usage["completion_tokens"]
    return list(range(end - n_response_tokens, end))


def count_tokens(client: httpx.Client, server: LlamaServer, text: str) -> int:
    response = client.post(f"{server.url}/extras/tokenize/count", json={"input": text})
    response.raise_for_status()
    return response.json()["count"]


# --------------------------------------------------------------------------------------- requests


def echo_score(client: httpx.Client, server: LlamaServer, text: str) -> tuple[dict, float]:
    """(response JSON, seconds) of a teacher-forcing request."""
    start = time.perf_counter()
    response = client.post(
        f"{server.url}/v1/completions",
        json={
            "model": server.alias,
            "prompt": text,
            "echo": True,
            "logprobs": TOP_K_REQUEST,
            "max_tokens": 1,
            "temperature": 0,
        },
    )
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return response.json(), elapsed


def greedy(client: httpx.Client, server: LlamaServer, prompt: str) -> tuple[str, float, float]:
    """(text, time to first token, end to end) of a streamed temperature-0 generation."""
    start = time.perf_counter()
    first = None
    pieces = []
    body = {
        "model": server.alias,
        "prompt": prompt,
        "max_tokens": GEN_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            text = chunk["choices"][0]["text"]
            if text and first is None:
                first = time.perf_counter() - start
            pieces.append(text)
    total = time.perf_counter() - start
    return "".join(pieces), (first if first is not None else total), total


# --------------------------------------------------------------------------------------- in process


class FullVocab:
    """Full-vocabulary log-probabilities of a token sequence through llama.cpp's Python API."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path), logits_all=True, n_ctx=2048, n_threads=1, verbose=False
        )

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """[T, V]: row t is the distribution predicting token t + 1."""
        self.llm.reset()
        self.llm.eval(tokens)
        scores = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)
        scores -= scores.max(axis=-1, keepdims=True)
        return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))

    def close(self) -> None:
        self.llm.close()


def full_kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


# --------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--max-chars", type=int, default=600, help="cut each message's content")
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q2_K"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 5, 10, 20])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-aa", action="store_true", help="skip the A/A (same GGUF) candidate")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    source = smollm2_gguf_path()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fp4roll-candidates-"))
    workdir.mkdir(parents=True, exist_ok=True)
    template = gguf_chat_template(source)
    prompts = pick_prompts(args.prompts, args.max_chars)
    texts = [render_chat_template(template, p["messages"]) for p in prompts]

    candidates = {} if args.no_aa else {"Q4_1 (A/A)": source}
    results: dict = {"quantize_seconds": {}, "candidates": {}}
    for type_name in args.types:
        target = workdir / f"smollm2-{type_name}.gguf"
        if not target.exists():
            seconds = quantize_gguf(source, target, type_name, verbose=True)
            results["quantize_seconds"][type_name] = seconds
            print(f"quantized {type_name}: {seconds:.1f} s, {target.stat().st_size / 1e6:.1f} MB")
        candidates[type_name] = target

    with LlamaServer(source, alias="baseline") as base, httpx.Client(timeout=600) as client:
        print(f"baseline server up on {base.url}")
        logged, base_gen_times, base_ttft = [], [], []
        for text in texts:
            out, ttft, total = greedy(client, base, text)
            logged.append(out)
            base_gen_times.append(total)
            base_ttft.append(ttft)
        base_scores, base_echo_times = [], []
        for text, out in zip(texts, logged, strict=True):
            lp, seconds = echo_score(client, base, text + out)
            base_scores.append(lp)
            base_echo_times.append(seconds)
        results["baseline"] = {
            "generate_median_s": statistics.median(base_gen_times),
            "ttft_median_s": statistics.median(base_ttft),
            "echo_median_s": statistics.median(base_echo_times),
            "prompt_chars_median": statistics.median(len(t) for t in texts),
        }
        base_full = FullVocab(source)
        for name, path in candidates.items():
            per_k_kl: dict[int, list[float]] = {k: [] for k in args.k}
            agree, nll_b, nll_c, full, aligned = [], [], [], [], []
            exact, echo_times, gen_times, ttfts = [], [], [], []
            spelling_mismatches = 0
            prefix: list[float] = []
            cand_full = FullVocab(path)
            with LlamaServer(path, alias=name.split()[0]) as cand:
                for text, out, base_json in zip(texts, logged, base_scores, strict=True):
                    cand_json, seconds = echo_score(client, cand, text + out)
                    echo_times.append(seconds)
                    n_resp = count_tokens(client, cand, text + out) - count_tokens(
                        client, cand, text
                    )
                    base_lp = base_json["choices"][0]["logprobs"]
                    cand_lp = cand_json["choices"][0]["logprobs"]
                    positions = response_positions(
                        base_json["choices"][0], base_json["usage"], n_resp
                    )
                    cand_pos = response_positions(
                        cand_json["choices"][0], cand_json["usage"], n_resp
                    )
                    if "".join(base_lp["tokens"][i] for i in positions) != out:
                        spelling_mismatches += 1  # partial UTF-8 tokens decode lossily
                    if [cand_lp["tokens"][i] for i in cand_pos] != [
                        base_lp["tokens"][i] for i in positions
                    ]:
                        raise RuntimeError("baseline and candidate echoed different tokens")
                    for i, j in zip(positions, cand_pos, strict=True):
                        bt, ct = base_lp["top_logprobs"][i], cand_lp["top_logprobs"][j]
                        agree.append(top1(bt) == top1(ct))
                        for k in args.k:
                            per_k_kl[k].append(topk_tail_kl(bt, ct, k))
                        nll_b.append(-base_lp["token_logprobs"][i])
                        nll_c.append(-cand_lp["token_logprobs"][j])
                    # Full vocabulary, in process: response tokens of prompt + logged response.
                    tokens = base_full.tokenize(text + out)
                    n_prompt = len(base_full.tokenize(text))
                    log_p = base_full.logprobs(tokens)
                    log_q = cand_full.logprobs(tokens)
                    rows = slice(n_prompt - 1, len(tokens) - 1)  # rows predicting response tokens
                    full.extend(full_kl(log_p[rows], log_q[rows]).tolist())
                    # Alignment check: server echo logprob of each response token vs in process.
                    in_process = [log_p[t - 1, tokens[t]] for t in range(n_prompt, len(tokens))]
                    served = [base_lp["token_logprobs"][i] for i in positions]
                    if not out:
                        continue
                    if len(served) == len(in_process):
                        aligned.append(float(np.max(np.abs(np.array(served) - in_process))))
                    out_c, ttft, total = greedy(client, cand, text)
                    exact.append(out_c == out)
                    same = os.path.commonprefix([out_c, out])
                    prefix.append(len(same) / max(len(out), 1))
                    gen_times.append(total)
                    ttfts.append(ttft)
            cand_full.close()
            row = {
                "positions": len(agree),
                "top1_agreement": float(np.mean(agree)),
                **{f"kl_top{k}_tail_mean": float(np.mean(v)) for k, v in per_k_kl.items()},
                **{f"kl_top{k}_tail_p99": float(np.quantile(v, 0.99)) for k, v in per_k_kl.items()},
                "kl_full_mean": float(np.mean(full)),
                "kl_full_p99": float(np.quantile(full, 0.99)),
                "nll_baseline_mean": float(np.mean(nll_b)),
                "nll_candidate_mean": float(np.mean(nll_c)),
                "greedy_exact_match": float(np.mean(exact)),
                "greedy_common_prefix_ratio": float(np.mean(prefix)),
                "echo_median_s": statistics.median(echo_times),
                "generate_median_s": statistics.median(gen_times),
                "ttft_median_s": statistics.median(ttfts),
                "echo_vs_in_process_max_abs_logprob_diff": max(aligned) if aligned else None,
                "alignment_checked_prompts": len(aligned),
                "size_mb": path.stat().st_size / 1e6,
                "response_spelling_mismatches": spelling_mismatches,
            }
            results["candidates"][name] = row
            print(name, json.dumps(row, indent=1))
        base_full.close()

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
