"""Drift between a stored calibration set and a recent window of production prompts.

Three metrics, each comparing a reference distribution (the calibration set) with the recent one:

* ``token_js``: Jensen–Shannon distance (base 2, so in [0, 1]) between token-unigram distributions
  over the top-K tokens of the reference and recent texts combined, plus one ``<other>`` bucket;
  add-``smoothing`` counts so unseen tokens do not give infinities.
* ``length_psi``: Population Stability Index over prompt-length bins (approximate tokens).
* ``route_psi``: PSI over route shares.

PSI = sum((a - e) * ln(a / e)) with shares floored at ``psi_floor``. Defaults: drifted when
JS > 0.1 or any PSI > 0.2 (the usual "significant shift" rule for PSI). Recent prompts are redacted
before tokenising, like the calibration set they are compared with.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.spatial.distance import jensenshannon

from calibration.redaction import redact

DEFAULT_JS_THRESHOLD = 0.1
DEFAULT_PSI_THRESHOLD = 0.2
DEFAULT_TOP_K = 200
DEFAULT_LENGTH_EDGES: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_MIN_SAMPLES = 50
_WORD_RE = re.compile(r"\w+", re.UNICODE)


class TextSample(Protocol):
    """Anything with a text, a route and a token count (PromptRecord, stored members, ...)."""

    @property
    def text(self) -> str: ...

    @property
    def route(self) -> str: ...

    @property
    def token_count(self) -> int: ...


@dataclass(frozen=True)
class DriftThresholds:
    js: float = DEFAULT_JS_THRESHOLD
    psi: float = DEFAULT_PSI_THRESHOLD
    top_k: int = DEFAULT_TOP_K
    smoothing: float = 0.5
    psi_floor: float = 1e-4
    length_edges: tuple[int, ...] = DEFAULT_LENGTH_EDGES
    min_samples: int = DEFAULT_MIN_SAMPLES

    def __post_init__(self) -> None:
        if not (0 < self.js <= 1) or self.psi <= 0:
            raise ValueError(
                f"thresholds must be positive (js in (0, 1]): js={self.js}, psi={self.psi}"
            )
        if self.top_k < 1 or self.smoothing <= 0 or not (0 < self.psi_floor < 1):
            raise ValueError("top_k >= 1, smoothing > 0 and 0 < psi_floor < 1 are required")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")


@dataclass(frozen=True)
class DriftVerdict:
    """Outcome of ``compare``. ``inconclusive``: too few prompts to judge (then ``drifted`` is False)."""

    drifted: bool
    inconclusive: bool
    metrics: Mapping[str, float]
    reasons: tuple[str, ...]
    n_reference: int
    n_recent: int
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "drifted": self.drifted,
            "inconclusive": self.inconclusive,
            "metrics": dict(self.metrics),
            "reasons": list(self.reasons),
            "n_reference": self.n_reference,
            "n_recent": self.n_recent,
            "thresholds": {"js": self.thresholds.js, "psi": self.thresholds.psi},
        }


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (digits collapsed to 0 so ids and amounts do not look like drift)."""
    return [re.sub(r"\d+", "0", token) for token in _WORD_RE.findall(text.casefold())]


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = 1e-4) -> float:
    """Population Stability Index of two share vectors over the same bins."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    a = np.maximum(np.asarray(actual, dtype=np.float64), floor)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def _shares(counts: Mapping[Any, int], keys: Sequence[Any]) -> np.ndarray:
    values = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    total = values.sum()
    return values / total if total else values


def token_js_distance(
    reference: Counter[str], recent: Counter[str], top_k: int, smoothing: float
) -> float:
    """JS distance (base 2) of unigram distributions over the top-K tokens plus ``<other>``."""
    vocabulary = [token for token, _ in (reference + recent).most_common(top_k)]
    in_vocab = set(vocabulary)

    def distribution(counts: Counter[str]) -> np.ndarray:
        vector = [counts.get(t, 0) for t in vocabulary]
        vector.append(sum(c for t, c in counts.items() if t not in in_vocab))
        array = np.asarray(vector, dtype=np.float64) + smoothing
        return array / array.sum()

    distance = jensenshannon(distribution(reference), distribution(recent), base=2)
    return float(0.0 if math.isnan(distance) else distance)


def _length_bin(token_count: int, edges: Sequence[int]) -> int:
    for index, edge in enumerate(edges):
        if token_count < edge:
            return index
    return len(edges)


@dataclass(frozen=True)
class _Profile:
    tokens: Counter[str]
    lengths: Counter[int]
    routes: Counter[str]
    n: int


def _profile(samples: Iterable[TextSample], edges: Sequence[int], redact_text: bool) -> _Profile:
    tokens: Counter[str] = Counter()
    lengths: Counter[int] = Counter()
    routes: Counter[str] = Counter()
    n = 0
    for sample in samples:
        n += 1
        text = redact(sample.text) if redact_text else sample.text
        tokens.update(tokenize(text))
        lengths[_length_bin(sample.token_count, edges)] += 1
        routes[sample.route] += 1
    return _Profile(tokens, lengths, routes, n)


def compare(
    reference: Iterable[TextSample],
    recent: Iterable[TextSample],
    thresholds: DriftThresholds | None = None,
    *,
    redact_recent: bool = True,
) -> DriftVerdict:
    """Drift verdict of ``recent`` against ``reference`` (already redacted, e.g. a calibration set)."""
    thresholds = thresholds or DriftThresholds()
    ref = _profile(reference, thresholds.length_edges, redact_text=False)
    new = _profile(recent, thresholds.length_edges, redact_text=redact_recent)
    if min(ref.n, new.n) < thresholds.min_samples:
        return DriftVerdict(
            drifted=False,
            inconclusive=True,
            metrics={},
            reasons=(
                f"too few prompts to judge: reference {ref.n}, recent {new.n} "
                f"(minimum {thresholds.min_samples})",
            ),
            n_reference=ref.n,
            n_recent=new.n,
            thresholds=thresholds,
        )
    length_bins = list(range(len(thresholds.length_edges) + 1))
    routes = sorted(set(ref.routes) | set(new.routes))
    metrics = {
        "token_js": token_js_distance(
            ref.tokens, new.tokens, thresholds.top_k, thresholds.smoothing
        ),
        "length_psi": psi(
            _shares(ref.lengths, length_bins),
            _shares(new.lengths, length_bins),
            thresholds.psi_floor,
        ),
        "route_psi": psi(
            _shares(ref.routes, routes), _shares(new.routes, routes), thresholds.psi_floor
        ),
    }
    reasons = []
    if metrics["token_js"] > thresholds.js:
        reasons.append(f"token JS distance {metrics['token_js']:.3f} > {thresholds.js}")
    for name, label in (("length_psi", "prompt-length PSI"), ("route_psi", "route-share PSI")):
        if metrics[name] > thresholds.psi:
            reasons.append(f"{label} {metrics[name]:.3f} > {thresholds.psi}")
    if reasons:
        new_routes = sorted(set(new.routes) - set(ref.routes))
        if new_routes:
            reasons.append(f"routes not in the calibration set: {', '.join(new_routes)}")
    return DriftVerdict(
        drifted=bool(reasons),
        inconclusive=False,
        metrics=metrics,
        reasons=tuple(reasons),
        n_reference=ref.n,
        n_recent=new.n,
        thresholds=thresholds,
    )
