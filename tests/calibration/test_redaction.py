"""PII redaction: every planted kind is replaced; ordinary numbers survive."""

from __future__ import annotations

import pytest

from calibration.redaction import PiiKind, find_pii, redact, redact_with_counts

PII_EXAMPLES = [
    (PiiKind.email, "write to jane.doe+billing@example.co.uk today"),
    (PiiKind.email, "Kontakt: müller.anna@posteo.example"),
    (PiiKind.phone, "call +1 415 555 0134 after 5pm"),
    (PiiKind.phone, "call (212) 555-0147"),
    (PiiKind.phone, "Tel. +49 30 12345678"),
    (PiiKind.phone, "mobile +33 6 12 34 56 78"),
    (PiiKind.phone, "number 555.867.5309 please"),
    (PiiKind.phone, "Festnetz 030 1234567"),
    (PiiKind.card, "card 4111 1111 1111 1111 expired"),
    (PiiKind.card, "card 5500-0000-0000-0004"),
    (PiiKind.card, "number 4012888888881881 declined"),
    (
        PiiKind.card,
        "Amex 3782 8224 6310 0050 ok",
    ),  # not Luhn-valid, but card-shaped: redacted anyway
    (PiiKind.secret, "key sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
    (PiiKind.secret, "aws AKIAIOSFODNN7EXAMPLE in config"),
    (PiiKind.secret, "token ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    (PiiKind.secret, 'API_KEY = "abc123def456ghi"'),
    (PiiKind.secret, "password: hunter2hunter2"),
    (PiiKind.secret, "Authorization: Bearer abcdef1234567890xyz"),
    (PiiKind.secret, "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N"),
    (PiiKind.secret, "xoxb-1234567890-abcdefghij slack"),
]


@pytest.mark.parametrize(("kind", "text"), PII_EXAMPLES)
def test_each_pii_kind_is_redacted(kind: PiiKind, text: str) -> None:
    result = redact_with_counts(text)
    assert result.counts.get(kind.value, 0) >= 1, result.text
    assert find_pii(result.text) == []
    assert f"[{kind.value.upper()}]" in result.text


@pytest.mark.parametrize(
    "text",
    [
        "Order 123456 from 2026-01-15 costs $1,299.99",
        "Python 3.11.4 listens on port 8080 at 192.168.0.1",
        "for i in range(1000): total += i * 42",
        "Use os.path.join and json.dumps(obj, indent=2)",
        "Translate into French: the quick brown fox.",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert redact(text) == text


def test_mixed_text_keeps_its_shape() -> None:
    text = (
        "Hi, I'm anna.berg@example.com, +44 20 7946 0958, card 4111-1111-1111-1111, "
        "key AKIAABCDEFGHIJKLMNOP. Order 424242."
    )
    result = redact_with_counts(text)
    assert result.text == ("Hi, I'm [EMAIL], [PHONE], card [CARD], key [SECRET]. Order 424242.")
    assert result.counts == {"email": 1, "phone": 1, "card": 1, "secret": 1}
    assert result.total == 4
    assert redact(result.text) == result.text  # idempotent
