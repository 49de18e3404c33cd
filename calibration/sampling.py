"""Calibration sampling from production prompt logs: redact, deduplicate, stratify, split, hash.

Pure functions over ``PromptRecord`` values (the store lives in ``registry/``; ``pipelines/prompt_logs.py``
glues the two). The pipeline, in order:

0. **Pre-sampling** (bounded memory): the window is read once as a stream and at most
   ``max(20 000, 10 x what the roles need)`` prompts are kept, uniformly, by a reservoir with hashed
   priorities (:func:`presample`: content-determined, order-independent). Everything below works
   on that subset.
1. **Redaction** (``calibration.redaction``) of every prompt first: nothing unredacted goes further.
2. **Exact duplicates**: SHA-256 of the normalised redacted text (NFKC, case-folded, digit runs -> 0,
   whitespace collapsed).
   System messages are left out of duplicate detection (a route's shared system prompt would
   otherwise make every request of that route look alike).
3. **Near duplicates**: MinHash (64 permutations) over character 5-gram shingles of the normalised
   text, LSH with 16 bands x 4 rows to find candidate pairs, then the *exact* Jaccard similarity of
   the shingle sets must reach ``near_duplicate_threshold`` (default 0.8); pairs are merged with
   union-find. Within an LSH bucket a prompt is checked against at most its 64 first members (linear,
   not quadratic in the bucket size; identical to all pairs for buckets up to that size). Each cluster keeps one representative (earliest ``received_at``), so near-duplicates
   can never straddle the calibration / hold-out split.
4. **Stratification** by (route, length bucket); the canary hold-out is allocated first, proportionally
   to the stratum sizes (largest remainder), then the sensitivity slice (scores each group and verifies
   the plan), then the calibration prompts (activation statistics) from what is left: three disjoint roles.
5. Within a stratum prompts are ranked by ``SHA-256(seed, text digest)``: deterministic, independent
   of database ids, import order or machine.
6. **Rendering** (:mod:`calibration.prompts`): each redacted prompt as the server sees it (chat requests
   through the model's chat template). The **digest** is SHA-256 over the ordered (role, route,
   rendered text) of every member: the corpus hash later artifacts carry. It contains no paths, ids or
   timestamps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import heapq
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from calibration.config import DEFAULT_LENGTH_EDGES, SamplingConfig
from calibration.prompts import Prompt, RenderedPrompt, flatten_messages
from calibration.redaction import RedactedPrompt, redact_prompt

logger = logging.getLogger(__name__)

DIGEST_VERSION = "fp4roll-calibration-set-v2"  # v2: rendered prompts, sensitivity role
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SHINGLE_CHARS = 5
_NUM_PERM = 64
_BANDS = 16
_ROWS = _NUM_PERM // _BANDS
_MERSENNE_32 = np.uint64(4294967291)  # largest prime below 2**32


def approx_token_count(text: str) -> int:
    """Approximate token count: word runs plus single punctuation marks (not a model tokenizer)."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


@dataclass(frozen=True)
class PromptRecord:
    """One logged prompt. ``text`` is the flattened prompt ("role: content" blocks for chat)."""

    id: int
    received_at: dt.datetime
    route: str
    model: str | None
    text: str
    token_count: int
    source: str
    messages: tuple[Mapping[str, Any], ...] | None = None
    redaction: RedactedPrompt | None = None  # stored by the current redactor: used as is


class Role(str, Enum):
    """What a sampled prompt is for; the three roles are disjoint."""

    CALIBRATION = "calibration"  # activation statistics (every one of them)
    SENSITIVITY = "sensitivity"  # scores each group's sensitivity and verifies the plan
    HOLDOUT = "holdout"  # the canary's replay window


@dataclass(frozen=True)
class SampledPrompt:
    """A member of a calibration set; ``text`` (flattened) and ``rendered`` are REDACTED."""

    prompt_id: int
    role: Role
    position: int
    route: str
    length_bucket: str
    token_count: int  # approximate tokens of the redacted text
    text: str  # redacted, chat flattened to "role: content" blocks (drift, audit)
    rendered: RenderedPrompt  # redacted, as the server sees it (calibration, scoring, canary)


@dataclass(frozen=True)
class CalibrationSample:
    """The result of sampling: members in order, the digest over them and a summary."""

    calibration: tuple[SampledPrompt, ...]
    sensitivity: tuple[SampledPrompt, ...]
    holdout: tuple[SampledPrompt, ...]
    digest: str
    summary: Mapping[str, Any]
    config: SamplingConfig

    @property
    def members(self) -> tuple[SampledPrompt, ...]:
        return self.calibration + self.sensitivity + self.holdout


class NotEnoughPromptsError(ValueError):
    """Fewer unique prompts in the window than the three roles need."""


@dataclass(frozen=True)
class _Candidate:
    record: PromptRecord
    text: str  # redacted, flattened
    prompt: Prompt  # redacted, as logged (messages or text)
    normalized: str
    text_digest: str
    token_count: int
    length_bucket: str
    rank: str = field(default="")


def _redact_record(record: PromptRecord, counts: Counter[str]) -> tuple[Prompt, str, str]:
    """(redacted prompt as logged, its flattened text, the text used for duplicate detection).

    The stored redaction when the record carries one, else :func:`calibration.redaction.redact_prompt`.
    Duplicate detection ignores system messages (a route's shared system prompt would otherwise make
    all of its requests look alike).
    """
    redacted = record.redaction or redact_prompt(record.messages or None, record.text)
    counts.update(redacted.counts)
    if redacted.messages is None:
        return redacted.text, redacted.text, redacted.text
    messages = [dict(m) for m in redacted.messages]
    dedup_source = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
    return messages, redacted.text, dedup_source


def plain_renderer(prompt: Prompt) -> RenderedPrompt:
    """The renderer without a tokenizer: plain text as is, chat flattened (not what a server sees:
    pass ``functools.partial(calibration.prompts.render_prompt, tokenizer)`` for calibration)."""
    return RenderedPrompt(prompt if isinstance(prompt, str) else flatten_messages(prompt))


def length_bucket_labels(edges: Sequence[int]) -> list[str]:
    labels = []
    lower = 0
    for edge in edges:
        labels.append(f"{lower}-{edge - 1}")
        lower = edge
    labels.append(f"{lower}+")
    return labels


def length_bucket(token_count: int, edges: Sequence[int] = DEFAULT_LENGTH_EDGES) -> str:
    labels = length_bucket_labels(edges)
    for edge, label in zip(edges, labels, strict=False):
        if token_count < edge:
            return label
    return labels[-1]


def normalize_text(text: str) -> str:
    """Normalisation used for duplicate detection (not for storage)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\d+", "0", text)
    return re.sub(r"\s+", " ", text).strip()


def _shingles(normalized: str) -> np.ndarray:
    """Sorted unique character 5-gram ids (exact: 5 bytes packed into a uint64)."""
    data = np.frombuffer(normalized.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    if data.size < _SHINGLE_CHARS:
        value = np.uint64(0)
        for byte in data:
            value = (value << np.uint64(8)) | byte
        return np.array([value | np.uint64(1 << 63)], dtype=np.uint64)
    n = data.size - _SHINGLE_CHARS + 1
    packed = np.zeros(n, dtype=np.uint64)
    for offset in range(_SHINGLE_CHARS):
        packed = (packed << np.uint64(8)) | data[offset : offset + n]
    return np.unique(packed)


def _permutations() -> tuple[np.ndarray, np.ndarray]:
    """Fixed MinHash coefficients from SHA-256 (no RNG: identical on every machine and numpy)."""
    p = int(_MERSENNE_32)
    coefficients = [
        int.from_bytes(hashlib.sha256(f"fp4roll-minhash-{i}".encode()).digest()[:16], "big")
        for i in range(_NUM_PERM)
    ]
    a = np.array([1 + (c >> 64) % (p - 1) for c in coefficients], dtype=np.uint64)
    b = np.array([(c & ((1 << 64) - 1)) % p for c in coefficients], dtype=np.uint64)
    return a, b


_PERM_A, _PERM_B = _permutations()


def _minhash(shingles: np.ndarray) -> np.ndarray:
    # Mix the 40-bit shingle id down to 32 bits (uint64 arithmetic wraps), then a*x+b mod p.
    with np.errstate(over="ignore"):
        x = shingles * np.uint64(0x9E3779B97F4A7C15)
    x = x >> np.uint64(32)
    hashes = (_PERM_A[:, None] * x[None, :] + _PERM_B[:, None]) % _MERSENNE_32
    return hashes.min(axis=1)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


#: Per LSH bucket, a new member is compared with at most this many earlier members of the bucket
#: (the first ones): linear in the bucket size, not quadratic. Buckets up to this size give exactly
#: the pairwise result (the clusters are the connected components of the same checked edges).
_BUCKET_REPRESENTATIVES = 64


def near_duplicate_clusters(texts: Sequence[str], threshold: float) -> list[int]:
    """Cluster label (index of the cluster's first text) per normalised text; see module doc.

    Memory: one 64-value signature per text; shingle sets are rebuilt for the pairs the LSH
    proposes instead of being kept for every text. Work: per band, each member is checked against
    at most :data:`_BUCKET_REPRESENTATIVES` earlier members of its bucket."""
    signatures = (
        np.stack([_minhash(_shingles(t)) for t in texts]) if texts else np.zeros((0, _NUM_PERM))
    )
    uf = _UnionFind(len(texts))
    checked: set[tuple[int, int]] = set()
    shingle_cache: dict[int, np.ndarray] = {}

    def shingles(i: int) -> np.ndarray:
        if i not in shingle_cache:
            if len(shingle_cache) > 4096:
                shingle_cache.clear()
            shingle_cache[i] = _shingles(texts[i])
        return shingle_cache[i]

    # Candidates whose MinHash estimate is far below the threshold skip the exact check.
    estimate_floor = max(0.0, threshold - 0.25)
    for band in range(_BANDS):
        buckets: dict[bytes, list[int]] = defaultdict(list)  # key -> first members
        rows = signatures[:, band * _ROWS : (band + 1) * _ROWS]
        for j in range(len(texts)):
            representatives = buckets[rows[j].tobytes()]
            if representatives:
                estimates = (signatures[representatives] == signatures[j]).mean(axis=1)
                for offset in np.flatnonzero(estimates >= estimate_floor):
                    i = representatives[int(offset)]
                    if (i, j) in checked or uf.find(i) == uf.find(j):
                        continue
                    checked.add((i, j))
                    if _jaccard(shingles(i), shingles(j)) >= threshold:
                        uf.union(i, j)
            if len(representatives) < _BUCKET_REPRESENTATIVES:
                representatives.append(j)
    return [uf.find(i) for i in range(len(texts))]


#: Pre-sampling keeps at most this many prompts of the window (or 10x what the roles need, if
#: larger) before redaction and deduplication: memory and time are bounded whatever the window holds.
DEFAULT_MAX_CANDIDATES = 20_000


def candidate_capacity(config: SamplingConfig) -> int:
    return max(DEFAULT_MAX_CANDIDATES, 10 * config.total)


def presample(records: Iterable[PromptRecord], capacity: int, seed: int) -> list[PromptRecord]:
    """A uniform sample of at most ``capacity`` records in one pass and O(capacity) memory.

    Reservoir sampling with hashed priorities (bottom-k of ``sha256(seed, route, text)``): the
    choice depends on the content only, never on the order, ids or count of the input, so it is
    reproducible on any machine; identical prompts share a priority (kept or dropped together, then
    deduplicated). Returns the kept records ordered by (received_at, id)."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    heap: list[tuple[int, int, PromptRecord]] = []  # (-priority, tiebreak, record): max-heap
    for tiebreak, record in enumerate(records):
        digest = hashlib.sha256(f"{seed}\x00{record.route}\x00{record.text}".encode()).digest()
        priority = int.from_bytes(digest[:8], "big")
        if len(heap) < capacity:
            heapq.heappush(heap, (-priority, -tiebreak, record))
        elif priority < -heap[0][0]:
            heapq.heapreplace(heap, (-priority, -tiebreak, record))
    return sorted((r for _, _, r in heap), key=lambda r: (r.received_at, r.id))


def _allocate(available: Mapping[tuple[str, str], int], n: int) -> dict[tuple[str, str], int]:
    """Split ``n`` over strata proportionally to ``available`` (largest remainder, capped).

    When ``n`` covers every non-empty stratum, each first gets one prompt, so rare routes and
    lengths are represented rather than rounded away.
    """
    allocation = dict.fromkeys(available, 0)
    remaining = n
    non_empty = sorted(k for k, v in available.items() if v > 0)
    if 0 < len(non_empty) <= n:
        for k in non_empty:
            allocation[k] = 1
        remaining -= len(non_empty)
    while remaining > 0:
        open_strata = {
            k: available[k] - allocation[k] for k in available if available[k] > allocation[k]
        }
        if not open_strata:
            break
        total = sum(open_strata.values())
        shares = {k: remaining * v / total for k, v in open_strata.items()}
        floors = {k: min(int(s), open_strata[k]) for k, s in shares.items()}
        given = sum(floors.values())
        # Hand out the rest by largest remainder; ties broken by stratum key (deterministic).
        order = sorted(open_strata, key=lambda k: (-(shares[k] - floors[k]), k))
        for k in order:
            if given >= remaining:
                break
            if floors[k] < open_strata[k]:
                floors[k] += 1
                given += 1
        for k, v in floors.items():
            allocation[k] += v
        remaining -= given
        if given == 0:
            break
    return allocation


def calibration_digest(members: Iterable[SampledPrompt]) -> str:
    """SHA-256 over the ordered (role, route, rendered text, templated) of ``members``."""
    hasher = hashlib.sha256(DIGEST_VERSION.encode() + b"\n")
    for member in members:
        rendered = member.rendered
        line = json.dumps(
            [member.role.value, member.route, rendered.text, rendered.templated], ensure_ascii=False
        )
        hasher.update(line.encode("utf-8") + b"\n")
    return hasher.hexdigest()


def _stats(members: Sequence[SampledPrompt], labels: Sequence[str]) -> dict[str, Any]:
    routes = Counter(m.route for m in members)
    buckets = Counter(m.length_bucket for m in members)
    return {
        "count": len(members),
        "routes": dict(sorted(routes.items())),
        "length_histogram": {label: buckets.get(label, 0) for label in labels},
        "tokens": sum(m.token_count for m in members),
    }


def sample_calibration_set(
    records: Iterable[PromptRecord],
    config: SamplingConfig,
    render: Callable[[Prompt], RenderedPrompt] = plain_renderer,
    *,
    max_candidates: int | None = None,
) -> CalibrationSample:
    """Sample calibration, sensitivity and hold-out prompts, disjoint, from ``records`` in the
    config's window (see module doc); ``render`` turns a redacted prompt into what the server sees.
    ``records`` is consumed once as a stream: at most ``max_candidates`` (default
    :func:`candidate_capacity`) are kept by :func:`presample`, so memory is bounded.

    Raises ``NotEnoughPromptsError`` when fewer unique prompts than the three roles need exist.
    """
    labels = length_bucket_labels(config.length_edges)
    redactions: Counter[str] = Counter()
    by_digest: dict[str, _Candidate] = {}
    n_window = 0

    def in_window(stream: Iterable[PromptRecord]) -> Iterable[PromptRecord]:
        nonlocal n_window
        for record in stream:
            if config.in_window(record):
                n_window += 1
                yield record

    kept = presample(in_window(records), max_candidates or candidate_capacity(config), config.seed)
    n_input = 0
    n_exact = 0
    for record in kept:
        n_input += 1
        redacted_prompt, redacted_text, dedup_source = _redact_record(record, redactions)
        normalized = normalize_text(dedup_source)
        text_digest = hashlib.sha256(normalized.encode("utf-8")).hexdigest()
        tokens = approx_token_count(redacted_text)
        candidate = _Candidate(
            record=record,
            text=redacted_text,
            prompt=redacted_prompt,
            normalized=normalized,
            text_digest=text_digest,
            token_count=tokens,
            length_bucket=length_bucket(tokens, config.length_edges),
        )
        previous = by_digest.get(text_digest)
        if previous is not None:
            n_exact += 1
            if (record.received_at, record.id) >= (previous.record.received_at, previous.record.id):
                continue
        by_digest[text_digest] = candidate

    # Deterministic order independent of input order: by text digest.
    unique = sorted(by_digest.values(), key=lambda c: c.text_digest)
    clusters = near_duplicate_clusters(
        [c.normalized for c in unique], config.near_duplicate_threshold
    )
    representatives: dict[int, _Candidate] = {}
    for label, candidate in zip(clusters, unique, strict=True):
        best = representatives.get(label)
        key = (candidate.record.received_at, candidate.text_digest)
        if best is None or key < (best.record.received_at, best.text_digest):
            representatives[label] = candidate
    n_near = len(unique) - len(representatives)

    needed = config.total
    if len(representatives) < needed:
        raise NotEnoughPromptsError(
            f"need {needed} unique prompts ({config.calibration_size} calibration + "
            f"{config.sensitivity_size} sensitivity + {config.holdout_size} hold-out) "
            f"but the window has {len(representatives)} after deduplication "
            f"({n_input} prompts, {n_exact} exact and {n_near} near duplicates removed)"
        )

    strata: dict[tuple[str, str], list[_Candidate]] = defaultdict(list)
    for candidate in representatives.values():
        rank = hashlib.sha256(f"{config.seed}\x00{candidate.text_digest}".encode()).hexdigest()
        strata[(candidate.record.route, candidate.length_bucket)].append(
            dataclasses.replace(candidate, rank=rank)
        )
    for members in strata.values():
        members.sort(key=lambda c: c.rank)

    taken = dict.fromkeys(strata, 0)
    picks: dict[Role, list[_Candidate]] = {}
    for role, size in (
        (Role.HOLDOUT, config.holdout_size),
        (Role.SENSITIVITY, config.sensitivity_size),
        (Role.CALIBRATION, config.calibration_size),
    ):
        allocation = _allocate({k: len(v) - taken[k] for k, v in strata.items()}, size)
        picks[role] = [c for k, v in strata.items() for c in v[taken[k] : taken[k] + allocation[k]]]
        for k in strata:
            taken[k] += allocation[k]

    def _members(role: Role) -> tuple[SampledPrompt, ...]:
        ordered = sorted(picks[role], key=lambda c: c.rank)
        return tuple(
            SampledPrompt(
                prompt_id=c.record.id,
                role=role,
                position=position,
                route=c.record.route,
                length_bucket=c.length_bucket,
                token_count=c.token_count,
                text=c.text,
                rendered=render(c.prompt),
            )
            for position, c in enumerate(ordered)
        )

    calibration = _members(Role.CALIBRATION)
    sensitivity = _members(Role.SENSITIVITY)
    holdout = _members(Role.HOLDOUT)
    digest = calibration_digest(calibration + sensitivity + holdout)
    summary = {
        "input_prompts": n_input,
        "exact_duplicates_removed": n_exact,
        "near_duplicates_removed": n_near,
        "unique_prompts": len(representatives),
        "dedup": (
            f"exact: sha256(normalised text); near: MinHash {_NUM_PERM} perm, "
            f"{_SHINGLE_CHARS}-char shingles, LSH {_BANDS}x{_ROWS}, Jaccard >= "
            f"{config.near_duplicate_threshold}"
        ),
        "redactions": dict(sorted(redactions.items())),
        "length_buckets": labels,
        "strata": {f"{r}|{b}": len(v) for (r, b), v in sorted(strata.items())},
        "calibration": _stats(calibration, labels),
        "sensitivity": _stats(sensitivity, labels),
        "holdout": _stats(holdout, labels),
        "templated": sum(m.rendered.templated for m in calibration + sensitivity + holdout),
    }
    if n_window > n_input:  # the reservoir kept a uniform subset of a larger window
        summary["presampled_from"] = n_window
    logger.info(
        "sampled calibration set %s: %d calibration + %d sensitivity + %d hold-out from %d prompts",
        digest[:12],
        len(calibration),
        len(sensitivity),
        len(holdout),
        n_input,
    )
    return CalibrationSample(
        calibration=calibration,
        sensitivity=sensitivity,
        holdout=holdout,
        digest=digest,
        summary=summary,
        config=config,
    )
