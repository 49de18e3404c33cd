"""benchmarks/prompt_split.py: the calibration / held-out split both sides of the quality benchmark read."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from benchmarks.prompt_split import (
    CALIBRATION_FILE,
    HOLDOUT_FILE,
    SPLIT_FILE,
    build_prompt_split,
    read_prompts,
    write_prompt_split,
)

ROUTES = ("chat-support", "code-help", "summarize")
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


class TemplateTokenizer:
    """Stands in for a HF tokenizer: a visible chat template, whitespace tokens."""

    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] * add_special_tokens + list(range(len(text.split())))}


def _prompt_text(i: int) -> str:
    # letters only (the sampler folds digit runs) and distinct enough to survive near-dedup
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) + rng.choice(WORDS) for _ in range(14))


@pytest.fixture
def logs(tmp_path):
    path = tmp_path / "logs.jsonl.gz"
    lines = []
    for i in range(40):
        route = ROUTES[i % len(ROUTES)]
        if i % 4 == 0:  # a plain completion prompt
            obj = {"prompt": _prompt_text(i), "metadata": {"route": route}}
        else:
            content = _prompt_text(i) + (" write to jane.doe@example.com" if i == 5 else "")
            obj = {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": content},
                ],
                "metadata": {"route": route},
                "timestamp": f"2026-01-0{1 + i % 9}T00:00:00Z",
            }
        lines.append(json.dumps(obj))
    lines.insert(7, "{not json")
    lines.append(lines[3])  # an exact duplicate
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_split_is_disjoint_deterministic_and_rendered(logs):
    tok = TemplateTokenizer()
    split = build_prompt_split(tok, logs, calibration_size=12, holdout_size=6, seed=3)
    again = build_prompt_split(tok, logs, calibration_size=12, holdout_size=6, seed=3)
    other_seed = build_prompt_split(tok, logs, calibration_size=12, holdout_size=6, seed=4)

    assert len(split.calibration) == 12 and len(split.holdout) == 6
    calib = {p.rendered.text for p in split.calibration}
    hold = {p.rendered.text for p in split.holdout}
    assert len(calib) == 12 and len(hold) == 6 and not calib & hold
    assert split == again
    assert [p.prompt_id for p in other_seed.calibration] != [p.prompt_id for p in split.calibration]
    assert len(split.bad_lines) == 1 and split.bad_lines[0].startswith("logs.jsonl.gz:8: ")

    rendered = [p.rendered for p in split.calibration + split.holdout]
    texts = [r.text for r in rendered]
    chat = [r.text for r in rendered if r.templated]
    plain = [r.text for r in rendered if not r.templated]
    assert chat and plain and len(chat) + len(plain) == len(texts)
    assert all(t.startswith("<system>") for t in chat) and not any(t.startswith("<") for t in plain)
    assert all(t.endswith("<assistant>") and "<user>" in t for t in chat)
    assert all("user:" not in t and "system:" not in t for t in texts)  # never flattened
    assert not any("jane.doe@example.com" in t for t in texts)


def test_write_and_read_back(logs, tmp_path):
    tok = TemplateTokenizer()
    split = build_prompt_split(tok, logs, calibration_size=10, holdout_size=5)
    meta = write_prompt_split(split, tmp_path / "out", tok)

    out = tmp_path / "out"
    assert read_prompts(out / CALIBRATION_FILE) == [p.rendered for p in split.calibration]
    assert read_prompts(out / HOLDOUT_FILE) == [p.rendered for p in split.holdout]
    assert json.loads((out / SPLIT_FILE).read_text()) == meta
    # templated text gets no special token added, plain text one (the fake tokenizer's 0)
    lengths = [len(p.rendered.text.split()) + (not p.rendered.templated) for p in split.calibration]
    report = meta["calibration"]["token_lengths"]
    assert report["max"] == max(lengths) and report["tokens"] == sum(lengths)
    assert report["truncated_at"]["128"] == sum(n > 128 for n in lengths)
    assert meta["calibration"]["text_digest"] != meta["holdout"]["text_digest"]
    assert meta["bad_lines"] == 1
    assert not list(out.glob(".*"))  # no temp files left behind
