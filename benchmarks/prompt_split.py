"""A deterministic calibration / held-out split of logged prompts, rendered as a model's server sees them.

    python benchmarks/prompt_split.py --model DIR --out DIR [--logs FILE] [--calibration 128]
        [--holdout 64] [--seed 0]

Writes ``calibration.jsonl`` and ``holdout.jsonl`` (one ``{"text": ..., "route": ...}`` per line, the
text ready to tokenize) and ``split.json`` (sizes, digests, token lengths under the model's tokenizer).
Every quality benchmark (fp4roll's candidates and the llm-compressor peer) reads the same two files, so
both sides calibrate and are judged on identical prompts.

The selection is the project's own sampler (``calibration.sampling.sample_calibration_set``: redaction,
exact and near-duplicate removal, stratification by route and length, disjoint hold-out, seeded
SHA-256 ranking), fed straight from the log file instead of the store. Chat requests are rendered with
the tokenizer's chat template and the generation prompt (``calibration.evaluate.render_prompt``), each
message redacted first; plain ``prompt`` entries stay as they are (redacted). A line that cannot be
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
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import SAMPLE_PROMPT_LOGS
from calibration.evaluate import render_prompt
from calibration.redaction import redact
from calibration.sampling import PromptRecord, SamplingConfig, sample_calibration_set
from registry.prompt_logs import PromptShapeError, flatten_prompt, parse_prompt

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.jsonl"
HOLDOUT_FILE = "holdout.jsonl"
SPLIT_FILE = "split.json"
#: Sequence lengths whose truncation counts ``split.json`` reports.
REPORTED_LENGTHS = (128, 256, 512, 768, 1024, 2048)


@dataclass(frozen=True)
class RenderedPrompt:
    route: str
    text: str  # redacted, rendered (chat template + generation prompt for chat requests)


@dataclass(frozen=True)
class PromptSplit:
    """Calibration and held-out prompts (disjoint), in the sampler's order."""

    calibration: tuple[RenderedPrompt, ...]
    holdout: tuple[RenderedPrompt, ...]
    sample_digest: str  # the sampler's digest over the (redacted, flattened) members
    seed: int
    source: str
    bad_lines: tuple[str, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)


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


def _render(tokenizer: Any, record: PromptRecord, redacted_text: str) -> str:
    if not record.messages:
        return redacted_text  # a plain prompt: as it is (the sampler already redacted it)
    messages = [{"role": m["role"], "content": redact(str(m["content"]))} for m in record.messages]
    text, _ = render_prompt(tokenizer, messages)
    return text


def build_prompt_split(
    tokenizer: Any,
    logs: str | os.PathLike = SAMPLE_PROMPT_LOGS,
    *,
    calibration_size: int = 128,
    holdout_size: int = 64,
    seed: int = 0,
) -> PromptSplit:
    """Sample ``calibration_size`` + ``holdout_size`` disjoint prompts from ``logs`` and render them
    for ``tokenizer`` (see module doc). Same inputs, same split, on any machine."""
    records, bad = read_prompt_records(logs)
    if bad:
        logger.warning("%d line(s) of %s skipped, e.g. %s", len(bad), logs, bad[0])
    sample = sample_calibration_set(
        records, SamplingConfig(size=calibration_size, holdout_size=holdout_size, seed=seed)
    )
    by_id = {r.id: r for r in records}

    def rendered(members) -> tuple[RenderedPrompt, ...]:
        return tuple(
            RenderedPrompt(route=m.route, text=_render(tokenizer, by_id[m.prompt_id], m.text))
            for m in members
        )

    return PromptSplit(
        calibration=rendered(sample.calibration),
        holdout=rendered(sample.holdout),
        sample_digest=sample.digest,
        seed=seed,
        source=Path(logs).name,
        bad_lines=tuple(bad),
        summary=sample.summary,
    )


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token count of each text as the project tokenizes it (``calibration.observers``)."""
    return [len(tokenizer(t)["input_ids"]) for t in texts]


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


def _write_atomic(path: Path, lines: Iterator[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    for name, prompts in ((CALIBRATION_FILE, split.calibration), (HOLDOUT_FILE, split.holdout)):
        texts = [p.text for p in prompts]
        _write_atomic(
            out / name,
            (json.dumps({"text": p.text, "route": p.route}, ensure_ascii=False) for p in prompts),
        )
        entry: dict[str, Any] = {"count": len(texts), "text_digest": _digest(texts)}
        if tokenizer is not None:
            entry["token_lengths"] = length_report(token_lengths(tokenizer, texts))
        meta[name.removesuffix(".jsonl")] = entry
    _write_atomic(out / SPLIT_FILE, iter([json.dumps(meta, indent=2, sort_keys=True)]))
    return meta


def read_texts(path: str | os.PathLike) -> list[str]:
    """The ``text`` of every line of a split file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    from calibration.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder whose tokenizer renders")
    parser.add_argument("--out", required=True, help="folder for the split files")
    parser.add_argument("--logs", default=str(SAMPLE_PROMPT_LOGS), help="JSONL(.gz) prompt log")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
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
        seed=args.seed,
    )
    meta = write_prompt_split(split, args.out, tokenizer)
    json.dump(meta, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
