"""KL sweep on SmolLM2-135M: block-input cache vs naive (one full forward per group), same run.

    .venv/bin/python benchmarks/kl_sweep.py [--prompts 24] [--max-seq-len 96] [--scheme nvfp4]

Both sweeps score the same groups on the same held-out prompts against the same baseline; the cached
one resumes at each group's decoder block (the exact checks near the runbook floor run this way;
the plan itself is benchmarked by benchmarks/quality.py). Timings are wall clock on this machine.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from calibration.groups import select_targets
from calibration.models import load_causal_lm, prepare_smollm2
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.precision import NVFP4_SCHEMES, Tier
from calibration.sensitivity import (
    blocks_to_cache,
    compute_baseline,
    group_sensitivity,
    score_quantized,
    sweep_groups,
)

_TOPICS = [
    "Explain how a hash map handles collisions",
    "Write a short email declining a meeting invitation",
    "What are the main causes of inflation",
    "Summarize the plot of a heist movie in three sentences",
    "Give me a recipe for a quick vegetable soup",
    "How do I reverse a linked list in Python",
    "What is the difference between TCP and UDP",
    "Translate 'good morning, how are you' into French",
    "List five tips for better sleep",
    "Why do cats purr",
    "Describe the water cycle for a ten year old",
    "Draft a polite reminder about an unpaid invoice",
    "What is a good name for a bakery",
    "How does a transformer language model predict the next word",
    "Write a haiku about autumn rain",
    "What should I pack for a weekend hiking trip",
]


def prompts(count: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation prompts, deterministic."""
    calib = [f"{t}? Please answer briefly." for t in _TOPICS]
    evals = [
        f"User question {i}: {_TOPICS[(i * 7 + 3) % len(_TOPICS)].lower()}, with an example."
        for i in range(count)
    ]
    return calib, evals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="held-out evaluation prompts")
    parser.add_argument("--max-seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--scheme", default=Tier.NVFP4.value, choices=[s.value for s in NVFP4_SCHEMES]
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 = steadier timings)"
    )
    parser.add_argument(
        "--groups", type=int, default=None, help="only the first N groups (quick look)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    scheme = Tier(args.scheme)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    model, tokenizer, _ = load_causal_lm(prepare_smollm2(), dtype="float32")
    selection = select_targets(model)
    groups = selection.groups[: args.groups] if args.groups else selection.groups
    calib_texts, eval_texts = prompts(args.prompts)
    calib = tokenize_batches(
        tokenizer, calib_texts, max_length=args.max_seq_len, batch_size=args.batch_size
    )
    evals = tokenize_batches(
        tokenizer, eval_texts, max_length=args.max_seq_len, batch_size=args.batch_size
    )
    stats = collect_activation_stats(model, calib, selection, progress=False)

    started = time.perf_counter()
    baseline = compute_baseline(model, evals, cache_blocks=blocks_to_cache(groups), progress=False)
    baseline_seconds = time.perf_counter() - started

    # Interleaved per group (order alternating) so load from other processes on a shared machine hits
    # both variants alike; each call is exactly what sweep_groups runs for one group.
    cached_seconds = naive_seconds = 0.0
    cached, naive = [], []
    for index, group in enumerate(track(groups, description="cached vs naive", console=console)):
        for use_cache in (True, False) if index % 2 == 0 else (False, True):
            started = time.perf_counter()
            score = score_quantized(
                model, baseline, [group], stats, scheme, use_block_cache=use_cache
            )
            elapsed = time.perf_counter() - started
            if use_cache:
                cached_seconds += elapsed
                cached.append(group_sensitivity(group, score))
            else:
                naive_seconds += elapsed
                naive.append(group_sensitivity(group, score))
    worst_gap = max(abs(a.mean_kl - b.mean_kl) for a, b in zip(cached, naive, strict=True))
    started = time.perf_counter()
    swept = sweep_groups(model, baseline, groups, stats, scheme, progress=False)
    sweep_seconds = time.perf_counter() - started
    assert [r.mean_kl for r in swept] == [r.mean_kl for r in cached], "sweep_groups disagrees"

    table = Table(title=f"KL sweep, SmolLM2-135M, {scheme.value}, {len(groups)} groups")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("eval prompts / tokens", f"{baseline.num_prompts} / {baseline.num_tokens}")
    table.add_row("baseline pass (incl. block-input capture)", f"{baseline_seconds:.1f} s")
    table.add_row("sweep, block-input cache", f"{cached_seconds:.1f} s")
    table.add_row("sweep, naive (full forward per group)", f"{naive_seconds:.1f} s")
    table.add_row("ratio cached / naive (target <= 0.6)", f"{cached_seconds / naive_seconds:.3f}")
    table.add_row(
        "ratio incl. baseline pass", f"{(cached_seconds + baseline_seconds) / naive_seconds:.3f}"
    )
    table.add_row("max |mean KL cached - naive|", f"{worst_gap:.3g}")
    table.add_row("sweep_groups (cached) run separately", f"{sweep_seconds:.1f} s")
    table.add_row("torch threads", str(torch.get_num_threads()))

    console.print(table)
    worst = sorted(cached, key=lambda r: r.mean_kl, reverse=True)[:8]
    top = Table(title="worst groups (cached sweep)")
    for column in ("group", "mean KL", "p99 KL", "top-1"):
        top.add_column(column)
    for record in worst:
        top.add_row(
            record.group,
            f"{record.mean_kl:.4f}",
            f"{record.p99_kl:.4f}",
            f"{record.top1_agreement:.3f}",
        )
    console.print(top)


if __name__ == "__main__":
    main()
