"""Task metrics on greedy generations, per route family (no reference answers: the baseline's answer is
the reference, as in Dutta et al., "Accuracy is not all you need": flips matter, not only averages).

A route's family comes from its name (:func:`route_family`, overridable by a mapping). Per request,
:func:`task_metrics` returns flat per-request values, NaN where a metric does not apply:

* ``task_quality_{baseline,candidate}``: 1/0, the answer is usable for its family — valid JSON
  object (extraction), code that parses with :func:`ast.parse` (code: every fenced Python block;
  an answer without code counts as usable prose), a non-empty answer that is not a refusal (all);
* ``refusal_{side}``, ``empty_{side}``: 1/0 for every family;
* ``task_agreement``: extraction — share of the baseline JSON's fields the candidate reproduces;
  classification — the normalised labels are equal (1/0);
* ``answer_flip``: extraction/classification — 1 when the candidate's answer differs from the
  baseline's (any field or the label), else 0.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any


class RouteFamily(str, Enum):
    EXTRACTION = "extraction"
    CLASSIFICATION = "classification"
    CODE = "code"
    CHAT = "chat"  # free text: chat, summaries, translation


_FAMILY_HINTS = (
    (("extract", "json", "parse"), RouteFamily.EXTRACTION),
    (("classif", "label", "intent", "sentiment", "triage"), RouteFamily.CLASSIFICATION),
    (("code", "sql", "program"), RouteFamily.CODE),
)

_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i|i can(?:no|')t|i cannot|i am unable|"
    r"i'?m unable|i won'?t|as an ai\b|i'?m not able|i am not able)",
    re.IGNORECASE,
)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def route_family(
    route: str | None, overrides: Mapping[str, RouteFamily] | None = None
) -> RouteFamily:
    """The family of ``route`` (``overrides`` first, then name hints; unknown → chat)."""
    if route is None:
        return RouteFamily.CHAT
    if overrides and route in overrides:
        return RouteFamily(overrides[route])
    name = route.lower()
    for hints, family in _FAMILY_HINTS:
        if any(h in name for h in hints):
            return family
    return RouteFamily.CHAT


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text))


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object an answer carries (bare, or in one fenced block), else None."""
    candidates = [text.strip()]
    candidates += [m.group(2).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def code_parses(text: str) -> float:
    """1.0 when the answer's Python code parses, 0.0 when it does not, NaN when it has no code.

    Code is every fenced block tagged python/py or untagged; an answer without a fence counts as
    code only when it parses as a module with at least one def/class/import statement."""
    blocks = [
        m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in ("", "python", "py")
    ]
    if not blocks:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return math.nan
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
        return 1.0 if any(isinstance(node, kinds) for node in tree.body) else math.nan
    for block in blocks:
        try:
            ast.parse(block)
        except (SyntaxError, ValueError):
            return 0.0
    return 1.0


def normalize_label(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"[^a-z0-9 _-]", "", first.lower()).strip()


def _usable(family: RouteFamily, text: str) -> float:
    if not text.strip() or is_refusal(text):
        return 0.0
    if family is RouteFamily.EXTRACTION:
        return 1.0 if parse_json_object(text) is not None else 0.0
    if family is RouteFamily.CODE:
        parses = code_parses(text)
        return 1.0 if math.isnan(parses) else parses  # prose without code is a usable answer
    return 1.0


def _normal(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    return value


def _normalized(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _normal(v) for k, v in obj.items()}


def task_metrics(family: RouteFamily, baseline: str, candidate: str) -> dict[str, float]:
    """Per-request task metrics of one pair of answers (see the module docstring)."""
    nan = math.nan
    out = {
        "task_quality_baseline": _usable(family, baseline),
        "task_quality_candidate": _usable(family, candidate),
        "refusal_baseline": float(is_refusal(baseline)),
        "refusal_candidate": float(is_refusal(candidate)),
        "empty_baseline": float(not baseline.strip()),
        "empty_candidate": float(not candidate.strip()),
        "task_agreement": nan,
        "answer_flip": nan,
    }
    if family is RouteFamily.EXTRACTION:
        base_obj, cand_obj = parse_json_object(baseline), parse_json_object(candidate)
        if base_obj is not None:
            if cand_obj is None:
                agreement = 0.0
            elif not base_obj:
                agreement = 1.0 if not cand_obj else 0.0
            else:
                same = sum(
                    1
                    for k, v in base_obj.items()
                    if k in cand_obj and _normal(cand_obj[k]) == _normal(v)
                )
                agreement = same / len(base_obj)
            out["task_agreement"] = agreement
            same_answer = cand_obj is not None and _normalized(cand_obj) == _normalized(base_obj)
            out["answer_flip"] = 0.0 if same_answer else 1.0
    elif family is RouteFamily.CLASSIFICATION:
        same = normalize_label(baseline) == normalize_label(candidate)
        out["task_agreement"] = float(same)
        out["answer_flip"] = float(not same)
    return out


#: Judge metric name → (baseline key, candidate key) in :func:`task_metrics`' output; ``None``
#: baseline key: a candidate-only metric (already relative to the baseline).
TASK_JUDGE_METRICS: dict[str, tuple[str | None, str]] = {
    "task_quality": ("task_quality_baseline", "task_quality_candidate"),
    "refusal_rate": ("refusal_baseline", "refusal_candidate"),
    "empty_rate": ("empty_baseline", "empty_candidate"),
    "task_agreement": (None, "task_agreement"),
    "answer_flip": (None, "answer_flip"),
}


def family_judge_metrics(family: RouteFamily) -> tuple[str, ...]:
    """The task judge metrics that apply to a family (the others are NaN for every request)."""
    common = ("task_quality", "refusal_rate", "empty_rate")
    if family in (RouteFamily.EXTRACTION, RouteFamily.CLASSIFICATION):
        return (*common, "task_agreement", "answer_flip")
    return common
