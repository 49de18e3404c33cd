"""Bounded-memory sampling: reservoir pre-sampling, linear near-duplicate buckets, default window."""

from __future__ import annotations

import datetime as dt
import hashlib
import random

import calibration.sampling as sampling
from calibration.config import SamplingConfig
from calibration.sampling import PromptRecord, near_duplicate_clusters, normalize_text, presample

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _record(i: int, text: str, route: str = "chat") -> PromptRecord:
    return PromptRecord(
        id=i,
        received_at=T0 + dt.timedelta(minutes=i),
        route=route,
        model=None,
        text=text,
        token_count=len(text.split()),
        source="t",
    )


def _word(n: int) -> str:
    """A distinct letters-only word per ``n`` (digits normalise to 0)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = letters[r] + out
    return out + "x"


def test_presample_is_the_bottom_k_by_hashed_priority_whatever_the_order():
    records = [_record(i, f"prompt number {i} " * (1 + i % 5)) for i in range(2000)]

    def priority(r: PromptRecord) -> int:
        digest = hashlib.sha256(f"7\x00{r.route}\x00{r.text}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    expected = {r.id for r in sorted(records, key=priority)[:100]}
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    kept = presample(iter(records), 100, seed=7)
    assert {r.id for r in kept} == expected
    assert {r.id for r in presample(iter(shuffled), 100, seed=7)} == expected
    assert [r.received_at for r in kept] == sorted(r.received_at for r in kept)
    assert {r.id for r in presample(iter(records), 100, seed=8)} != expected
    assert len(presample(iter(records[:50]), 100, seed=7)) == 50


def test_near_duplicate_buckets_are_linear_not_quadratic(monkeypatch):
    """3000 near-identical prompts share LSH buckets: the exact checks grow linearly."""
    calls = 0
    real = sampling._jaccard

    def counting(a, b):
        nonlocal calls
        calls += 1
        return real(a, b)

    monkeypatch.setattr(sampling, "_jaccard", counting)
    base = "please summarise the attached quarterly report for the board meeting " * 3
    texts = [normalize_text(f"{base} variant {_word(i)}") for i in range(3000)]
    labels = near_duplicate_clusters(texts, 0.8)
    assert len(set(labels)) == 1  # all one family
    assert calls <= 2 * len(texts), calls  # the old pairwise loop made ~n^2/2 estimates

    distinct = [normalize_text(" ".join(_word(i * 31 + j) for j in range(30))) for i in range(50)]
    assert len(set(near_duplicate_clusters(distinct, 0.8))) == 50


def test_sampling_keeps_a_bounded_subset_of_a_large_window():
    texts = [" ".join(_word(i * 41 + j) for j in range(40)) for i in range(3000)]
    records = (_record(i, t, route=("a", "b")[i % 2]) for i, t in enumerate(texts))
    config = SamplingConfig(calibration_size=20, sensitivity_size=5, holdout_size=20)
    result = sampling.sample_calibration_set(records, config, max_candidates=600)
    assert result.summary["input_prompts"] == 600
    assert result.summary["presampled_from"] == 3000
    assert len(result.calibration) == 20 and len(result.holdout) == 20


def test_default_window_is_thirty_days_before_the_newest_prompt(tmp_path):
    from pipelines.prompt_logs import DEFAULT_WINDOW, default_window_start
    from registry import db
    from registry.prompt_logs import content_digest
    from registry.schema import PromptLog

    url = f"sqlite:///{tmp_path / 's.db'}"
    db.upgrade(url)
    newest = T0 + dt.timedelta(days=90)
    with db.session_scope(url) as session:
        for i, when in enumerate((T0, newest)):
            session.add(
                PromptLog(
                    content_digest=content_digest("r", None, f"t{i}"),
                    received_at=when,
                    route="r",
                    prompt_text=f"t{i}",
                    token_count=1,
                    source="t",
                )
            )
    assert default_window_start(SamplingConfig(), url) == newest - DEFAULT_WINDOW
    assert default_window_start(SamplingConfig(since=T0), url) == T0
    until = T0 + dt.timedelta(days=10)
    assert default_window_start(SamplingConfig(until=until), url) == until - DEFAULT_WINDOW
    db.dispose_engines()
