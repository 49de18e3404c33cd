"""Rank agreement of the one-pass Fisher score with the exact per-group KL sweep, SmolLM2-135M.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python benchmarks/sensitivity_rank.py \
        [--scheme nvfp4a16 nvfp4] [--calibration 64] [--sensitivity 32] [--max-length 256] \
        [--draws 4] [--fisher-prompts calibration sensitivity] [--default-form-only] [--exact-fp8]
        [--out benchmarks/results]

Prompts: the shipped logs split by ``benchmarks/prompt_split.py`` (128 calibration prompts, seed 0,
chat template). The first ``--calibration`` calibration prompts set the activation statistics (W4A4
input scales) and feed the Fisher pass; the next ``--sensitivity`` ones (disjoint) are the sensitivity
prompts of the exact sweep (:func:`calibration.sensitivity.sweep_groups`, block-input cache). The
Fisher pass is also run on the sweep's own prompts, which separates the estimator's error from the
difference between the two prompt sets.

Per scheme: Spearman and Kendall rank correlation of every form (:class:`calibration.fisher.FisherForm`)
against the exact mean KL, top-10 overlap, the ratio estimate / exact (median and 10-90 % spread),
wall time of each. The exact sweep is saved as JSON under ``--out`` (``sensitivity_exact_<scheme>.json``,
keyed by a digest of its inputs) and reused by later runs; the figures go to
``sensitivity_rank_<scheme>_d<draws>[_default].json``. Timings are wall clock on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from benchmarks.prompt_split import build_prompt_split
from calibration.atomic import write_json
from calibration.fisher import DEFAULT_FORM, fisher_pass
from calibration.groups import select_targets
from calibration.models import load_causal_lm, prepare_smollm2
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.precision import NVFP4_SCHEMES, Tier
from calibration.sensitivity import blocks_to_cache, compute_baseline, sweep_groups

logger = logging.getLogger("sensitivity_rank")
TOP_K = 10


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_digest(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(hashlib.sha256(f"{p.templated}:{p.text}".encode()).digest())
    return h.hexdigest()[:16]


def agreement(estimate: dict[str, float], exact: dict[str, float]) -> dict[str, float]:
    """Rank and scale agreement of ``estimate`` with ``exact`` over their common groups."""
    names = list(exact)
    e = np.array([estimate[n] for n in names])
    x = np.array([exact[n] for n in names])
    top_e = set(np.argsort(-e)[:TOP_K])
    top_x = set(np.argsort(-x)[:TOP_K])
    ratio = e / x
    return {
        "spearman": float(spearmanr(e, x).statistic),
        "kendall": float(kendalltau(e, x).statistic),
        f"top{TOP_K}_overlap": len(top_e & top_x),
        "ratio_median": float(np.median(ratio)),
        "ratio_p10": float(np.quantile(ratio, 0.1)),
        "ratio_p90": float(np.quantile(ratio, 0.9)),
        "sum_estimate": float(e.sum()),
        "sum_exact": float(x.sum()),
    }


def exact_sweep(model, selection, stats, prompts, tokenizer, tier, args, path: Path) -> dict:
    """The exact sweep, from ``path`` when it holds one with the same inputs."""
    key = {
        "model": "smollm2-135m-instruct fp32",
        "tier": tier.value,
        "prompts": prompt_digest(prompts),
        "num_prompts": len(prompts),
        "max_length": args.max_length,
        "stats_prompts": args.calibration,
    }
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            logger.info("reusing the exact sweep in %s", path)
            return saved
    batches = tokenize_batches(tokenizer, prompts, max_length=args.max_length, batch_size=8)
    started = time.perf_counter()
    baseline = compute_baseline(
        model, batches, cache_blocks=blocks_to_cache(selection.groups), progress=args.progress
    )
    records = sweep_groups(model, baseline, selection.groups, stats, tier, progress=args.progress)
    seconds = time.perf_counter() - started
    result = {
        "key": key,
        "seconds": seconds,
        "num_tokens": baseline.num_tokens,
        "torch_threads": torch.get_num_threads(),
        "mean_kl": {r.group: r.mean_kl for r in records},
        "p99_kl": {r.group: r.p99_kl for r in records},
    }
    del baseline
    write_json(path, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scheme", nargs="+", default=[t.value for t in (Tier.NVFP4A16, Tier.NVFP4)]
    )
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--sensitivity", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-fp8", action="store_true", help="also sweep the FP8 tier exactly")
    parser.add_argument(
        "--fisher-prompts",
        nargs="+",
        default=["calibration", "sensitivity"],
        choices=["calibration", "sensitivity"],
        help="prompt sets the Fisher pass runs on (sensitivity = the exact sweep's own prompts)",
    )
    parser.add_argument(
        "--default-form-only",
        action="store_true",
        help="estimate only the default form (score_tiers' faster diagonal-only pass)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    schemes = [Tier(s) for s in args.scheme]
    if any(s not in NVFP4_SCHEMES for s in schemes):
        parser.error(f"--scheme takes {[t.value for t in NVFP4_SCHEMES]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = load_causal_lm(prepare_smollm2(), dtype="float32")
    selection = select_targets(model)
    split = build_prompt_split(tokenizer, calibration_size=128, holdout_size=64, seed=0)
    prompts = [m.rendered for m in split.calibration]
    calibration = prompts[: args.calibration]
    sensitivity = prompts[args.calibration : args.calibration + args.sensitivity]
    calib_batches = tokenize_batches(
        tokenizer, calibration, max_length=args.max_length, batch_size=8
    )
    sens_batches = tokenize_batches(
        tokenizer, sensitivity, max_length=args.max_length, batch_size=8
    )
    stats = collect_activation_stats(model, calib_batches, selection, progress=False)
    logger.info(
        "%d groups; calibration %d prompts / %d tokens; sensitivity %d prompts / %d tokens",
        len(selection.groups),
        len(calibration),
        sum(b.num_tokens for b in calib_batches),
        len(sensitivity),
        sum(b.num_tokens for b in sens_batches),
    )

    for scheme in schemes:
        tiers = (scheme, Tier.FP8, Tier.BF16)
        report: dict = {
            "scheme": scheme.value,
            "groups": len(selection.groups),
            "max_length": args.max_length,
            "label_draws": args.draws,
            "default_form": DEFAULT_FORM.value,
            "torch_threads": torch.get_num_threads(),
        }
        prompt_sets = {"calibration": calib_batches, "sensitivity": sens_batches}
        runs = {name: prompt_sets[name] for name in args.fisher_prompts}
        fisher = {}
        for name, batches in runs.items():
            started = time.perf_counter()
            result = fisher_pass(
                model,
                batches,
                selection,
                tiers,
                stats.group_input_amax,
                label_draws=args.draws,
                seed=args.seed,
                forms=(DEFAULT_FORM,) if args.default_form_only else None,
                progress=args.progress,
            )
            seconds = time.perf_counter() - started
            fisher[name] = result
            report[f"fisher_{name}"] = {
                "seconds": seconds,
                "num_tokens": result.num_tokens,
                "num_backward": result.num_backward,
                "peak_rss_mb_so_far": peak_rss_mb(),
            }
            logger.info("%s Fisher on %s prompts: %.1f s", scheme.value, name, seconds)

        exact = exact_sweep(
            model,
            selection,
            stats,
            sensitivity,
            tokenizer,
            scheme,
            args,
            out / f"sensitivity_exact_{scheme.value}.json",
        )
        report["exact"] = {
            "seconds": exact["seconds"],
            "num_tokens": exact["num_tokens"],
            "sum_mean_kl": sum(exact["mean_kl"].values()),
        }
        for name, result in fisher.items():
            for form in result.estimates:
                estimate = {g: t[scheme] for g, t in result.estimates[form].items()}
                report[f"agreement_{name}_{form.value}"] = agreement(estimate, exact["mean_kl"])
        if args.exact_fp8:
            exact8 = exact_sweep(
                model,
                selection,
                stats,
                sensitivity,
                tokenizer,
                Tier.FP8,
                args,
                out / "sensitivity_exact_fp8.json",
            )
            report["exact_fp8"] = {"seconds": exact8["seconds"]}
            for name, result in fisher.items():
                estimate = {g: t[Tier.FP8] for g, t in result.estimates[DEFAULT_FORM].items()}
                report[f"agreement_fp8_{name}_{DEFAULT_FORM.value}"] = agreement(
                    estimate, exact8["mean_kl"]
                )
        report["estimates"] = {
            name: {
                form.value: {g: {t.value: v for t, v in by.items()} for g, by in est.items()}
                for form, est in result.estimates.items()
            }
            for name, result in fisher.items()
        }
        report["peak_rss_mb"] = peak_rss_mb()
        suffix = f"_d{args.draws}" + ("_default" if args.default_form_only else "")
        write_json(out / f"sensitivity_rank_{scheme.value}{suffix}.json", report)
        summary = {k: v for k, v in report.items() if k != "estimates"}
        json.dump(summary, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
