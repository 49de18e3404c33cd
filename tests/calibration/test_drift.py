"""Drift metrics: same distribution -> no drift; shifted routes, lengths or vocabulary -> drift."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from calibration.drift import DriftThresholds, compare, psi, token_js_distance, tokenize

SUPPORT = [
    "invoice",
    "refund",
    "login",
    "password",
    "account",
    "charged",
    "twice",
    "billing",
    "cancel",
    "plan",
    "email",
]
CODE = [
    "def",
    "return",
    "import",
    "class",
    "self",
    "list",
    "dict",
    "loop",
    "error",
    "exception",
    "test",
    "function",
]
COOKING = [
    "pizza",
    "pasta",
    "tomato",
    "basil",
    "oven",
    "dough",
    "cheese",
    "olive",
    "garlic",
    "flour",
    "yeast",
    "salt",
]
COMMON = ["the", "a", "to", "and", "of", "is", "in", "it", "for", "please", "help", "my", "with"]


@dataclass(frozen=True)
class Sample:
    text: str
    route: str
    token_count: int


def _samples(n: int, seed: int, route_mix: dict[str, float], vocab_override=None) -> list[Sample]:
    rng = random.Random(seed)
    routes = list(route_mix)
    out = []
    for _ in range(n):
        route = rng.choices(routes, [route_mix[r] for r in routes])[0]
        vocab = vocab_override or (SUPPORT if route == "support" else CODE)
        length = rng.randint(10, 40) if route == "support" else rng.randint(60, 200)
        words = [rng.choice(vocab if rng.random() < 0.6 else COMMON) for _ in range(length)]
        out.append(Sample(" ".join(words), route, length))
    return out


MIX = {"support": 0.6, "code": 0.4}


def test_same_distribution_gives_no_drift() -> None:
    verdict = compare(_samples(400, 1, MIX), _samples(600, 2, MIX))
    assert not verdict.drifted and not verdict.inconclusive, verdict.reasons
    assert verdict.metrics["token_js"] < 0.05
    assert verdict.metrics["route_psi"] < 0.05
    assert verdict.metrics["length_psi"] < 0.1


def test_shifted_route_mix_gives_drift() -> None:
    verdict = compare(_samples(400, 1, MIX), _samples(600, 2, {"support": 0.1, "code": 0.9}))
    assert verdict.drifted
    assert verdict.metrics["route_psi"] > 0.2
    assert any("route-share PSI" in reason for reason in verdict.reasons)


def test_shifted_vocabulary_gives_drift_with_the_same_routes_and_lengths() -> None:
    reference = _samples(400, 1, MIX)
    recent = _samples(600, 2, MIX, vocab_override=COOKING)
    verdict = compare(reference, recent)
    assert verdict.drifted
    assert verdict.metrics["token_js"] > 0.1
    assert verdict.metrics["route_psi"] < 0.05
    assert [r for r in verdict.reasons if r.startswith("token JS")]


def test_new_route_is_named() -> None:
    recent = _samples(300, 2, MIX) + [Sample("translate this please", "translate", 3)] * 200
    verdict = compare(_samples(400, 1, MIX), recent)
    assert verdict.drifted
    assert any("translate" in reason for reason in verdict.reasons)


def test_too_few_prompts_is_inconclusive_not_drift() -> None:
    verdict = compare(_samples(400, 1, MIX), _samples(10, 2, MIX))
    assert verdict.inconclusive and not verdict.drifted
    assert verdict.metrics == {}
    assert "too few" in verdict.reasons[0]


def test_recent_prompts_are_redacted_before_tokenising() -> None:
    reference = [Sample("contact [EMAIL] about the invoice", "support", 5)] * 100
    recent = [
        Sample(f"contact user{i}@example.com about the invoice", "support", 5) for i in range(100)
    ]
    assert compare(reference, recent).metrics["token_js"] < 0.01
    assert compare(reference, recent, redact_recent=False).metrics["token_js"] > 0.1


def test_metric_building_blocks() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert psi([0.9, 0.1], [0.1, 0.9]) > 1.0
    assert tokenize("Order 12345 and order 999!") == ["order", "0", "and", "order", "0"]
    from collections import Counter

    same = Counter({"a": 10, "b": 5})
    assert token_js_distance(same, same, top_k=10, smoothing=0.5) == pytest.approx(0.0, abs=1e-9)
    disjoint = token_js_distance(Counter({"a": 1000}), Counter({"b": 1000}), 10, 0.5)
    assert disjoint > 0.95
    with pytest.raises(ValueError):
        DriftThresholds(js=0)
