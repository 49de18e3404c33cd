"""PII redaction for prompt text: emails, phone numbers, API keys/tokens, payment card numbers.

Applied before anything derived from a prompt is stored (calibration sets) or logged. Each match is
replaced by a typed placeholder (``[EMAIL]``, ``[PHONE]``, ``[SECRET]``, ``[CARD]``), so the text keeps
its shape for calibration while the value is gone. Redaction is pattern based: it is deliberately
greedy (a false positive costs a token of calibration text, a false negative leaks data).

Order matters: secrets first (keys may contain digit runs and ``@``), then cards (long digit runs that
would otherwise look like phone numbers), then emails, then phones.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


class PiiKind(str, enum.Enum):
    secret = "secret"
    card = "card"
    email = "email"
    phone = "phone"


PLACEHOLDERS: Mapping[PiiKind, str] = {
    PiiKind.secret: "[SECRET]",
    PiiKind.card: "[CARD]",
    PiiKind.email: "[EMAIL]",
    PiiKind.phone: "[PHONE]",
}

_SECRET_PATTERNS = (
    # Vendor-shaped keys.
    r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{16,}",  # OpenAI / Stripe style
    r"\b(?:pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe publishable / restricted
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"\bAIza[0-9A-Za-z_\-]{30,}",  # Google API key
    r"\bhf_[A-Za-z0-9]{30,}",  # Hugging Face token
    r"\beyJ[A-Za-z0-9_\-]+\.eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+",  # JWT
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    # "Bearer <token>".
    r"(?<=\b[Bb]earer\s)[A-Za-z0-9_\-\.=+/]{12,}",
)
_SECRET_RE = re.compile("|".join(f"(?:{p})" for p in _SECRET_PATTERNS))
# key=value / key: value assignments of secret-named fields; group 1 (the name) is kept.
_SECRET_ASSIGNMENT_RE = re.compile(
    r"(?i)(\b(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|secret[_-]?key|"
    r"client[_-]?secret|password|passwd|token|secret)[\"']?\s{0,3}[:=]\s{0,3}[\"']?)"
    r"[^\s\"',;]{6,}"
)
# Cheap substring triggers: the regexes above only run on text containing one of these.
_SECRET_TRIGGERS = (
    "sk-",
    "pk_",
    "rk_",
    "AKIA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "xox",
    "AIza",
    "hf_",
    "eyJ",
    "PRIVATE KEY",
    "earer",
)
_ASSIGNMENT_TRIGGERS = ("key", "token", "secret", "pass")

# 13-19 digits, optionally grouped by single spaces or dashes.
_CARD_CANDIDATE_RE = re.compile(r"(?<![\w])\d(?:[ \-]?\d){12,18}(?![\w])")
_CARD_GROUPED_RE = re.compile(r"^\d{4}([ \-])\d{4}\1\d{4}\1\d{1,7}$")

_EMAIL_RE = re.compile(  # Unicode-aware (internationalised local parts and domains)
    r"(?<![\w.+\-])[\w.%+\-]+@[^\W_](?:[\w\-]*[^\W_])?"
    r"(?:\.[^\W_](?:[\w\-]*[^\W_])?)*\.[^\W\d_]{2,}"
)

_PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    # International: +CC then 6-14 more digits in groups separated by space, dot, dash or parens.
    r"\+\d{1,3}[\s.\-]?(?:\(\d{1,4}\)[\s.\-]?)?\d{1,4}(?:[\s.\-]?\d{2,4}){1,4}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    r"|\(\d{3}\)\s?\d{3}[\s.\-]\d{4}"
    r"|\d{3}[.\-]\d{3}[.\-]\d{4}"
    # European national formats with a leading 0: 030 1234567, 06 12 34 56 78, 0171-1234567
    r"|0\d{1,4}(?:[\s\-/]\d{2,8}){1,4}"
    r")(?![\w])"
)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _looks_like_card(candidate: str) -> bool:
    digits = re.sub(r"[ \-]", "", candidate)
    return _luhn_valid(digits) or bool(_CARD_GROUPED_RE.match(candidate))


def _phone_digit_count_ok(candidate: str) -> bool:
    digits = sum(ch.isdigit() for ch in candidate)
    return 7 <= digits <= 15


@dataclass(frozen=True)
class RedactionResult:
    """Redacted text and how many matches of each kind were replaced."""

    text: str
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def redact_with_counts(text: str) -> RedactionResult:
    """Replace every email, phone number, secret and card number in ``text`` by a placeholder."""
    counts: Counter[str] = Counter()

    def _sub_secret(match: re.Match[str]) -> str:
        counts[PiiKind.secret.value] += 1
        return PLACEHOLDERS[PiiKind.secret]

    def _sub_secret_assignment(match: re.Match[str]) -> str:
        counts[PiiKind.secret.value] += 1
        return match.group(1) + PLACEHOLDERS[PiiKind.secret]

    def _sub_card(match: re.Match[str]) -> str:
        if not _looks_like_card(match.group(0)):
            return match.group(0)
        counts[PiiKind.card.value] += 1
        return PLACEHOLDERS[PiiKind.card]

    def _sub_email(match: re.Match[str]) -> str:
        counts[PiiKind.email.value] += 1
        return PLACEHOLDERS[PiiKind.email]

    def _sub_phone(match: re.Match[str]) -> str:
        if not _phone_digit_count_ok(match.group(0)):
            return match.group(0)
        counts[PiiKind.phone.value] += 1
        return PLACEHOLDERS[PiiKind.phone]

    if any(trigger in text for trigger in _SECRET_TRIGGERS):
        text = _SECRET_RE.sub(_sub_secret, text)
    lowered = text.lower()
    if any(trigger in lowered for trigger in _ASSIGNMENT_TRIGGERS):
        text = _SECRET_ASSIGNMENT_RE.sub(_sub_secret_assignment, text)
    text = _CARD_CANDIDATE_RE.sub(_sub_card, text)
    text = _EMAIL_RE.sub(_sub_email, text)
    text = _PHONE_RE.sub(_sub_phone, text)
    return RedactionResult(text=text, counts=dict(counts))


def redact(text: str) -> str:
    """``text`` with PII replaced by placeholders (see module doc)."""
    return redact_with_counts(text).text


def find_pii(text: str) -> list[tuple[PiiKind, str]]:
    """Every PII-looking span left in ``text`` (used to check that redaction left nothing)."""
    found: list[tuple[PiiKind, str]] = []
    found += [(PiiKind.secret, m.group(0)) for m in _SECRET_RE.finditer(text)]
    found += [
        (PiiKind.secret, m.group(0))
        for m in _SECRET_ASSIGNMENT_RE.finditer(text)
        if not m.group(0).endswith(PLACEHOLDERS[PiiKind.secret])
    ]
    found += [
        (PiiKind.card, m.group(0))
        for m in _CARD_CANDIDATE_RE.finditer(text)
        if _looks_like_card(m.group(0))
    ]
    found += [(PiiKind.email, m.group(0)) for m in _EMAIL_RE.finditer(text)]
    found += [
        (PiiKind.phone, m.group(0))
        for m in _PHONE_RE.finditer(text)
        if _phone_digit_count_ok(m.group(0))
    ]
    return found
