"""Sampling a calibration set from a large prompt store: wall time and peak RSS.

    OMP_NUM_THREADS=1 python -m benchmarks.sampling --prompts 1000000 --workdir /tmp/fp4roll-sampling

Phase 1 (once per workdir) fills a SQLite store with N synthetic prompts over 60 days — chat and
plain, 6 routes, with near-duplicate families (one template, a few words changed) and exact repeats
— and stores each prompt's redaction as ``fp4roll logs import`` would (the steady state: sampling
never redacts the whole store). Phase 2 runs in a FRESH child process, so its peak RSS
(``ru_maxrss``) is the sampling's alone: ``pipelines.prompt_logs.sample`` with the default window
(30 days before the newest prompt), the default reservoir (``calibration.sampling.presample``) and
the default 512 + 64 + 256 roles. ``--max-candidates`` overrides the reservoir (e.g. the whole window,
to see what the bound buys).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = [
    "invoice",
    "refund",
    "shipping",
    "order",
    "account",
    "password",
    "reset",
    "billing",
    "summary",
    "translate",
    "python",
    "error",
    "stack",
    "trace",
    "deploy",
    "kubernetes",
    "latency",
    "budget",
    "quarterly",
    "report",
    "customer",
    "email",
    "draft",
    "meeting",
    "agenda",
    "recipe",
    "travel",
    "flight",
    "hotel",
    "contract",
    "clause",
    "review",
    "bug",
    "feature",
    "request",
    "sql",
    "query",
    "index",
    "cache",
    "memory",
    "leak",
    "thread",
    "lock",
    "timeout",
    "retry",
    "backoff",
    "gradient",
    "tensor",
    "model",
    "quantize",
    "calibrate",
]
ROUTES = ("chat", "support", "code", "extract", "classify", "summarize")


def _prompt(rng: random.Random, family: int) -> str:
    base = random.Random(family)  # one template per family: near duplicates within a family
    words = [base.choice(WORDS) for _ in range(base.randint(12, 120))]
    for _ in range(rng.randint(0, 3)):  # a few words changed
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words) + f" ({family % 97})"


def populate(url: str, n: int, seed: int = 0, batch: int = 20_000) -> None:
    import sqlalchemy as sa

    from calibration.redaction import REDACTOR_VERSION
    from registry import db
    from registry.prompt_logs import content_digest
    from registry.schema import PromptLog

    db.upgrade(url)
    rng = random.Random(seed)
    end = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc)
    engine = db.get_engine(url)
    table = PromptLog.__table__
    seen: set[str] = set()
    started = time.perf_counter()
    rows = []
    for i in range(n):
        route = ROUTES[i % len(ROUTES)]
        text = _prompt(rng, rng.randrange(max(1, n // 4)))
        chat = i % 2 == 0
        messages = [{"role": "user", "content": text}] if chat else None
        digest = content_digest(route, messages, None if chat else text)
        if digest in seen:  # an exact repeat: the store keeps one row (as the importer does)
            continue
        seen.add(digest)
        rows.append(
            {
                "content_digest": digest,
                "received_at": end - dt.timedelta(seconds=rng.uniform(0, 60 * 86400)),
                "route": route,
                "model": "bench",
                "messages": messages,
                "prompt_text": None if chat else text,
                "token_count": len(text.split()),
                "source": "benchmark",
                "source_line": i,
                "imported_at": end,
                "redactor_version": REDACTOR_VERSION,
                "redacted_text": f"user: {text}" if chat else text,
                "redacted_messages": messages,
                "redaction_counts": {},
            }
        )
        if len(rows) >= batch:
            with engine.begin() as conn:
                conn.execute(sa.insert(table), rows)
            rows.clear()
    if rows:
        with engine.begin() as conn:
            conn.execute(sa.insert(table), rows)
    print(
        json.dumps({"populated": len(seen), "seconds": round(time.perf_counter() - started, 1)}),
        flush=True,
    )


def sample_once(url: str, max_candidates: int | None) -> dict:
    import calibration.sampling as sampling
    from calibration.config import SamplingConfig
    from calibration.sampling import plain_renderer
    from pipelines import prompt_logs

    if max_candidates is not None:
        sampling.DEFAULT_MAX_CANDIDATES = max_candidates
    config = SamplingConfig()
    started = time.perf_counter()
    result = prompt_logs.sample(config, plain_renderer, url)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "window_prompts": result.summary.get("presampled_from", result.summary["input_prompts"]),
        "kept_by_reservoir": result.summary["input_prompts"],
        "unique": result.summary["unique_prompts"],
        "near_duplicates_removed": result.summary["near_duplicates_removed"],
        "members": len(result.calibration) + len(result.sensitivity) + len(result.holdout),
        "digest": result.digest[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fp4roll-sampling-bench"))
    parser.add_argument("--max-candidates", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = f"sqlite:///{args.workdir / f'store-{args.prompts}.db'}"
    if args.child:
        print(json.dumps(sample_once(url, args.max_candidates)), flush=True)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / f"store-{args.prompts}.db").exists():
        populate(url, args.prompts)
    command = [
        sys.executable,
        "-m",
        "benchmarks.sampling",
        "--child",
        "--prompts",
        str(args.prompts),
    ]
    command += ["--workdir", str(args.workdir)]
    if args.max_candidates is not None:
        command += ["--max-candidates", str(args.max_candidates)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    print(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
