"""Candidate quality on SmolLM2-135M: fp4roll's roundings and plans beside llm-compressor, one run.

    .venv/bin/python benchmarks/quality.py [--work DIR] [--only NAME ...] [--no-peer]
        [--calibration 128] [--sensitivity 32] [--holdout 64] [--max-seq-len 2048]

1. One prompt split of the shipped logs (``benchmarks/prompt_split.py``): calibration prompts (both
   sides calibrate on exactly these), fp4roll's sensitivity slice, and held-out prompts nobody saw.
2. Every fp4roll variant runs ``calibration.recalibrate.recalibrate`` in its own process (wall time and
   peak RSS of the whole process): W4A16 and W4A4 all-NVFP4 under RTN / MSE / GPTQ / GPTQ+MSE, and
   the default GPTQ+MSE tier plans at +5, +10 and +20 % bytes.
3. llm-compressor's default NVFP4 recipe and its best (GPTQ + ``nvfp4_expanded_mse``) run in their
   own venv (``benchmarks/peer/setup_llmcompressor_venv.sh``; never a dependency of fp4roll) on the
   same calibration prompts, float32, same sequence limit.
4. One evaluator scores every checkpoint on the held-out prompts against the unquantized model
   (``benchmarks/peer/evaluate_checkpoints.py``: mean / p99 token KL, top-1, perplexity ratio,
   served MB), and the table is printed and written to ``DIR/quality.md`` and ``DIR/quality.json``.

A finished checkpoint folder is reused (delete it to rerun that variant). Run it on a quiet machine:
wall times of both sides are measured in the same run, so their ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Variant:
    name: str
    scheme: str  # nvfp4 (W4A4) or nvfp4a16
    rounding: str
    max_extra_bytes: float  # 0: all-NVFP4 (no plan)


VARIANTS = [
    *(
        Variant(f"{rounding}-{label}", scheme, rounding, 0.0)
        for scheme, label in (("nvfp4a16", "w4a16"), ("nvfp4", "w4a4"))
        for rounding in ("rtn", "mse", "gptq", "gptq-mse")
    ),
    *(
        Variant(f"plan{pct}-{label}", scheme, "gptq-mse", pct / 100)
        for scheme, label in (("nvfp4a16", "w4a16"), ("nvfp4", "w4a4"))
        for pct in (5, 10, 20)
    ),
]
PEER_RECIPES = ["nvfp4a16-default", "gptq-nvfp4a16-mse", "nvfp4-default", "gptq-nvfp4-mse"]
RUN_FILE = "peer_run.json"  # the evaluator reads recipe, wall seconds and peak RSS from it


def _split(args: argparse.Namespace, model_dir: Path, out: Path) -> None:
    if (out / "split.json").is_file():
        return
    from prompt_split import build_prompt_split, write_prompt_split

    from calibration.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    split = build_prompt_split(
        tokenizer,
        calibration_size=args.calibration,
        holdout_size=args.holdout,
        sensitivity_size=args.sensitivity,
    )
    write_prompt_split(split, out, tokenizer)


def run_variant(name: str, model_dir: Path, split: Path, out: Path, max_seq_len: int) -> None:
    """One fp4roll variant, in this process (the parent measures it as a whole)."""
    from prompt_split import read_prompts

    from calibration.config import CalibrationConfig
    from calibration.recalibrate import recalibrate

    variant = next(v for v in VARIANTS if v.name == name)
    config = CalibrationConfig(
        scheme=variant.scheme,
        rounding=variant.rounding,
        max_extra_bytes=variant.max_extra_bytes,
        kl_threshold=None if variant.max_extra_bytes == 0 else 0.05,
        max_prompt_tokens=max_seq_len,
    )
    started = time.perf_counter()
    result = recalibrate(
        model_dir,
        read_prompts(split / "calibration.jsonl"),
        read_prompts(split / "sensitivity.jsonl"),
        "sha256:" + json.loads((split / "split.json").read_text())["sample_digest"],
        out,
        config,
        overwrite=True,
        progress=False,
    )
    run = {
        "recipe": f"fp4roll {name}",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "plan_mean_kl_on_sensitivity": result.plan_mean_kl,
        "extra_bytes_fraction": result.extra_bytes_fraction,
        "tiers": result.tiers,
    }
    (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="variant / recipe names")
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    parser.add_argument(
        "--no-eval", action="store_true", help="build the checkpoints only (score them later)"
    )
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--sensitivity", type=int, default=32)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from calibration.models import SMOLLM2_NAME, fp4roll_home, prepare_smollm2

    home = fp4roll_home()
    work = args.work or home / "bench" / "quality"
    model_dir = prepare_smollm2(home / "models" / SMOLLM2_NAME)
    split = work / "split"
    if args.run_variant:
        run_variant(args.run_variant, model_dir, split, work / args.run_variant, args.max_seq_len)
        return 0

    work.mkdir(parents=True, exist_ok=True)
    _split(args, model_dir, split)
    wanted = set(args.only) if args.only else None
    checkpoints = []
    for variant in VARIANTS:
        if wanted is not None and variant.name not in wanted:
            continue
        out = work / variant.name
        if not (out / RUN_FILE).is_file():
            print(f"fp4roll {variant.name} ...", flush=True)
            _timed([sys.executable, __file__, "--work", str(work), "--run-variant", variant.name,
                    "--max-seq-len", str(args.max_seq_len)])  # fmt: skip
        checkpoints.append(out)
    if not args.no_peer:
        venv = home / "venvs" / "llmcompressor"
        subprocess.run(["bash", str(HERE / "peer" / "setup_llmcompressor_venv.sh"), str(venv)],
                       check=True)  # fmt: skip
        for recipe in PEER_RECIPES:
            if wanted is not None and recipe not in wanted:
                continue
            out = work / f"llmc-{recipe}"
            if not (out / RUN_FILE).is_file():
                print(f"llm-compressor {recipe} ...", flush=True)
                _timed([str(venv / "bin" / "python"), str(HERE / "peer" / "llmcompressor_oneshot.py"),
                        "--model", str(model_dir), "--prompts", str(split / "calibration.jsonl"),
                        "--recipe", recipe, "--dtype", "float32",
                        "--max-seq-len", str(args.max_seq_len), "--out", str(out)])  # fmt: skip
            checkpoints.append(out)
    if args.no_eval:
        return 0
    rows_path = work / "quality.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _timed([sys.executable, str(HERE / "peer" / "evaluate_checkpoints.py"), "--base", str(model_dir),
            "--holdout", str(split / "holdout.jsonl"), "--max-seq-len", str(args.max_seq_len),
            "--json", str(rows_path), *map(str, checkpoints)], env=env)  # fmt: skip
    rows = json.loads(rows_path.read_text())
    table = markdown_table(rows if isinstance(rows, list) else rows["rows"])
    (work / "quality.md").write_text(table + "\n")
    print(table)
    return 0


def markdown_table(rows: list[dict]) -> str:
    """The README's table: one row per checkpoint, fp4roll and llm-compressor alike."""
    base = next((r for r in rows if r.get("recipe", "").endswith("rtn-w4a16")), None)
    lines = [
        "| candidate | mean KL | p99 KL | top-1 | ppl × | MB | vs RTN W4A16 | wall s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = row.get("recipe") or Path(row["checkpoint"]).name
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |||||||| ")
            continue
        ratio = f"{row['mean_kl'] / base['mean_kl']:.2f}" if base and "mean_kl" in base else "-"
        lines.append(
            f"| {name} | {row['mean_kl']:.4f} | {row['p99_kl']:.3f} | {row['top1_agreement']:.3f} "
            f"| {row['perplexity_ratio']:.3f} | {row['served_bytes'] / 1e6:.1f} | {ratio} "
            f"| {row.get('wall_seconds', float('nan')):.0f} | {row.get('peak_rss_mb', float('nan')):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
