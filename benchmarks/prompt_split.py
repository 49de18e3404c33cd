"""A deterministic calibration / held-out split of logged prompts, rendered as a model's server sees them.

    python benchmarks/prompt_split.py --model DIR --out DIR [--logs FILE] [--calibration 128]
        [--holdout 64] [--seed 0]

Writes ``calibration.jsonl`` and ``holdout.jsonl`` (one ``{"text": ..., "templated": ..., "route": ...}``
per line: the rendered text, and whether it came out of the chat template, which decides whether the
tokenizer adds special tokens, ``calibration.prompts.encode_prompt``) and ``split.json`` (sizes, digests,
token lengths under the model's tokenizer). Every quality benchmark (fp4roll's candidates and the
llm-compressor peer) reads the same two files, so both sides calibrate and are judged on identical
prompts.

The selection is the project's own sampler (``calibration.sampling.sample_calibration_set``: redaction,
exact and near-duplicate removal, stratification by route and length, disjoint hold-out, seeded
SHA-256 ranking) with the project's one prompt renderer (``calibration.prompts.PromptRenderer``: chat
requests through the tokenizer's chat template with the generation prompt, plain prompts as they are),
fed straight from the log file instead of the store. A sensitivity slice (fp4roll's scoring prompts) is drawn only when asked for. A line that cannot be
parsed is reported with file:line and skipped; it never stops the split.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.atomic import write_json, write_text
from calibration.config import SamplingConfig
from calibration.data import SAMPLE_PROMPT_LOGS
from calibration.prompts import PromptRenderer, RenderedPrompt, encode_prompt
from calibration.sampling import PromptRecord, SampledPrompt, sample_calibration_set
from registry.prompt_logs import PromptShapeError, flatten_prompt, parse_prompt

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.jsonl"
HOLDOUT_FILE = "holdout.jsonl"
SENSITIVITY_FILE = "sensitivity.jsonl"
SPLIT_FILE = "split.json"
#: Sequence lengths whose truncation counts ``split.json`` reports.
REPORTED_LENGTHS = (128, 256, 512, 768, 1024, 2048)
#: No prompt of the shipped logs is this long in SmolLM2 tokens (max 1441): lengths are measured whole.
_LENGTH_LIMIT = 1 << 20


@dataclass(frozen=True)
class PromptSplit:
    """Calibration and held-out prompts (disjoint, redacted, rendered), in the sampler's order."""

    calibration: tuple[SampledPrompt, ...]
    holdout: tuple[SampledPrompt, ...]
    sample_digest: str  # the sampler's digest over the members
    seed: int
    source: str
    bad_lines: tuple[str, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    #: fp4roll's own sensitivity slice (exact checks, plan measurement), disjoint from both others
    sensitivity: tuple[SampledPrompt, ...] = ()


def read_prompt_records(path: str | os.PathLike) -> tuple[list[PromptRecord], list[str]]:
    """Every parseable line of a JSONL (optionally gzip) prompt log as a ``PromptRecord`` (id = line
    number), plus ``file:line: reason`` for each line that is not a prompt."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[PromptRecord] = []
    bad: list[str] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            try:
                parsed = parse_prompt(json.loads(line))
            except (json.JSONDecodeError, PromptShapeError, RecursionError) as exc:
                bad.append(f"{path.name}:{line_no}: {exc}")
                continue
            records.append(
                PromptRecord(
                    id=line_no,
                    received_at=parsed.received_at,
                    route=parsed.route,
                    model=parsed.model,
                    text=flatten_prompt(parsed.messages, parsed.prompt_text),
                    token_count=parsed.token_count,
                    source=path.name,
                    messages=parsed.messages,
                )
            )
    return records, bad


def build_prompt_split(
    tokenizer: Any,
    logs: str | os.PathLike = SAMPLE_PROMPT_LOGS,
    *,
    calibration_size: int = 128,
    holdout_size: int = 64,
    sensitivity_size: int = 0,
    seed: int = 0,
) -> PromptSplit:
    """Sample ``calibration_size`` + ``holdout_size`` disjoint prompts from ``logs`` and render them
    for ``tokenizer`` (see module doc). Same inputs, same split, on any machine."""
    records, bad = read_prompt_records(logs)
    if bad:
        logger.warning("%d line(s) of %s skipped, e.g. %s", len(bad), logs, bad[0])
    config = SamplingConfig(
        calibration_size=calibration_size,
        sensitivity_size=sensitivity_size,
        holdout_size=holdout_size,
        seed=seed,
    )
    sample = sample_calibration_set(records, config, render=PromptRenderer(tokenizer))
    return PromptSplit(
        calibration=sample.calibration,
        holdout=sample.holdout,
        sensitivity=sample.sensitivity,
        sample_digest=sample.digest,
        seed=seed,
        source=Path(logs).name,
        bad_lines=tuple(bad),
        summary=sample.summary,
    )


def token_lengths(tokenizer: Any, prompts: Sequence[RenderedPrompt]) -> list[int]:
    """Token count of each prompt as the project encodes it (``calibration.prompts.encode_prompt``)."""
    return [len(encode_prompt(tokenizer, p, _LENGTH_LIMIT).input_ids) for p in prompts]


def length_report(lengths: Sequence[int]) -> dict[str, Any]:
    values = np.asarray(lengths)
    return {
        "count": int(values.size),
        "tokens": int(values.sum()),
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p90": float(np.quantile(values, 0.9)),
        "max": int(values.max()),
        "truncated_at": {str(n): int((values > n).sum()) for n in REPORTED_LENGTHS},
    }


def _digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()


def write_prompt_split(
    split: PromptSplit, out_dir: str | os.PathLike, tokenizer: Any = None
) -> dict[str, Any]:
    """Write the two JSONL files and ``split.json`` (each atomically); return ``split.json``'s content.
    With ``tokenizer``, ``split.json`` reports token lengths and truncation counts per length."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "source": split.source,
        "seed": split.seed,
        "sample_digest": split.sample_digest,
        "bad_lines": len(split.bad_lines),
        "sampler": {k: split.summary[k] for k in ("input_prompts", "unique_prompts")},
    }
    files = [(CALIBRATION_FILE, split.calibration), (HOLDOUT_FILE, split.holdout)]
    if split.sensitivity:
        files.append((SENSITIVITY_FILE, split.sensitivity))
    for name, members in files:
        prompts = [m.rendered for m in members]
        lines = (
            json.dumps(
                {"text": m.rendered.text, "templated": m.rendered.templated, "route": m.route},
                ensure_ascii=False,
            )
            for m in members
        )
        write_text(out / name, "".join(line + "\n" for line in lines))
        entry: dict[str, Any] = {
            "count": len(prompts),
            "templated": sum(p.templated for p in prompts),
            "text_digest": _digest([p.text for p in prompts]),
        }
        if tokenizer is not None:
            entry["token_lengths"] = length_report(token_lengths(tokenizer, prompts))
        meta[name.removesuffix(".jsonl")] = entry
    write_json(out / SPLIT_FILE, meta)
    return meta


def read_prompts(path: str | os.PathLike) -> list[RenderedPrompt]:
    """The rendered prompts of a split file (``templated`` defaults to false: a plain prompt)."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                obj = json.loads(line)
                prompts.append(RenderedPrompt(obj["text"], bool(obj.get("templated", False))))
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    from calibration.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder whose tokenizer renders")
    parser.add_argument("--out", required=True, help="folder for the split files")
    parser.add_argument("--logs", default=str(SAMPLE_PROMPT_LOGS), help="JSONL(.gz) prompt log")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--sensitivity", type=int, default=0, help="fp4roll's scoring slice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        parser.error(f"{args.model} has no tokenizer")
    split = build_prompt_split(
        tokenizer,
        args.logs,
        calibration_size=args.calibration,
        holdout_size=args.holdout,
        sensitivity_size=args.sensitivity,
        seed=args.seed,
    )
    meta = write_prompt_split(split, args.out, tokenizer)
    json.dump(meta, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
