"""Calibration sampling: dedup, stratification, disjoint hold-out, deterministic digest."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random

import pytest

from calibration.config import SamplingConfig
from calibration.prompts import PromptRenderer, RenderedPrompt
from calibration.redaction import find_pii
from calibration.sampling import (
    NotEnoughPromptsError,
    PromptRecord,
    Role,
    _allocate,
    approx_token_count,
    calibration_digest,
    length_bucket,
    near_duplicate_clusters,
    normalize_text,
    sample_calibration_set,
)

T0 = dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc)
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "river",
    "mountain",
    "cloud",
    "storage",
    "invoice",
    "refund",
    "login",
    "sync",
    "export",
]


def _record(i: int, text: str, route: str = "chat", minutes: int | None = None) -> PromptRecord:
    return PromptRecord(
        id=i,
        received_at=T0 + dt.timedelta(minutes=i if minutes is None else minutes),
        route=route,
        model="m",
        text=text,
        token_count=approx_token_count(text),
        source="test",
    )


def _corpus(n: int = 240, seed: int = 0) -> list[PromptRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        route = ["chat", "code", "summarize"][i % 3]
        length = {"chat": 12, "code": 60, "summarize": 200}[route] + rng.randrange(40)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        records.append(_record(i, f"{route} request {i}: {text}", route))
    return records


def _with_near_duplicates(records: list[PromptRecord]) -> list[PromptRecord]:
    """Append an exact duplicate and two near duplicates (small edits, other PII) per 10 records."""
    extra = []
    next_id = len(records)
    for record in records[::10]:
        extra.append(
            dataclasses.replace(
                record, id=next_id, received_at=record.received_at + dt.timedelta(days=1)
            )
        )
        later = record.received_at + dt.timedelta(hours=1)
        extra.append(
            dataclasses.replace(
                record, id=next_id + 1, received_at=later, text=record.text + " Thanks!"
            )
        )
        extra.append(
            dataclasses.replace(
                record,
                id=next_id + 2,
                received_at=later,
                text=record.text.upper() + " mail me at x.y@example.com",
            )
        )
        next_id += 3
    return records + extra


def test_holdout_is_disjoint_and_sizes_are_exact() -> None:
    sample = sample_calibration_set(
        _corpus(), SamplingConfig(calibration_size=60, sensitivity_size=0, holdout_size=30, seed=1)
    )
    assert len(sample.calibration) == 60 and len(sample.holdout) == 30
    calibration_ids = {m.prompt_id for m in sample.calibration}
    holdout_ids = {m.prompt_id for m in sample.holdout}
    assert not calibration_ids & holdout_ids
    assert [m.position for m in sample.calibration] == list(range(60))
    assert {m.role for m in sample.calibration} == {Role.CALIBRATION}
    assert {m.role for m in sample.holdout} == {Role.HOLDOUT}


def test_near_duplicates_never_straddle_the_split() -> None:
    records = _with_near_duplicates(_corpus())
    config = SamplingConfig(calibration_size=120, sensitivity_size=0, holdout_size=100, seed=3)
    sample = sample_calibration_set(records, config)
    assert sample.summary["exact_duplicates_removed"] == 24
    assert sample.summary["near_duplicates_removed"] >= 48
    texts = [m.text for m in sample.members]
    labels = near_duplicate_clusters(
        [normalize_text(t) for t in texts], config.near_duplicate_threshold
    )
    assert len(set(labels)) == len(texts), "two members of one near-duplicate cluster were kept"
    by_original = {r.id: r for r in records}
    # Every kept member is the earliest of its family (the copies come later).
    for member in sample.members:
        assert by_original[member.prompt_id].id < 240


def test_digest_is_deterministic_and_independent_of_order_and_ids() -> None:
    records = _corpus()
    config = SamplingConfig(calibration_size=50, sensitivity_size=0, holdout_size=20, seed=7)
    first = sample_calibration_set(records, config)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    renumbered = [dataclasses.replace(r, id=r.id + 10_000, source="elsewhere") for r in shuffled]
    second = sample_calibration_set(renumbered, config)
    assert first.digest == second.digest
    assert [m.text for m in first.members] == [m.text for m in second.members]
    assert first.digest == calibration_digest(first.members)


def test_digest_changes_with_any_content_change_and_with_the_seed() -> None:
    records = _corpus()
    config = SamplingConfig(calibration_size=50, sensitivity_size=0, holdout_size=20, seed=7)
    base = sample_calibration_set(records, config)
    member = base.calibration[5]
    changed = [
        dataclasses.replace(r, text=r.text + " extra") if r.id == member.prompt_id else r
        for r in records
    ]
    assert sample_calibration_set(changed, config).digest != base.digest
    assert (
        sample_calibration_set(records, dataclasses.replace(config, seed=8)).digest != base.digest
    )
    # The digest covers role and route too.
    swapped = [dataclasses.replace(base.calibration[0], role=Role.HOLDOUT), *base.calibration[1:]]
    assert calibration_digest(swapped) != calibration_digest(base.calibration)


def test_stratified_by_route_and_length() -> None:
    records = _corpus(300)
    sample = sample_calibration_set(
        records, SamplingConfig(calibration_size=90, sensitivity_size=0, holdout_size=30, seed=0)
    )
    # Routes are equally common in the input; strata are (route, length bucket), so route shares
    # are proportional up to rounding in each stratum.
    for role, expected in (("calibration", 30), ("holdout", 10)):
        routes = sample.summary[role]["routes"]
        assert set(routes) == {"chat", "code", "summarize"}
        assert all(abs(count - expected) <= 2 for count in routes.values()), routes
    histogram = sample.summary["calibration"]["length_histogram"]
    assert sum(histogram.values()) == 90


def test_route_filter_and_not_enough_prompts() -> None:
    records = _corpus(60)
    sample = sample_calibration_set(
        records,
        SamplingConfig(calibration_size=10, sensitivity_size=0, holdout_size=5, routes=("code",)),
    )
    assert {m.route for m in sample.members} == {"code"}
    with pytest.raises(NotEnoughPromptsError, match="need 70 unique prompts"):
        sample_calibration_set(
            records, SamplingConfig(calibration_size=60, sensitivity_size=0, holdout_size=10)
        )


def test_pii_is_redacted_before_anything_is_kept() -> None:
    records = [
        _record(
            i,
            f"ticket {i} {' '.join(WORDS[i % 7 : i % 7 + 9])}: mail {i}.someone@example.com, "
            f"call +1 415 555 {1000 + i}, card 4111 1111 1111 1111, key sk-{'a' * 20}{i:04d}",
            route="support",
            minutes=i,
        )
        for i in range(40)
    ]
    sample = sample_calibration_set(
        records, SamplingConfig(calibration_size=2, sensitivity_size=0, holdout_size=1)
    )
    assert sample.summary["redactions"]["email"] == 40
    for member in sample.members:
        assert find_pii(member.text) == []
        assert "[EMAIL]" in member.text and "[CARD]" in member.text


def test_chat_messages_ignore_the_shared_system_prompt_for_dedup() -> None:
    system = {"role": "system", "content": "You are a very long shared system prompt. " * 20}
    records = []
    rng = random.Random(5)
    for i in range(30):
        question = "question: " + " ".join(rng.sample(WORDS, 8))
        messages = ({**system}, {"role": "user", "content": question})
        text = f"system: {system['content']}\n\nuser: {question}"
        records.append(dataclasses.replace(_record(i, text), messages=messages))
    sample = sample_calibration_set(
        records, SamplingConfig(calibration_size=20, sensitivity_size=0, holdout_size=5)
    )
    assert sample.summary["near_duplicates_removed"] < 5
    assert sample.calibration[0].text.startswith("system: You are")


def test_allocation_and_buckets() -> None:
    # Every non-empty stratum gets one first, then the rest proportionally.
    assert _allocate({("a", "x"): 10, ("b", "x"): 1}, 5) == {("a", "x"): 4, ("b", "x"): 1}
    assert _allocate({("a", "x"): 2, ("b", "x"): 100, ("c", "x"): 0}, 50) == {
        ("a", "x"): 1,
        ("b", "x"): 49,
        ("c", "x"): 0,
    }
    assert _allocate({("a", "x"): 5, ("b", "x"): 5, ("c", "x"): 5}, 2) == {
        ("a", "x"): 1,
        ("b", "x"): 1,
        ("c", "x"): 0,
    }
    assert sum(_allocate({("a", "x"): 3, ("b", "x"): 3, ("c", "x"): 3}, 7).values()) == 7
    assert length_bucket(0) == "0-31" and length_bucket(31) == "0-31"
    assert length_bucket(32) == "32-127" and length_bucket(10_000) == "512+"
    with pytest.raises(ValueError, match="calibration_size"):
        SamplingConfig(calibration_size=0, sensitivity_size=0, holdout_size=1)
    with pytest.raises(ValueError, match="length_edges"):
        SamplingConfig(calibration_size=1, sensitivity_size=0, holdout_size=1, length_edges=(10, 5))


def test_three_disjoint_roles_and_the_sensitivity_slice_does_not_shrink_calibration() -> None:
    config = SamplingConfig(calibration_size=60, sensitivity_size=12, holdout_size=30, seed=2)
    sample = sample_calibration_set(_corpus(), config)
    assert (len(sample.calibration), len(sample.sensitivity), len(sample.holdout)) == (60, 12, 30)
    ids = [
        {m.prompt_id for m in part}
        for part in (sample.calibration, sample.sensitivity, sample.holdout)
    ]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert {m.role for m in sample.sensitivity} == {Role.SENSITIVITY}
    # the hold-out is drawn first: adding a sensitivity slice leaves it unchanged
    without = sample_calibration_set(_corpus(), dataclasses.replace(config, sensitivity_size=0))
    assert [m.prompt_id for m in without.holdout] == [m.prompt_id for m in sample.holdout]
    assert sample.digest != without.digest


def test_members_are_rendered_as_the_server_sees_them_and_the_digest_covers_it() -> None:
    from tests.calibration.replay_helpers import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    records = []
    for i in range(40):
        question = f"question {i}: " + " ".join(random.Random(i).sample(WORDS, 6))
        messages = ({"role": "user", "content": question + f" mail a{i}@example.com"},)
        records.append(dataclasses.replace(_record(i, f"user: {question}"), messages=messages))
    records.append(_record(99, "a plain completion prompt about " + " ".join(WORDS[:9])))
    config = SamplingConfig(calibration_size=20, sensitivity_size=5, holdout_size=10, seed=1)
    rendered = sample_calibration_set(records, config, PromptRenderer(tokenizer))
    chat = [m for m in rendered.members if m.prompt_id != 99]
    for member in chat:
        assert member.rendered.templated and member.rendered.text.startswith("<user>question")
        assert (
            member.rendered.text.endswith("<assistant>")
            and "example.com" not in member.rendered.text
        )
        assert member.text.startswith("user: question")  # the flattened form, for drift and audit
    plain = [m for m in rendered.members if m.prompt_id == 99]
    assert all(m.rendered == RenderedPrompt(m.text) for m in plain)
    flattened = sample_calibration_set(records, config)  # no tokenizer: flattened chat
    assert [m.prompt_id for m in flattened.members] == [m.prompt_id for m in rendered.members]
    assert flattened.digest != rendered.digest  # the digest describes the rendered form


def test_window_bounds_are_applied_and_naive_times_are_utc() -> None:
    records = _corpus(120)
    config = SamplingConfig(
        calibration_size=10,
        sensitivity_size=0,
        holdout_size=5,
        since=(T0 + dt.timedelta(minutes=30)).replace(tzinfo=None),
        until=T0 + dt.timedelta(minutes=90),
    )
    assert config.since.tzinfo is dt.timezone.utc
    sample = sample_calibration_set(records, config)
    assert sample.summary["input_prompts"] == 60
    with pytest.raises(ValueError, match="empty window"):
        SamplingConfig(since=T0, until=T0)
