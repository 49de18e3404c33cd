"""Score NVFP4 checkpoints (fp4roll's or llm-compressor's) against the bf16 model, with fp4roll's loader.

    python benchmarks/peer/evaluate_checkpoints.py --base MODEL_DIR --holdout holdout.jsonl \
        [--max-seq-len 2048] [--json OUT.json] CKPT [CKPT ...]

One evaluator for every candidate: each checkpoint is read by ``calibration.checkpoint.
load_checkpoint`` (W4A4 with its activation fake-quant on, under the stored input global scales)
and scored against the unquantized model on the held-out texts (one ``{"text": ...}`` per line, e.g.
``benchmarks/prompt_split.py``'s ``holdout.jsonl``) with the KL sweep's scorer: mean and p99 token
KL(P_base ‖ P_quant), top-1 agreement and the perplexity ratio over every real token. Both models run
in float32 (the dequantized weights are exact there). A checkpoint the loader refuses is reported with
the loader's message, and the others are still scored. ``peer_run.json`` beside a checkpoint (written by
``llmcompressor_oneshot.py``) adds its recipe, wall time and peak RSS to the table. MB = tensor bytes as
served (:func:`served_bytes`: unquantized tensors counted in bf16).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from calibration.checkpoint import ACTIVATION_HOOKS_ATTR, load_checkpoint
from calibration.models import load_causal_lm, load_tokenizer
from calibration.observers import tokenize_batches
from calibration.precision import Tier
from calibration.sensitivity import Baseline, compute_baseline, score_emulation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prompt_split import read_prompts

logger = logging.getLogger(__name__)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


#: Tensors whose stored dtype is what is served (packed codes, FP8 block scales, FP32 global scales).
_SERVED_AS_STORED = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


def served_bytes(path: Path) -> int:
    """Tensor bytes as served: NVFP4 tensors as stored, every other floating tensor in bf16 (a
    checkpoint written from an fp32 model would otherwise count its embeddings and norms twice)."""
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                piece = fh.get_slice(name)
                dtype = piece.get_dtype()  # safetensors names: F32, BF16, F8_E4M3, U8, ...
                numel = 1
                for dim in piece.get_shape():
                    numel *= dim
                if name.endswith(_SERVED_AS_STORED) or dtype not in ("F32", "F16", "BF16"):
                    total += numel * _DTYPE_BYTES[dtype]
                else:
                    total += numel * 2
    return total


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "U8": 1,
    "I8": 1,
    "I64": 8,
    "I32": 4,
}


def evaluate_checkpoint(path: Path, baseline: Baseline) -> dict[str, Any]:
    """Load ``path`` with fp4roll's loader and score it against ``baseline``; never raises for a
    checkpoint the loader refuses (the row then carries ``error``)."""
    row: dict[str, Any] = {"checkpoint": str(path), "bytes": checkpoint_bytes(path)}
    if not path.is_dir():
        row["error"] = "no such checkpoint folder"
        return row
    row["served_bytes"] = served_bytes(path)
    peer = path / "peer_run.json"
    if peer.is_file():
        run = json.loads(peer.read_text())
        row.update(
            recipe=run["recipe"],
            wall_seconds=run["wall_seconds"],
            oneshot_seconds=run.get("oneshot_seconds"),
            peak_rss_mb=run["peak_rss_mb"],
        )
    started = time.perf_counter()
    try:
        model, _, info = load_checkpoint(path, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a peer checkpoint may fail anywhere; keep scoring the rest
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    hooks = len(getattr(model, ACTIVATION_HOOKS_ATTR, []))
    tiers = sorted({t.value for t in info.tiers.values()})
    row.update(
        scheme="+".join(tiers),
        quantized_layers=len(info.quantized_layers),
        ignored_layers=list(info.ignored_layers),
        activation_hooks=hooks,
        input_global_scales=len(info.input_global_scales),
        weight_global_scale_range=[
            min(info.weight_global_scales.values(), default=None),
            max(info.weight_global_scales.values(), default=None),
        ],
    )
    quantizing = [n for n, t in info.tiers.items() if t.quantizes_activations]
    w4a4 = [n for n, t in info.tiers.items() if t is Tier.NVFP4]
    if hooks != len(quantizing) or len(info.input_global_scales) != len(w4a4):
        row["error"] = (
            f"{len(quantizing)} layers quantize their inputs ({len(w4a4)} W4A4), but {hooks} input "
            f"fake-quant hooks and {len(info.input_global_scales)} input global scales"
        )
        return row
    # the loaded model already computes as the checkpoint serves: score it as it is
    score = score_emulation(model, baseline, [], use_block_cache=False)
    row.update(
        mean_kl=score.mean_kl,
        p99_kl=score.p99_kl,
        top1_agreement=score.top1_agreement,
        perplexity=score.perplexity,
        base_perplexity=score.base_perplexity,
        perplexity_ratio=score.perplexity / score.base_perplexity,
        tokens=score.num_tokens,
        eval_seconds=round(time.perf_counter() - started, 1),
    )
    return row


def _num(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return format(value, fmt) if isinstance(value, int | float) else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'checkpoint':<28} {'scheme':<9} {'mean KL':>8} {'p99 KL':>7} {'top-1':>6} "
        f"{'ppl x':>6} {'MB':>6} {'wall s':>7} {'RSS MB':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        name = row.get("recipe") or Path(row["checkpoint"]).name
        if "error" in row:
            lines.append(f"{name:<28} ERROR {row['error']}")
            continue

        lines.append(
            f"{name:<28} {row['scheme']:<9} {_num(row, 'mean_kl', '8.4f')} {_num(row, 'p99_kl', '7.3f')} "
            f"{_num(row, 'top1_agreement', '6.3f')} {_num(row, 'perplexity_ratio', '6.3f')} "
            f"{row['served_bytes'] / 1e6:6.1f} {_num(row, 'wall_seconds', '7.1f')} {_num(row, 'peak_rss_mb', '7.0f')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--base", required=True, type=Path, help="unquantized model folder")
    parser.add_argument("--holdout", required=True, type=Path, help='JSONL of {"text": ...}')
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--logprob-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds to wait for each checkpoint folder to appear (a oneshot run still writing "
        "it; its folder appears atomically when complete)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    prompts = read_prompts(args.holdout)
    tokenizer = load_tokenizer(args.base)
    batches = tokenize_batches(
        tokenizer, prompts, max_length=args.max_seq_len, batch_size=args.batch_size
    )
    base = load_causal_lm(args.base, dtype="float32").model
    baseline = compute_baseline(
        base, batches, logprob_dtype=getattr(torch, args.logprob_dtype), progress=False
    )
    del base
    logger.info(
        "baseline: %d prompts, %d tokens, perplexity %.3f",
        baseline.num_prompts,
        baseline.num_tokens,
        baseline.perplexity,
    )
    rows = []
    for path in args.checkpoints:
        deadline = time.monotonic() + args.wait
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(min(30.0, args.wait))
        row = evaluate_checkpoint(path, baseline)
        logger.info("%s", json.dumps(row))
        rows.append(row)
    print(format_table(rows))
    if args.json:
        payload = {
            "holdout": str(args.holdout),
            "max_seq_len": args.max_seq_len,
            "num_prompts": baseline.num_prompts,
            "num_tokens": baseline.num_tokens,
            "base_perplexity": baseline.perplexity,
            "rows": rows,
        }
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)
    return 0 if all("error" not in r and math.isfinite(r.get("mean_kl", 0)) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
