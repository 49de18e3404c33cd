"""Independent leak oracle: a hand-written corpus the redactor never saw (issue 11).

``data/leak_corpus.json`` lists realistic prompts with planted PII and secrets, each with the exact
substrings that must not survive; it was written from the formats of the things themselves (IBAN
examples, card test numbers, token layouts), not from the redactor's detectors. The clean corpus
measures false positives on ordinary prose, code, numbers, dates and version strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration.redaction import PLACEHOLDERS, redact, redact_with_counts

CORPUS = json.loads((Path(__file__).parent / "data" / "leak_corpus.json").read_text("utf-8"))
MAX_CLEAN_FALSE_POSITIVES = 2  # spans redacted in the whole clean corpus


@pytest.mark.parametrize("case", CORPUS["leaks"], ids=lambda c: c["prompt"][:40])
def test_no_planted_secret_survives(case) -> None:
    redacted = redact(case["prompt"])
    survivors = [s for s in case["secrets"] if s in redacted]
    assert not survivors, f"leaked {survivors} in {redacted!r}"
    # Long secrets must not survive in part either (a widened span, not a trimmed one).
    for secret in case["secrets"]:
        if len(secret) >= 24:
            assert secret[len(secret) // 4 : len(secret) // 4 + 12] not in redacted, redacted


def test_clean_corpus_has_few_false_positives() -> None:
    false_positives = []
    for text in CORPUS["clean"]:
        result = redact_with_counts(text)
        if result.total:
            false_positives.append((text, result.text))
    print(f"\n{len(false_positives)} of {len(CORPUS['clean'])} clean texts changed:")
    for text, redacted in false_positives:
        print(f"  {text!r}\n  -> {redacted!r}")
    assert len(false_positives) <= MAX_CLEAN_FALSE_POSITIVES


def test_placeholders_survive_a_second_pass_unchanged() -> None:
    for case in CORPUS["leaks"]:
        once = redact(case["prompt"])
        assert redact(once) == once
    assert all(redact(p) == p for p in PLACEHOLDERS.values())
