"""llm-compressor's oneshot NVFP4 recipes, the peer fp4roll is measured against.

Runs INSIDE the venv made by ``setup_llmcompressor_venv.sh`` and imports nothing from fp4roll
(llm-compressor is never a project dependency):

    VENV/bin/python benchmarks/peer/llmcompressor_oneshot.py --model DIR --prompts calibration.jsonl \
        --recipe gptq-nvfp4a16-mse --max-seq-len 2048 --out DIR

``--prompts``: one ``{"text": ...}`` per line, already rendered (chat template applied), e.g. the
``calibration.jsonl`` of ``benchmarks/prompt_split.py``. Each text is tokenized as fp4roll encodes a
rendered prompt (``calibration.prompts.encode_prompt``: special tokens added only when the line's
``templated`` is false, cut at ``--max-seq-len``), one prompt per sample, no padding. Writes the compressed checkpoint (``save_pretrained(save_compressed=True)``) and
``peer_run.json`` (recipe, wall seconds, peak RSS, versions, token counts) into ``--out``, atomically.

Recipes (``lm_head`` always ignored; everything else is llm-compressor's default):

* ``nvfp4a16-default``, ``nvfp4-default``: ``QuantizationModifier`` with the preset scheme (min-max
  observers; NVFP4A16 is data-free, NVFP4 calibrates the input global scales on the prompts);
* ``nvfp4a16-mse``, ``nvfp4-mse``: the same with ``weight_observer="nvfp4_expanded_mse"``;
* ``gptq-nvfp4a16``, ``gptq-nvfp4``: ``GPTQModifier`` with the preset scheme (block 128, dampening
  0.01, static activation order);
* ``gptq-nvfp4a16-mse``, ``gptq-nvfp4-mse``: GPTQ with ``weight_observer="nvfp4_expanded_mse"``
  (llm-compressor's best NVFP4 recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

MSE_OBSERVER = "nvfp4_expanded_mse"
#: recipe name -> (modifier, preset scheme, weight observer or None)
RECIPES: dict[str, tuple[str, str, str | None]] = {
    "nvfp4a16-default": ("QuantizationModifier", "NVFP4A16", None),
    "nvfp4-default": ("QuantizationModifier", "NVFP4", None),
    "nvfp4a16-mse": ("QuantizationModifier", "NVFP4A16", MSE_OBSERVER),
    "nvfp4-mse": ("QuantizationModifier", "NVFP4", MSE_OBSERVER),
    "gptq-nvfp4a16": ("GPTQModifier", "NVFP4A16", None),
    "gptq-nvfp4": ("GPTQModifier", "NVFP4", None),
    "gptq-nvfp4a16-mse": ("GPTQModifier", "NVFP4A16", MSE_OBSERVER),
    "gptq-nvfp4-mse": ("GPTQModifier", "NVFP4", MSE_OBSERVER),
}
IGNORE = ["lm_head"]


def build_recipe(name: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    modifier, scheme, observer = RECIPES[name]
    kwargs = {"targets": "Linear", "scheme": scheme, "ignore": list(IGNORE)}
    if observer is not None:
        kwargs["weight_observer"] = observer
    cls = GPTQModifier if modifier == "GPTQModifier" else QuantizationModifier
    return cls(**kwargs)


def read_prompts(path: Path) -> list[tuple[str, bool]]:
    """(text, templated) of every line."""
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, templated = obj["text"], bool(obj.get("templated", False))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise SystemExit(f"{path}:{line_no}: not a {{'text': ...}} line ({exc})") from None
            if not isinstance(text, str) or not text:
                raise SystemExit(f"{path}:{line_no}: 'text' must be a non-empty string")
            texts.append((text, templated))
    if not texts:
        raise SystemExit(f"{path}: no prompts")
    return texts


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="HF model folder (safetensors)")
    parser.add_argument("--prompts", required=True, type=Path, help='JSONL of {"text": ...}')
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--dtype", default="auto", help="model dtype while calibrating: auto (= config) or float32"
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = read_prompts(args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=dtype, local_files_only=True
    )
    model.eval()

    full = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t, templated in texts]
    encoded = [ids[: args.max_seq_len] for ids in full]
    lengths = [len(ids) for ids in encoded]
    truncated = sum(len(ids) > args.max_seq_len for ids in full)
    recipe = build_recipe(args.recipe)
    needs_data = RECIPES[args.recipe][0] == "GPTQModifier" or RECIPES[args.recipe][1] == "NVFP4"
    loaded = time.perf_counter()
    if needs_data:
        dataset = Dataset.from_dict(
            {
                "input_ids": encoded,
                "attention_mask": [[1] * len(ids) for ids in encoded],
            }
        )
        oneshot(
            model=model,
            dataset=dataset,
            recipe=recipe,
            max_seq_length=args.max_seq_len,
            num_calibration_samples=len(texts),
            shuffle_calibration_samples=False,
            batch_size=1,
        )
    else:  # llm-compressor's NVFP4A16 example: data-free
        oneshot(model=model, recipe=recipe)
    calibrated = time.perf_counter()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=args.out.parent))
    try:
        model.save_pretrained(str(tmp), save_compressed=True)
        tokenizer.save_pretrained(str(tmp))
        finished = time.perf_counter()
        run = {
            "recipe": args.recipe,
            "modifier": RECIPES[args.recipe][0],
            "scheme": RECIPES[args.recipe][1],
            "weight_observer": RECIPES[args.recipe][2] or "default",
            "ignore": IGNORE,
            "model": str(args.model),
            "prompts": str(args.prompts),
            "num_prompts": len(texts) if needs_data else 0,
            "calibration_tokens": sum(lengths) if needs_data else 0,
            "prompts_truncated": truncated if needs_data else 0,
            "max_seq_len": args.max_seq_len,
            "dtype": args.dtype,
            "wall_seconds": round(finished - started, 2),
            "oneshot_seconds": round(calibrated - loaded, 2),
            "save_seconds": round(finished - calibrated, 2),  # compressed-tensors packing
            "cpu_seconds": round(cpu_seconds(), 1),  # user + system (the machine may be shared)
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
            "argv": sys.argv,
        }
        (tmp / "peer_run.json").write_text(json.dumps(run, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps(run, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
