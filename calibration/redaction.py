"""PII and secret redaction for prompt text, on well-kept detectors.

Applied before anything derived from a prompt is stored (calibration sets) or logged. Each finding is
replaced by a typed placeholder (``[EMAIL]``, ``[PHONE]``, ``[SECRET]``, ``[CARD]``, ``[IBAN]``,
``[SSN]``, ``[IP]``), so the text keeps its shape for calibration while the value is gone.

Detectors (no NER model: spaCy models are not on PyPI, so names are not detected):

* **Presidio** pattern recognizers with their validation: credit cards (Luhn; plus Amex 4-6-5 and
  compact 13-19 digit shapes, still Luhn-checked), IBAN (ISO 7064 checksum and per-country format),
  US SSN (invalid area/group/serial refused), IPv4/IPv6 (``ipaddress``-validated), e-mail (public
  suffix list, read from tldextract's bundled snapshot: nothing is fetched).
* **phonenumbers** ``PhoneNumberMatcher`` at ``Leniency.VALID`` for ``PHONE_REGIONS`` (national
  formats, e.g. US numbers written with spaces, and any ``+CC`` international number); in the US
  region also possible-but-unassigned numbers written in the 3-3-4 grouping (``555.867.5309``).
* **detect-secrets** plugins: keyword assignments (``DB_PASSWORD=…``, ``"secret": "…"``),
  Base64/hex high-entropy strings, AWS, Azure, GitHub, GitLab, Slack, Stripe, Twilio, SendGrid,
  npm, PyPI, Discord, Telegram, Mailchimp, Square, OpenAI keys, JWTs, private keys (the whole PEM
  block), credentials in URLs. Three small plugins written against detect-secrets' own
  ``RegexBasedDetector`` add what 1.5 lacks: ``Authorization:`` headers (Basic / Bearer / Token),
  assignments of ``*token*`` / ``*auth*`` / ``*credential*`` names, and vendor prefixes it does not
  know (``sk-proj-``, ``sk_test_``, ``AIza``, ``hf_``, ``glpat-`` …).

Cost is bounded and deterministic, whatever the input:

* Input is capped at ``MAX_REDACT_CHARS``; the rest is dropped and marked ``[TRUNCATED]``.
* Detectors never scan the whole text. Cheap linear trigger scans (``@``, digit runs, keywords,
  long tokens, ``PRIVATE KEY``) select short snippets (bounded length); the library detectors run
  on those only. Each detector family has a budget of snippets per prompt; snippets past the budget
  are not scanned but replaced whole by ``[REDACTED]`` (kind ``unscanned``): adversarial input costs
  calibration text, never a leak and never minutes. Budgets count snippets, not seconds, so the
  output is identical on every machine.

A false positive costs a few calibration tokens; a false negative leaks data: where the two
conflict the redactor errs towards redacting (secret spans are widened to the whole token).
``REDACTOR_VERSION`` changes whenever the output for some input may change (stored redactions
keyed by it are recomputed).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
import string
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibration.prompts import flatten_messages

REDACTOR_VERSION = "fp4roll-redactor-2"
MAX_REDACT_CHARS = 64 * 1024  # longer input is truncated before detection (and marked)


class PiiKind(str, enum.Enum):
    secret = "secret"
    card = "card"
    iban = "iban"
    ssn = "ssn"
    email = "email"
    phone = "phone"
    ip = "ip"
    unscanned = "unscanned"  # over a detector's budget: replaced whole, never scanned


PLACEHOLDERS: Mapping[PiiKind, str] = {
    PiiKind.secret: "[SECRET]",
    PiiKind.card: "[CARD]",
    PiiKind.iban: "[IBAN]",
    PiiKind.ssn: "[SSN]",
    PiiKind.email: "[EMAIL]",
    PiiKind.phone: "[PHONE]",
    PiiKind.ip: "[IP]",
    PiiKind.unscanned: "[REDACTED]",
}
_PLACEHOLDER_TEXTS = frozenset(PLACEHOLDERS.values())
TRUNCATION_MARK = " [TRUNCATED]"
# When two findings overlap, the merged span takes the kind listed first.
_PRIORITY = {kind: rank for rank, kind in enumerate(PiiKind)}

PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN")
# Snippet budgets per prompt (see module doc).
MAX_NUMBER_SNIPPETS = 64  # digit runs checked for cards, SSNs, phones, IPv4
MAX_EMAIL_SNIPPETS = 64
MAX_KEYWORD_SNIPPETS = 128
MAX_IPV6_SNIPPETS = 32
MAX_IBAN_SNIPPETS = 32
# Candidate-line characters given to the secret plugins (chunks overlap, hence twice the cap).
MAX_SECRET_LINE_CHARS = 2 * MAX_REDACT_CHARS

_SNIPPET_CHARS = 512  # longest snippet the e-mail, IBAN and IPv6 detectors are given
_NUMBER_WINDOW = 48  # digit runs longer than this are checked in overlapping windows
_SECRET_CHUNK = 2048  # candidate lines are scanned in chunks of this many characters
_CONTEXT_CHARS = 40  # weak matches (bare 9-digit SSN) need a context word this close before them
_RESERVED_EMAIL_TLDS = frozenset(
    {"example", "test", "invalid", "localhost", "local", "internal", "corp", "lan", "home"}
)


@dataclass(frozen=True)
class RedactionResult:
    """Redacted text and how many spans of each kind were replaced."""

    text: str
    counts: Mapping[str, int] = field(default_factory=dict)
    truncated_chars: int = 0  # characters dropped past MAX_REDACT_CHARS

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    kind: PiiKind


# --------------------------------------------------------------------------------------------------
# Library detectors, built once (importing Presidio is slow: lazily, on first use)

_build_lock = threading.Lock()


def _import_presidio() -> Any:
    """Presidio's recognizers module, imported without its optional NER back ends.

    ``presidio_analyzer/__init__`` imports every NLP engine, and the transformers one pulls in
    transformers and torch when they are installed (tens of seconds, nothing we use: no NER here).
    Its optional imports are guarded by ``ImportError``, so they are masked for the duration of the
    import when not already loaded.
    """
    masked = [name for name in ("transformers", "torch") if name not in sys.modules]
    for name in masked:
        sys.modules[name] = None  # type: ignore[assignment] - makes `import name` raise ImportError
    try:
        from presidio_analyzer import predefined_recognizers
    finally:
        for name in masked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return predefined_recognizers


@dataclass(frozen=True)
class _Detectors:
    card: Any
    iban: Any
    ssn: Any
    ip: Any
    email: Any
    keyword: Any
    keyword_regexes: Mapping[Any, int]
    token_plugins: tuple[Any, ...]
    entropy_plugins: tuple[tuple[Any, int], ...]  # (plugin, minimum run length)
    private_key_regexes: tuple[re.Pattern[str], ...]


@functools.cache
def _detectors() -> _Detectors:
    with _build_lock:
        return _build_detectors()


def _build_detectors() -> _Detectors:
    recognizers = _import_presidio()
    import tldextract
    from detect_secrets.plugins import (
        aws,
        azure_storage_key,
        basic_auth,
        discord,
        github_token,
        gitlab_token,
        high_entropy_strings,
        jwt,
        keyword,
        mailchimp,
        npm,
        openai,
        private_key,
        pypi_token,
        sendgrid,
        slack,
        square_oauth,
        stripe,
        telegram_token,
        twilio,
    )
    from detect_secrets.plugins.base import RegexBasedDetector
    from presidio_analyzer import Pattern

    # The bundled public-suffix snapshot only: tldextract would otherwise try to download the list.
    offline_tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class EmailRecognizer(recognizers.EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            domain = pattern_text.rpartition("@")[2].lower()
            if domain.rpartition(".")[2] in _RESERVED_EMAIL_TLDS:
                return True  # reserved / internal names are still somebody's address
            return offline_tld(domain).fqdn != ""

    card_patterns = [
        *recognizers.CreditCardRecognizer.PATTERNS,
        Pattern("Amex 4-6-5", r"\b3[47]\d{2}[- ]?\d{6}[- ]?\d{5}\b", 0.3),
        Pattern("Compact 13-19 digits", r"\b\d{13,19}\b", 0.3),
    ]

    class AuthorizationHeaderDetector(RegexBasedDetector):
        """``Authorization: Basic|Bearer|Token …`` and API-key headers (any case, quoted or not)."""

        secret_type = "Authorization Header"
        denylist = (
            re.compile(
                r"(?i)\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
                r"(?:(?:basic|bearer|token|digest|negotiate|apikey|api-key|sso-key)\s+)?"
                r"(?!(?:basic|bearer|token|digest|negotiate)\b)([A-Za-z0-9+/=._~\-:]{6,})"
            ),
            re.compile(r"(?i)\b(?:bearer|basic)\s+([A-Za-z0-9+/=._~\-]{16,})"),
            re.compile(r"(?i)\bx-(?:api|auth)-(?:key|token)[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{6,})"),
        )

    class CredentialAssignmentDetector(RegexBasedDetector):
        """``*token*`` / ``*auth*`` / ``*credential*`` names assigned a value (not in detect-secrets'
        keyword list): ``GITHUB_TOKEN=…``, ``"access_token": "…"``, ``auth_key: …``."""

        secret_type = "Credential Assignment"
        denylist = (
            # Only ``=`` / ``:`` style assignments (detect-secrets' helper also takes a bare space,
            # which turns prose like "the token expired" into a finding).
            re.compile(
                r"(?i)(?<![A-Za-z0-9])[A-Za-z0-9_.\-]{0,40}?"
                r"(?:token|auth[_-]?(?:key|token|code|secret)|credentials?|session[_-]?id|"
                r"passphrase|access[_-]?key(?:[_-]?id)?|client[_-]?secret)"
                r"[\"']?\]?\s*(?::=|=>|=|:)\s*[\"']?([^\s\"',;]{6,})"
            ),
        )

    class VendorTokenDetector(RegexBasedDetector):
        """Key prefixes detect-secrets 1.5 does not know (or knows only in a narrower form)."""

        secret_type = "Vendor Token"
        denylist = (
            re.compile(r"\bsk-(?:proj-|svcacct-|admin-|ant-(?:api\d\d-)?)?[A-Za-z0-9_\-]{20,}"),
            re.compile(r"\b(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{10,}"),
            re.compile(r"\bwhsec_[0-9A-Za-z]{20,}"),
            re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"),
            re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
            re.compile(r"\bgh[pousr]_[A-Za-z0-9_]{20,}"),
            re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
            re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
            re.compile(r"\bnpm_[A-Za-z0-9]{30,}"),
            re.compile(r"\bASIA[0-9A-Z]{16}\b|\bAKIA[0-9A-Z]{16}\b"),
        )

    keyword_regexes: dict[Any, int] = {}
    for table in (
        keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP,
        keyword.CONFIG_DENYLIST_REGEX_TO_GROUP,
    ):
        keyword_regexes.update(table)
    token_plugins = (
        aws.AWSKeyDetector(),
        azure_storage_key.AzureStorageKeyDetector(),
        basic_auth.BasicAuthDetector(),
        discord.DiscordBotTokenDetector(),
        github_token.GitHubTokenDetector(),
        gitlab_token.GitLabTokenDetector(),
        jwt.JwtTokenDetector(),
        mailchimp.MailchimpDetector(),
        npm.NpmDetector(),
        openai.OpenAIDetector(),
        pypi_token.PypiTokenDetector(),
        sendgrid.SendGridDetector(),
        slack.SlackDetector(),
        square_oauth.SquareOAuthDetector(),
        stripe.StripeDetector(),
        telegram_token.TelegramBotTokenDetector(),
        twilio.TwilioKeyDetector(),
        AuthorizationHeaderDetector(),
        CredentialAssignmentDetector(),
        VendorTokenDetector(),
    )
    return _Detectors(
        card=recognizers.CreditCardRecognizer(patterns=card_patterns),
        iban=recognizers.IbanRecognizer(),
        ssn=recognizers.UsSsnRecognizer(),
        ip=recognizers.IpRecognizer(),
        email=EmailRecognizer(),
        keyword=keyword.KeywordDetector(),
        keyword_regexes=keyword_regexes,
        token_plugins=token_plugins,
        entropy_plugins=(
            (high_entropy_strings.Base64HighEntropyString(), 20),
            (high_entropy_strings.HexHighEntropyString(), 20),
        ),
        private_key_regexes=tuple(private_key.PrivateKeyDetector.denylist),
    )


# --------------------------------------------------------------------------------------------------
# Trigger scans (linear, stdlib ``re`` with bounded quantifiers) and snippet helpers

_WS_RE = re.compile(r"\s+")
_NUMBER_RUN_RE = re.compile(r"\+?\(?\d(?:[ \t.\-/()]{1,3}\d|\d)*\)?")
# Two colons with hex digits around them and at least one decimal digit somewhere (``std::`` and
# ``10:30`` are not candidates; ``fe80::1``, ``2001:db8:0:1::7``, ``::ffff:192.0.2.1`` are).
_IPV6_TRIGGER_RE = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]{0,48}")
_IBAN_TRIGGER_RE = re.compile(r"\b[A-Z]{2}\d{2}(?:[ \-]?[A-Z0-9]){8}")
# ASCII-only lower-casing keeps every offset (str.lower can change the length of some text).
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# detect-secrets' keyword DENYLIST as a trigger on the lowered text (the detector runs on snippets).
_KEYWORD_TRIGGER_RE = re.compile(
    r"password|passwd|pwd|secret|api_?key|auth_?key|service_?key|account_?key|db_?key|"
    r"database_?key|priv_?key|private_?key|client_?key|db_?pass|database_?pass|key_?pass|"
    r"contrase[ñn]a"
)
# Lines worth giving to the token-shaped secret plugins: a long token, a URL, a credential word.
_SECRET_LINE_TRIGGER_RE = re.compile(
    r"\S{16,}|://|token|auth|bearer|basic|credential|secret|passphrase|session|key"
)
_CARD_SHAPE_RE = re.compile(r"\d(?:[ \-]?\d){12,18}")
_SSN_SHAPE_RE = re.compile(r"\d{3}[ .\-]?\d{2}[ .\-]?\d{4}")
_IPV4_SHAPE_RE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_TOKEN_CHARS_LEFT = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-.~%"
)
_TOKEN_CHARS_RIGHT = _TOKEN_CHARS_LEFT | {"="}


def _widen_secret(text: str, start: int, end: int) -> tuple[int, int]:
    """Grow a secret span to the whole run of token characters it sits in (at most 1024 each way)."""
    stop = max(0, start - 1024)
    while start > stop and text[start - 1] in _TOKEN_CHARS_LEFT:
        start -= 1
    stop = min(len(text), end + 1024)
    while end < stop and text[end] in _TOKEN_CHARS_RIGHT:
        end += 1
    while end > start + 1 and text[end - 1] == ".":  # sentence punctuation after the token
        end -= 1
    return start, end


def _merge_ranges(
    ranges: Iterable[tuple[int, int]], max_length: int | None = None, gap: int = 0
) -> list[tuple[int, int]]:
    """Overlapping ranges merged, but never into one longer than ``max_length`` (then they are
    kept as separate, overlapping snippets: a detector's work per snippet stays bounded)."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if (
            merged
            and start <= merged[-1][1] + gap
            and (max_length is None or max(end, merged[-1][1]) - merged[-1][0] <= max_length)
        ):
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class _Budget:
    """Counts snippets of one detector family; past the limit a snippet is redacted, not scanned."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0


def _presidio(recognizer: Any, snippet: str, offset: int, kind: PiiKind) -> Iterator[_Span]:
    for result in recognizer.analyze(snippet, recognizer.supported_entities):
        if result.score >= 0.5:
            yield _Span(offset + result.start, offset + result.end, kind)


def _scan_snippets(
    text: str, ranges: list[tuple[int, int]], limit: int, recognizer: Any, kind: PiiKind
) -> Iterator[_Span]:
    """Run a Presidio recognizer on the merged ``ranges`` (each <= ``_SNIPPET_CHARS``), at most
    ``limit`` of them; the rest are redacted whole as ``unscanned``."""
    budget = _Budget(limit)
    for start, end in _merge_ranges(ranges, max_length=_SNIPPET_CHARS):
        if budget.take():
            yield from _presidio(recognizer, text[start:end], start, kind)
        else:
            yield _Span(start, end, PiiKind.unscanned)


# --------------------------------------------------------------------------------------------------
# Detector families


def _private_keys(text: str, det: _Detectors) -> Iterator[_Span]:
    """PEM / OpenSSH / PGP / PuTTY private keys: from the header line to the END line (or the end)."""
    if "PRIVATE KEY" not in text and "PuTTY-User-Key-File" not in text:
        return
    for regex in det.private_key_regexes:
        for match in regex.finditer(text):
            start = text.rfind("\n", 0, match.start()) + 1
            end_marker = text.find("-----END", match.end())
            if end_marker < 0:
                end = len(text)
            else:
                newline = text.find("\n", end_marker)
                end = len(text) if newline < 0 else newline
            yield _Span(start, end, PiiKind.secret)


def _secret_lines(text: str, lowered: str) -> list[tuple[int, int]]:
    """Ranges of lines with a long token, a URL or a credential word, in chunks of bounded size."""
    ranges = []
    for match in _SECRET_LINE_TRIGGER_RE.finditer(lowered):
        start = text.rfind("\n", 0, match.start()) + 1
        newline = text.find("\n", match.end())
        ranges.append((start, len(text) if newline < 0 else newline))
    chunks = []
    for start, end in _merge_ranges(ranges, gap=1):  # consecutive lines form one range
        # Overlapping chunks: a token up to 256 characters long lies whole in one of them.
        position = start
        while True:
            chunks.append((position, min(end, position + _SECRET_CHUNK)))
            if position + _SECRET_CHUNK >= end:
                break
            position += _SECRET_CHUNK - 256
    return chunks


def _plugin_spans(plugin: Any, snippet: str) -> Iterator[tuple[int, int]]:
    """Spans where a detect-secrets regex plugin fires, confirmed by the plugin itself.

    The plugin's own denylist regexes locate the match (its ``analyze_string`` yields values only);
    the value must then pass the plugin's ``analyze_string`` again, which keeps plugin-specific
    validation (a JWT must decode). The span is the matched groups, or the whole match.
    """
    for regex in plugin.denylist:
        for match in regex.finditer(snippet):
            groups = [i for i in range(1, (match.lastindex or 0) + 1) if match.group(i)]
            if groups:
                start, end = match.start(groups[0]), match.end(groups[-1])
            else:
                start, end = match.span()
            if end <= start or snippet[start:end] in _PLACEHOLDER_TEXTS:
                continue
            if next(iter(plugin.analyze_string(match.group(0))), None) is not None:
                yield start, end


def _secrets(text: str, lowered: str, det: _Detectors) -> Iterator[_Span]:
    budget = MAX_SECRET_LINE_CHARS
    for start, end in _secret_lines(text, lowered):
        if budget <= 0:
            yield _Span(start, end, PiiKind.unscanned)
            continue
        budget -= end - start
        snippet = text[start:end]
        for plugin in det.token_plugins:
            for s, e in _plugin_spans(plugin, snippet):
                yield _Span(*_widen_secret(text, start + s, start + e), PiiKind.secret)
        for plugin, min_length in det.entropy_plugins:
            for token in re.finditer(rf"\S{{{min_length},}}", snippet):
                for run in re.finditer(
                    f"[{re.escape(plugin.charset)}]{{{min_length},}}", token.group()
                ):
                    if plugin.calculate_shannon_entropy(run.group()) > plugin.entropy_limit:
                        s = start + token.start() + run.start()
                        yield _Span(*_widen_secret(text, s, s + len(run.group())), PiiKind.secret)


def _keyword_assignments(text: str, lowered: str, det: _Detectors) -> Iterator[_Span]:
    """detect-secrets' KeywordDetector (config and quoted forms) around each keyword occurrence."""
    budget = _Budget(MAX_KEYWORD_SNIPPETS)
    for match in _KEYWORD_TRIGGER_RE.finditer(lowered):
        line_start = text.rfind("\n", 0, match.start()) + 1
        newline = text.find("\n", match.end())
        line_end = len(text) if newline < 0 else newline
        start, end = max(line_start, match.start() - 80), min(line_end, match.end() + 128)
        if not budget.take():
            yield _Span(match.start(), end, PiiKind.unscanned)
            continue
        # Start at the keyword's word (``DB_PASSWORD``), so the first hit is this occurrence's.
        word_start = match.start()
        while word_start > max(line_start, match.start() - 40) and (
            text[word_start - 1].isalnum() or text[word_start - 1] == "_"
        ):
            word_start -= 1
        for snippet_start, snippet in (
            (word_start, text[word_start:end]),
            (start, text[start : match.end()]),
        ):
            for value in det.keyword.analyze_string(
                snippet, denylist_regex_to_group=det.keyword_regexes
            ):
                if not value or value in _PLACEHOLDER_TEXTS:
                    continue
                at = snippet.find(value)
                if at >= 0:
                    s = snippet_start + at
                    yield _Span(*_widen_secret(text, s, s + len(value)), PiiKind.secret)


def _emails(text: str, det: _Detectors) -> Iterator[_Span]:
    ranges = []
    position = text.find("@")
    while position >= 0:
        # Local part <= 64, domain <= 255 characters (RFC 5321); the regex cannot cross whitespace.
        ranges.append((max(0, position - 65), min(len(text), position + 256)))
        position = text.find("@", position + 1)
    yield from _scan_snippets(text, ranges, MAX_EMAIL_SNIPPETS, det.email, PiiKind.email)


def _is_phone_grouping(raw: str) -> bool:
    """A US 3-3-4 grouping (``555.867.5309``, ``(555) 867-5309``): phone-shaped even if unassigned."""
    digits = [c for c in raw if c.isdigit()]
    return len(digits) in (10, 11) and any(not c.isdigit() for c in raw.strip("+"))


@functools.lru_cache(maxsize=4096)
def _phone_spans(snippet: str) -> tuple[tuple[int, int], ...]:
    """Phone numbers in ``snippet`` (cached: logs repeat the same numbers)."""
    import phonenumbers

    found = []
    # International numbers (+CC) are found in any region's pass; national formats need their
    # region: a leading trunk 0 (030 …, 020 …, 06 …) is tried in every region, else US and IN.
    if "+" in snippet:
        # An explicit +CC number is phone-shaped by construction: possible is enough (fictional
        # ranges such as +44 7700 900xxx are not "valid" but are written like real numbers).
        for match in phonenumbers.PhoneNumberMatcher(
            snippet, "US", leniency=phonenumbers.Leniency.POSSIBLE
        ):
            if match.raw_string.lstrip("(").startswith("+"):
                found.append((match.start, match.end))
        regions: tuple[str, ...] = ("US",)
    elif re.search(r"(?<!\d)\(?0\d", snippet):
        regions = PHONE_REGIONS
    else:
        regions = ("US", "IN")
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(
            snippet, region, leniency=phonenumbers.Leniency.VALID
        ):
            found.append((match.start, match.end))
    for match in phonenumbers.PhoneNumberMatcher(
        snippet, "US", leniency=phonenumbers.Leniency.POSSIBLE
    ):
        if _is_phone_grouping(match.raw_string):
            found.append((match.start, match.end))
    return tuple(found)


def _phones(snippet: str, offset: int) -> Iterator[_Span]:
    for start, end in _phone_spans(snippet):
        yield _Span(offset + start, offset + end, PiiKind.phone)


def _has_context(text: str, start: int, words: Iterable[str]) -> bool:
    before = text[max(0, start - _CONTEXT_CHARS) : start].lower()
    return any(word in before for word in words)


def _numbers(text: str, det: _Detectors) -> Iterator[_Span]:
    """Digit runs: cards (Luhn), SSNs, phone numbers, IPv4 addresses."""
    budget = _Budget(MAX_NUMBER_SNIPPETS)
    for run in _NUMBER_RUN_RE.finditer(text):
        digits = sum(c.isdigit() for c in run.group())
        if digits < 7 and run.group().count(".") < 3:
            continue  # too short for a phone, SSN or card; not an IPv4 shape
        start, end = max(0, run.start() - 1), min(len(text), run.end() + 1)
        windows = [(start, end)]
        if end - start > _NUMBER_WINDOW:
            step = _NUMBER_WINDOW // 2
            windows = [(p, min(end, p + _NUMBER_WINDOW)) for p in range(start, end - step, step)]
        for w_start, w_end in windows:
            if not budget.take():
                yield _Span(w_start, w_end, PiiKind.unscanned)
                continue
            snippet = text[w_start:w_end]
            # Shape checks pick which library detectors can fire here (each call costs ~0.1 ms).
            if _CARD_SHAPE_RE.search(snippet):
                yield from _presidio(det.card, snippet, w_start, PiiKind.card)
            if _IPV4_SHAPE_RE.search(snippet):
                yield from _presidio(det.ip, snippet, w_start, PiiKind.ip)
            if _SSN_SHAPE_RE.search(snippet):
                for result in det.ssn.analyze(snippet, det.ssn.supported_entities):
                    if result.score >= 0.5 or _has_context(
                        text, w_start + result.start, det.ssn.context
                    ):
                        yield _Span(w_start + result.start, w_start + result.end, PiiKind.ssn)
            if digits >= 7:
                yield from _phones(snippet, w_start)


def _ipv6(text: str, det: _Detectors) -> Iterator[_Span]:
    ranges = [
        (max(0, m.start() - 1), min(len(text), m.end() + 8))
        for m in _IPV6_TRIGGER_RE.finditer(text)
        if "::" in m.group() or m.group().count(":") >= 3
        if any(c.isdigit() for c in m.group())
    ]
    yield from _scan_snippets(text, ranges, MAX_IPV6_SNIPPETS, det.ip, PiiKind.ip)


def _ibans(text: str, det: _Detectors) -> Iterator[_Span]:
    ranges = [
        (max(0, m.start() - 1), min(len(text), m.start() + 48))
        for m in _IBAN_TRIGGER_RE.finditer(text)
    ]
    yield from _scan_snippets(text, ranges, MAX_IBAN_SNIPPETS, det.iban, PiiKind.iban)


def _kept_ip(value: str) -> bool:
    """Loopback, unspecified and reserved IPv6 addresses (``127.0.0.1``, ``::1``, ``::2``) identify
    nobody."""
    try:
        address = ipaddress.ip_interface(value.split("%")[0]).ip
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    # Reserved IPv6 space (``::2`` is a Python slice, not an address) unless it carries an IPv4.
    return address.version == 6 and address.is_reserved and address.ipv4_mapped is None


def _detect(text: str) -> list[_Span]:
    det = _detectors()
    lowered = text.translate(_ASCII_LOWER)
    spans: list[_Span] = [
        *_private_keys(text, det),
        *_secrets(text, lowered, det),
        *_keyword_assignments(text, lowered, det),
        *_emails(text, det),
        *_numbers(text, det),
        *_ipv6(text, det),
        *_ibans(text, det),
    ]
    return [
        s
        for s in spans
        if s.end > s.start and not (s.kind is PiiKind.ip and _kept_ip(text[s.start : s.end]))
    ]


def _resolve(spans: list[_Span]) -> list[_Span]:
    """Union of overlapping spans; each merged span takes the highest-priority kind in it."""
    merged: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            kind = min(last.kind, span.kind, key=_PRIORITY.__getitem__)
            merged[-1] = _Span(last.start, max(last.end, span.end), kind)
        else:
            merged.append(span)
    return merged


# --------------------------------------------------------------------------------------------------
# Public API


def redact_with_counts(text: str) -> RedactionResult:
    """``text`` (capped at ``MAX_REDACT_CHARS``) with every finding replaced by its placeholder."""
    truncated = max(0, len(text) - MAX_REDACT_CHARS)
    if truncated:
        text = text[:MAX_REDACT_CHARS]
    spans = _resolve(_detect(text))
    counts = Counter(span.kind.value for span in spans)
    pieces, position = [], 0
    for span in spans:
        pieces.append(text[position : span.start])
        pieces.append(PLACEHOLDERS[span.kind])
        position = span.end
    pieces.append(text[position:])
    if truncated:
        pieces.append(TRUNCATION_MARK)
    return RedactionResult(
        text="".join(pieces), counts=dict(sorted(counts.items())), truncated_chars=truncated
    )


def redact(text: str) -> str:
    """``text`` with PII and secrets replaced by placeholders (see module doc)."""
    return redact_with_counts(text).text


def find_pii(text: str) -> list[tuple[PiiKind, str]]:
    """Every span the detectors would redact in ``text`` (empty for already-redacted text)."""
    return [
        (span.kind, text[span.start : span.end])
        for span in _resolve(_detect(text[:MAX_REDACT_CHARS]))
    ]


__all__ = [
    "MAX_REDACT_CHARS",
    "PHONE_REGIONS",
    "PLACEHOLDERS",
    "REDACTOR_VERSION",
    "RedactedPrompt",
    "redact_prompt",
    "PiiKind",
    "RedactionResult",
    "find_pii",
    "redact",
    "redact_with_counts",
]


@dataclass(frozen=True)
class RedactedPrompt:
    """A logged prompt redacted: chat messages one by one (``messages``), or its plain ``text``."""

    text: str  # flattened "role: content" blocks for chat, the plain prompt otherwise
    messages: tuple[dict[str, str], ...] | None
    counts: dict[str, int]


def redact_prompt(
    messages: Sequence[Mapping[str, Any]] | None, prompt_text: str | None
) -> RedactedPrompt:
    """Redact a logged prompt: chat messages one by one (roles kept), or the plain text. The one
    implementation behind sampling and the store's once-per-prompt redaction."""
    counts: Counter[str] = Counter()

    def one(text: str) -> str:
        result = redact_with_counts(text)
        counts.update(result.counts)
        return result.text

    if messages is None:
        return RedactedPrompt(one(prompt_text or ""), None, dict(counts))
    redacted = tuple(
        {"role": str(m.get("role", "user")), "content": one(str(m.get("content", "")))}
        for m in messages
    )
    return RedactedPrompt(flatten_messages(redacted), redacted, dict(counts))
