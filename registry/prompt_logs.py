"""Production prompt logs: import (JSONL, gzip, SQL tables) and store operations for calibration sets.

Accepted JSONL line shapes (one JSON object per line):

* OpenAI chat-completions request: ``{"messages": [{"role": ..., "content": str | [parts]}], "model": ...}``
* plain prompt: ``{"prompt": "..."}``

Route: ``metadata.route``, ``route``, ``metadata.template`` or ``template`` (else ``"default"``).
Time: ``timestamp`` / ``received_at`` / ``created_at`` / ``created`` (top level or in ``metadata``), ISO
8601 or Unix seconds (milliseconds when > 1e12); naive ISO times are taken as UTC; a missing time
becomes the import time (counted in the report). Files are read as streams; gzip is detected by its
magic bytes, not the extension.

A bad line (invalid JSON, not UTF-8, empty, over the size limit, wrong shape, a time that does not
convert or lies more than ``MAX_FUTURE_SKEW`` after the import, anything else that fails while decoding
it) is reported with ``file:line`` and a reason, counted, and skipped; every valid line is stored. One
handler (``_Importer.take``) turns ANY exception raised while decoding one line or row into a bad line,
so no input can abort an import. Reasons never quote the line's values (they may hold PII): they name
the field and what is wrong with it. A batch the database refuses is retried row by row, so one
unstorable row costs that row only. Re-importing adds nothing:
each prompt has a ``content_digest`` = SHA-256 over canonical JSON of its content and route, unique in
the table, inserted with ``INSERT … ON CONFLICT DO NOTHING``.

Nothing here logs prompt contents (they may hold PII): only file names, line numbers and reasons.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url

from registry import db
from registry.schema import CalibrationSet, CalibrationSetMember, MemberRole, PromptLog

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

logger = logging.getLogger(__name__)

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB per JSONL line
DEFAULT_BATCH_SIZE = 500
MAX_REPORTED_BAD_LINES = 1000  # all are counted; this many are kept with file:line and reason
DEFAULT_ROUTE = "default"
# A line dated later than the import plus this skew is bad (clock skew between hosts is tolerated; a
# line from the future would move every "recent window" with it).
MAX_FUTURE_SKEW = dt.timedelta(minutes=5)
MAX_ROUTE_CHARS = 128
MAX_MODEL_CHARS = 256
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PROMPT_FIELDS = ("messages", "prompt", "route", "model", "timestamp")
_TIME_KEYS = ("timestamp", "received_at", "created_at", "created")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_GZIP_MAGIC = b"\x1f\x8b"

ProgressCallback = Callable[[str, int, int], None]  # (source, bytes done, bytes total)


class PromptShapeError(ValueError):
    """A JSON value that is not a prompt log line we understand."""


@dataclass(frozen=True)
class BadLine:
    source: str
    line: int  # 1-based; 0 means the whole source (unreadable file)
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class ImportReport:
    """Outcome of one import. ``exit_code``: 0 all lines ok, 2 partial success, 1 nothing valid."""

    sources: tuple[str, ...]
    lines: int
    imported: int
    duplicates: int
    bad: int
    bad_lines: tuple[BadLine, ...]
    missing_timestamps: int
    elapsed_seconds: float

    @property
    def valid(self) -> int:
        return self.imported + self.duplicates

    @property
    def exit_code(self) -> int:
        if self.bad == 0:
            return 0
        return 2 if self.valid > 0 else 1


@dataclass(frozen=True)
class ParsedPrompt:
    """A validated prompt log line, ready to insert."""

    content_digest: str
    received_at: dt.datetime
    route: str
    model: str | None
    messages: tuple[Mapping[str, str], ...] | None
    prompt_text: str | None
    token_count: int
    timestamp_missing: bool = False


@dataclass(frozen=True)
class LoggedPrompt:
    """A stored prompt as read back. ``text`` is the flattened prompt (see ``flatten_prompt``)."""

    id: int
    content_digest: str
    received_at: dt.datetime
    route: str
    model: str | None
    text: str
    token_count: int
    source: str
    messages: tuple[Mapping[str, Any], ...] | None = None
    # The stored redaction (``store_redactions``), None when missing; valid for ``redactor_version``.
    redactor_version: str | None = None
    redacted_text: str | None = None
    redacted_messages: tuple[Mapping[str, Any], ...] | None = None
    redaction_counts: Mapping[str, int] | None = None

    @property
    def content_intact(self) -> bool:
        """The raw content still hashes to its ``content_digest`` (not edited since the import), so
        a stored redaction of it still applies."""
        text = None if self.messages is not None else self.text
        return content_digest(self.route, self.messages, text) == self.content_digest


@dataclass(frozen=True)
class CalibrationMemberRow:
    prompt_log_id: int
    role: str  # "calibration" | "sensitivity" | "holdout"
    position: int
    route: str
    token_count: int
    redacted_text: str  # flattened "role: content" text
    rendered_text: str | None = None  # as the server sees it (None: a set from before rendering)
    templated: bool = False  # rendered by a chat template (special tokens already in the text)

    @property
    def prompt_text(self) -> str:
        """What a model is given: the rendered text, or the flattened one for an old set."""
        return self.rendered_text if self.rendered_text is not None else self.redacted_text


@dataclass(frozen=True)
class StoredCalibrationSet:
    id: int
    digest: str
    created_at: dt.datetime
    filters: Mapping[str, Any]
    size: int
    holdout_size: int
    seed: int
    summary: Mapping[str, Any]
    members: tuple[CalibrationMemberRow, ...] = field(default=())
    sensitivity_size: int = 0

    def role(self, role: str) -> tuple[CalibrationMemberRow, ...]:
        return tuple(m for m in self.members if m.role == role)


# --------------------------------------------------------------------------------------------------
# Parsing


def approx_token_count(text: str) -> int:
    """Word runs plus single punctuation marks; same rule as ``calibration.sampling``."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def flatten_prompt(messages: Sequence[Mapping[str, Any]] | None, prompt_text: str | None) -> str:
    """Plain text of a prompt: the text itself, or ``role: content`` blocks separated by blank lines."""
    if messages is None:
        return prompt_text or ""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def content_digest(
    route: str, messages: Sequence[Mapping[str, Any]] | None, text: str | None
) -> str:
    """SHA-256 over canonical JSON of the prompt content and route (no time, model or source)."""
    payload: dict[str, Any] = {"route": route}
    if messages is not None:
        payload["messages"] = [dict(m) for m in messages]
    else:
        payload["prompt"] = text
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_text(value: str, what: str) -> str:
    if "\x00" in value:
        raise PromptShapeError(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptShapeError(f"{what} is not encodable as UTF-8 (lone surrogate?)") from exc
    return value


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise PromptShapeError(f"messages[{index}]: text part without a string 'text'")
                parts.append(part["text"])
            # image/audio/file parts carry no text to calibrate on: skipped.
        return "\n".join(parts)
    if content is None:
        return ""
    raise PromptShapeError(
        f"messages[{index}].content must be a string or a list of parts, not {type(content).__name__}"
    )


def _normalise_messages(raw: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise PromptShapeError("'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise PromptShapeError(f"messages[{index}] is not an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise PromptShapeError(f"messages[{index}].role is not one of {sorted(CHAT_ROLES)}")
        text = _check_text(_content_text(message.get("content"), index), f"messages[{index}]")
        messages.append({"role": role, "content": text})
    if not any(m["content"].strip() for m in messages):
        raise PromptShapeError("every message is empty")
    return tuple(messages)


_MAX_ISO_CHARS = 64  # longer strings are not timestamps (and are not parsed at all)


def _parse_time(value: Any) -> dt.datetime:
    """A UTC datetime from a datetime, Unix seconds/milliseconds or ISO 8601 text.

    Raises ``PromptShapeError`` (never quoting the value) for anything that is not a representable
    time: NaN/inf, negative, out of range, over-long or malformed text, a UTC offset that pushes the
    time out of the calendar (``0001-01-01T00:00+01:00``).
    """
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, bool):
        raise PromptShapeError("timestamp is a boolean, not a time")
    elif isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise PromptShapeError("timestamp is not a finite number")
        if value < 0:
            raise PromptShapeError("timestamp is a negative Unix time")
        try:
            seconds = value / 1000 if value > 1e12 else value
            return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
        except (OverflowError, OSError, ValueError) as exc:
            raise PromptShapeError("timestamp is out of the representable range") from exc
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_ISO_CHARS:
            raise PromptShapeError(f"timestamp text is longer than {_MAX_ISO_CHARS} characters")
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError as exc:
            raise PromptShapeError("timestamp is not ISO 8601") from exc
    else:
        raise PromptShapeError(f"timestamp of type {type(value).__name__} is not a time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    try:
        return moment.astimezone(dt.timezone.utc)
    except (OverflowError, ValueError) as exc:
        raise PromptShapeError("timestamp is out of the representable range in UTC") from exc


def _first(obj: Mapping[str, Any], metadata: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for source in (metadata, obj):
        for key in keys:
            if source.get(key) is not None:
                return source[key]
    return None


def parse_prompt(obj: Any, *, now: dt.datetime | None = None) -> ParsedPrompt:
    """Validate one decoded log line. Raises ``PromptShapeError`` with the reason (never a value).

    ``now`` (default: the current time) stands in for a missing timestamp; a timestamp later than
    ``now + MAX_FUTURE_SKEW`` is refused. Other exceptions may escape on hostile input: callers that
    import many lines go through ``_Importer.take``, which turns any of them into a bad line.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    if not isinstance(obj, Mapping):
        raise PromptShapeError(f"expected a JSON object, got {type(obj).__name__}")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}

    messages: tuple[dict[str, str], ...] | None = None
    prompt_text: str | None = None
    if obj.get("messages") is not None:
        raw_messages = obj["messages"]
        if isinstance(raw_messages, str):  # a JSON column read from SQL
            try:
                raw_messages = json.loads(raw_messages)
            except json.JSONDecodeError as exc:
                raise PromptShapeError("'messages' is a string but not JSON") from exc
        messages = _normalise_messages(raw_messages)
    elif obj.get("prompt") is not None:
        if not isinstance(obj["prompt"], str):
            raise PromptShapeError(f"'prompt' must be a string, not {type(obj['prompt']).__name__}")
        if not obj["prompt"].strip():
            raise PromptShapeError("'prompt' is empty")
        prompt_text = _check_text(obj["prompt"], "prompt")
    else:
        raise PromptShapeError("neither 'messages' nor 'prompt'")

    route = _first(obj, metadata, ("route", "template"))
    if route is None:
        route = DEFAULT_ROUTE
    if not isinstance(route, str) or not route.strip():
        raise PromptShapeError(f"route must be a non-empty string, not {type(route).__name__}")
    route = _check_text(route.strip(), "route")
    if len(route) > MAX_ROUTE_CHARS:
        raise PromptShapeError(f"route longer than {MAX_ROUTE_CHARS} characters")

    model = obj.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise PromptShapeError(f"'model' must be a string, not {type(model).__name__}")
        model = _check_text(model, "model")[:MAX_MODEL_CHARS]

    raw_time = _first(obj, metadata, _TIME_KEYS)
    missing = raw_time is None
    received_at = now if missing else _parse_time(raw_time)
    if received_at > now + MAX_FUTURE_SKEW:
        raise PromptShapeError(
            f"timestamp is more than {int(MAX_FUTURE_SKEW.total_seconds() // 60)} minutes "
            "in the future"
        )

    text = flatten_prompt(messages, prompt_text)
    return ParsedPrompt(
        content_digest=content_digest(route, messages, prompt_text),
        received_at=received_at,
        route=route,
        model=model,
        messages=messages,
        prompt_text=prompt_text,
        token_count=approx_token_count(text),
        timestamp_missing=missing,
    )


def _iter_raw_lines(
    stream: BinaryIO, max_line_bytes: int
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, content without newline | None, error reason | None), reading in bounded pieces."""
    line_no = 0
    while True:
        chunk = stream.readline(max_line_bytes + 1)
        if not chunk:
            return
        line_no += 1
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            total = len(chunk)
            while True:  # drain the rest of the over-long line without keeping it
                more = stream.readline(1 << 20)
                total += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield line_no, None, f"line is {total} bytes, over the {max_line_bytes}-byte limit"
            continue
        yield line_no, chunk.rstrip(b"\r\n"), None


def _decode_line(raw: bytes, now: dt.datetime) -> ParsedPrompt:
    if not raw.strip():
        raise PromptShapeError("empty line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptShapeError(f"not valid UTF-8 (byte {exc.start})") from exc
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark (first line of some exports)
        text = text[1:]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptShapeError(f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError as exc:
        raise PromptShapeError("invalid JSON: nested too deeply") from exc
    return parse_prompt(obj, now=now)


def _error_name(exc: BaseException) -> str:
    """The type name of a (database) error, unwrapping SQLAlchemy's DBAPIError; no message text."""
    return type(getattr(exc, "orig", None) or exc).__name__


def bad_line_reason(exc: BaseException) -> str:
    """The reason reported for a line that raised ``exc``: never the line's values.

    ``PromptShapeError`` messages are written to name fields, not values; any other exception is
    reported by its type only, because its text may quote the input (``int()`` and ``json``
    errors do).
    """
    if isinstance(exc, PromptShapeError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"cannot decode the line ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------------
# Import


class _Importer:
    """Accumulates batches, inserts them and counts outcomes."""

    def __init__(self, url: str | URL | None, batch_size: int) -> None:
        self.engine = db.get_engine(url)
        self.batch_size = batch_size
        self.batch: list[dict[str, Any]] = []
        self.lines = self.imported = self.duplicates = self.bad = self.missing_timestamps = 0
        self.bad_lines: list[BadLine] = []
        self.now = dt.datetime.now(dt.timezone.utc)

    def take(self, source: str, line: int, decode: Callable[[], ParsedPrompt]) -> None:
        """Count one line or row: ``decode()`` it and queue the result, or record it as bad.

        THE per-line handler: whatever ``decode`` raises (a shape error, ``ValueError`` from a
        5 000-digit number, ``OverflowError`` from a time, ``RecursionError``, ``MemoryError``,
        ...) costs this one line and never the import.
        """
        self.lines += 1
        try:
            parsed = decode()
        except Exception as exc:  # noqa: BLE001 - by design: any failure makes this one line bad
            self.add_bad(source, line, bad_line_reason(exc))
            return
        self.add(parsed, source, line)

    def add_bad(self, source: str, line: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_lines) < MAX_REPORTED_BAD_LINES:
            self.bad_lines.append(BadLine(source, line, reason))
        logger.warning("%s:%d: %s", source, line, reason)

    def add(self, parsed: ParsedPrompt, source: str, line: int) -> None:
        self.missing_timestamps += parsed.timestamp_missing
        self.batch.append(
            {
                "content_digest": parsed.content_digest,
                "received_at": parsed.received_at,
                "route": parsed.route,
                "model": parsed.model,
                "messages": [dict(m) for m in parsed.messages] if parsed.messages else None,
                "prompt_text": parsed.prompt_text,
                "token_count": parsed.token_count,
                "source": source[-1024:],
                "source_line": line,
                "imported_at": self.now,
            }
        )
        if len(self.batch) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        # Duplicates inside one batch: keep the first occurrence.
        unique: dict[str, dict[str, Any]] = {}
        for row in self.batch:
            unique.setdefault(row["content_digest"], row)
        rows = list(unique.values())
        batch, self.batch = self.batch, []
        try:
            inserted = insert_prompt_rows(self.engine, rows)
        except sa.exc.SQLAlchemyError:
            # The database refused the batch (a value one backend cannot store, ...): store the
            # rows one by one so only the refused ones are lost, each reported where it came from.
            inserted = 0
            for row in rows:
                try:
                    inserted += insert_prompt_rows(self.engine, [row])
                except sa.exc.SQLAlchemyError as exc:
                    self.add_bad(
                        row["source"],
                        row["source_line"],
                        f"the database refused the row ({_error_name(exc)})",
                    )
                    batch.remove(row)
        self.imported += inserted
        self.duplicates += len(batch) - inserted

    def report(self, sources: Sequence[str], started: float) -> ImportReport:
        self.flush()
        return ImportReport(
            sources=tuple(sources),
            lines=self.lines,
            imported=self.imported,
            duplicates=self.duplicates,
            bad=self.bad,
            bad_lines=tuple(self.bad_lines),
            missing_timestamps=self.missing_timestamps,
            elapsed_seconds=time.perf_counter() - started,
        )


def insert_prompt_rows(engine: sa.Engine, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert prompt rows, skipping existing content digests. Returns how many were new."""
    if not rows:
        return 0
    dialect = engine.dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(PromptLog).on_conflict_do_nothing(
            index_elements=["content_digest"]
        )
    elif dialect == "sqlite":
        stmt = sqlite.insert(PromptLog).on_conflict_do_nothing(index_elements=["content_digest"])
    else:  # pragma: no cover - resolve_url refuses other backends
        raise ValueError(f"unsupported dialect {dialect}")
    with engine.begin() as conn:
        result = conn.execute(stmt.returning(PromptLog.id), list(rows))
        return len(result.all())


def _open_stream(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file for progress, decoded stream); gzip detected by magic bytes."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    magic = raw.read(2)
    raw.seek(0)
    if magic == _GZIP_MAGIC:
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw, raw


def import_files(
    paths: Iterable[str | Path],
    url: str | URL | None = None,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import JSONL prompt logs (plain or gzip) into the store at ``url`` (see module doc).

    The store must be migrated (``registry.db.upgrade``). Unreadable files are reported as bad
    line 0 and the other files are still imported.
    """
    started = time.perf_counter()
    importer = _Importer(url, batch_size)
    sources: list[str] = []
    for path in map(Path, paths):
        source = str(path)
        sources.append(source)
        try:
            total = path.stat().st_size
            raw, stream = _open_stream(path)
        except OSError as exc:
            importer.add_bad(source, 0, f"cannot open: {exc.strerror or exc}")
            continue
        line_no = 0
        last_reported = 0
        try:
            with raw, stream:
                for line_no, content, error in _iter_raw_lines(stream, max_line_bytes):
                    if error is not None:
                        importer.lines += 1
                        importer.add_bad(source, line_no, error)
                        continue
                    importer.take(
                        source, line_no, lambda c=content: _decode_line(c or b"", importer.now)
                    )
                    if on_progress is not None and line_no % 256 == 0:
                        position = raw.tell()
                        if position != last_reported:
                            on_progress(source, position, total)
                            last_reported = position
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            importer.add_bad(
                source, line_no + 1, f"file is corrupt or truncated ({type(exc).__name__})"
            )
        if on_progress is not None:
            on_progress(source, total, total)
    report = importer.report(sources, started)
    logger.info(
        "imported %d new prompts (%d duplicates, %d bad lines) from %d file(s) in %.2fs",
        report.imported,
        report.duplicates,
        report.bad,
        len(sources),
        report.elapsed_seconds,
    )
    return report


def parse_column_mapping(pairs: Iterable[str]) -> dict[str, str]:
    """``["col=field", ...]`` -> ``{field: column}``; fields are ``PROMPT_FIELDS``."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        column, sep, field_name = pair.partition("=")
        column, field_name = column.strip(), field_name.strip()
        if not sep or not column or not field_name:
            raise ValueError(f"column mapping {pair!r} is not COLUMN=FIELD")
        if field_name not in PROMPT_FIELDS:
            raise ValueError(f"unknown field {field_name!r} in {pair!r}; fields: {PROMPT_FIELDS}")
        if field_name in mapping:
            raise ValueError(f"field {field_name!r} mapped twice")
        mapping[field_name] = column
    if "messages" not in mapping and "prompt" not in mapping:
        raise ValueError("map a column to 'messages' or 'prompt'")
    return mapping


def _lenient_sqlite_text(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    dbapi_connection.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")


def import_sql(
    source_url: str | URL,
    table: str,
    mapping: Mapping[str, str],
    url: str | URL | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import prompts from an existing SQL table; ``mapping`` is ``{field: column}``.

    Rows are streamed; a row that fails validation is reported as bad line <row number>.
    ``table`` may be ``schema.table``.
    """
    started = time.perf_counter()
    importer = _Importer(url, batch_size)
    source_url = make_url(source_url)
    # A plain engine: the source is not ours (no WAL switch, no chmod, never created if missing).
    source_engine = sa.create_engine(db.resolve_url(source_url))
    if source_engine.dialect.name == "sqlite":
        # SQLite hands back whatever bytes a TEXT cell holds; invalid UTF-8 would otherwise raise
        # inside the cursor and end the stream. Decoded with surrogate escapes, such a row fails
        # ``_check_text`` and is reported as one bad row.
        sa.event.listen(source_engine, "connect", _lenient_sqlite_text)
    schema_name, _, table_name = table.rpartition(".")
    # No credentials in the stored source label.
    source = f"sql:{source_url.get_backend_name()}/{source_url.database or ''}/{table}"
    try:
        reflected = sa.Table(
            table_name, sa.MetaData(), schema=schema_name or None, autoload_with=source_engine
        )
        missing = [c for c in mapping.values() if c not in reflected.c]
        if missing:
            raise ValueError(
                f"table {table!r} has no column(s) {missing}; it has {list(reflected.c.keys())}"
            )
        # Raw driver values (no SQLAlchemy result processing): a malformed DATETIME text in one
        # row must be that row's bad time, not an exception that ends the stream.
        columns = [
            sa.type_coerce(reflected.c[c], sa.types.NullType()).label(f) for f, c in mapping.items()
        ]
        total = 0
        with source_engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(reflected)).scalar_one()
            rows = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
                sa.select(*columns)
            )
            row_no = 0
            try:
                for row_no, row in enumerate(rows, start=1):
                    importer.take(
                        source,
                        row_no,
                        lambda r=row: parse_prompt(dict(r._mapping), now=importer.now),
                    )
                    if on_progress is not None and row_no % 256 == 0:
                        on_progress(source, row_no, total)
            except Exception as exc:  # noqa: BLE001 - the source broke; keep what was read
                # The source itself failed mid-stream: what was read is kept, the rest reported.
                importer.add_bad(
                    source,
                    row_no + 1,
                    f"reading the source failed; rows from here on were not read "
                    f"({_error_name(exc)})",
                )
        if on_progress is not None:
            on_progress(source, total, total)
    finally:
        source_engine.dispose()
    return importer.report([source], started)


# --------------------------------------------------------------------------------------------------
# Stored redactions and purging

#: (messages or None, plain text or None) -> object with ``.text`` (flattened), ``.messages`` (or
#: None) and ``.counts``: ``calibration.redaction.redact_prompt``, passed in by the pipelines.
RedactPromptFn = Callable[[Sequence[Mapping[str, Any]] | None, str | None], Any]


def store_redactions(
    url: str | URL | None = None,
    *,
    redact_prompt: RedactPromptFn,
    version: str,
    batch_size: int = 200,
) -> int:
    """Redact every unpurged prompt whose stored redaction is missing or from another ``version``
    and store it beside the raw text. Returns how many prompts were redacted.

    Run after an import (``fp4roll logs import`` does) so each prompt is redacted once, not on every
    sampling or drift run; ``fetch_window`` returns the stored redaction with each prompt.
    """
    stale = (
        sa.select(PromptLog.id)
        .where(PromptLog.purged_at.is_(None))
        .where(sa.or_(PromptLog.redactor_version.is_(None), PromptLog.redactor_version != version))
        .order_by(PromptLog.id)
    )
    engine = db.get_engine(url)
    with engine.connect() as conn:
        ids = list(conn.execute(stale).scalars())
    done = 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(PromptLog.id, PromptLog.messages, PromptLog.prompt_text).where(
                    PromptLog.id.in_(chunk), PromptLog.purged_at.is_(None)
                )
            ).all()
        updates = []
        for row_id, messages, prompt_text in rows:
            redacted = redact_prompt(messages, prompt_text)
            updates.append(
                {
                    "row_id": row_id,
                    "redactor_version": version,
                    "redacted_text": redacted.text,
                    "redacted_messages": None
                    if redacted.messages is None
                    else [dict(m) for m in redacted.messages],
                    "redaction_counts": dict(redacted.counts),
                }
            )
        if updates:
            stmt = (
                sa.update(PromptLog)
                .where(PromptLog.id == sa.bindparam("row_id"), PromptLog.purged_at.is_(None))
                .values(
                    redactor_version=sa.bindparam("redactor_version"),
                    redacted_text=sa.bindparam("redacted_text"),
                    redacted_messages=sa.bindparam("redacted_messages"),
                    redaction_counts=sa.bindparam("redaction_counts"),
                )
            )
            with engine.begin() as conn:
                conn.execute(stmt, updates)
        done += len(updates)
    if done:
        logger.info("stored %d redactions (redactor %s)", done, version)
    return done


@dataclass(frozen=True)
class PurgeReport:
    """Outcome of ``purge_prompts`` (counts only: the matching text is never echoed)."""

    selected: int  # unpurged prompts the filters select
    already_purged: int  # prompts within the time/route filters erased by an earlier purge
    purged: int  # erased now (0 on a dry run)
    in_calibration_sets: int  # of the selected, members of a calibration set (kept: redacted)
    dry_run: bool


def _text_matcher(matching: str | None, regex: bool) -> Callable[[str], bool] | None:
    if matching is None:
        return None
    if not matching.strip():
        raise ValueError("the matching text is empty")
    if regex:
        try:
            pattern = re.compile(matching, re.IGNORECASE)
        except re.error as exc:
            # The message names the position, never the pattern (it may be the PII itself).
            raise ValueError(f"invalid regular expression (at position {exc.pos})") from None
        return lambda text: pattern.search(text) is not None
    needle = matching.casefold()
    return lambda text: needle in text.casefold()


def purge_prompts(
    url: str | URL | None = None,
    *,
    before: dt.datetime | None = None,
    routes: Sequence[str] | None = None,
    matching: str | None = None,
    regex: bool = False,
    dry_run: bool = True,
    batch_size: int = 500,
) -> PurgeReport:
    """Erase the raw text of stored prompts: received before ``before``, on ``routes``, and/or whose
    text contains ``matching`` (case-insensitive substring, or a regular expression with
    ``regex``). Filters combine with AND; at least one is required.

    Erased: ``messages``, ``prompt_text`` and the stored redaction of each selected row, which is
    stamped ``purged_at``. Kept: the row (digest, route, time, token count), calibration sets, their
    digests and their members' REDACTED texts, so past versions stay explainable; a re-import of the
    same prompt does not bring it back (its digest is taken). ``dry_run`` (the default) only counts.
    Nothing here logs or reports the matching text.
    """
    if before is None and not routes and matching is None:
        raise ValueError("give at least one filter: before, routes or matching text")
    if before is not None and before.tzinfo is None:
        raise ValueError("'before' must be timezone-aware")
    matches = _text_matcher(matching, regex)
    stmt = sa.select(
        PromptLog.id, PromptLog.messages, PromptLog.prompt_text, PromptLog.purged_at
    ).order_by(PromptLog.id)
    if before is not None:
        stmt = stmt.where(PromptLog.received_at < before)
    if routes:
        stmt = stmt.where(PromptLog.route.in_(list(routes)))
    engine = db.get_engine(url)
    selected: list[int] = []
    already = 0
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(stmt)
        for row_id, messages, prompt_text, purged_at in result:
            if purged_at is not None:
                already += 1
            elif matches is None or matches(flatten_prompt(messages, prompt_text)):
                selected.append(row_id)
    in_sets = 0
    purged = 0
    now = dt.datetime.now(dt.timezone.utc)
    for start in range(0, len(selected), batch_size):
        chunk = selected[start : start + batch_size]
        with engine.begin() as conn:
            in_sets += conn.execute(
                sa.select(sa.func.count(sa.distinct(CalibrationSetMember.prompt_log_id))).where(
                    CalibrationSetMember.prompt_log_id.in_(chunk)
                )
            ).scalar_one()
            if not dry_run:
                purged += conn.execute(
                    sa.update(PromptLog)
                    .where(PromptLog.id.in_(chunk), PromptLog.purged_at.is_(None))
                    .values(
                        messages=sa.null(),
                        prompt_text=sa.null(),
                        redacted_text=sa.null(),
                        redacted_messages=sa.null(),
                        redaction_counts=sa.null(),
                        redactor_version=sa.null(),
                        purged_at=now,
                    )
                ).rowcount
    report = PurgeReport(
        selected=len(selected),
        already_purged=already,
        purged=purged,
        in_calibration_sets=in_sets,
        dry_run=dry_run,
    )
    logger.info(
        "purge%s: %d prompts selected (before=%s, routes=%s, text filter: %s), %d erased",
        " (dry run)" if dry_run else "",
        report.selected,
        before.isoformat() if before else None,
        list(routes) if routes else None,
        "regex" if matching is not None and regex else ("substring" if matching else "none"),
        report.purged,
    )
    return report


# --------------------------------------------------------------------------------------------------
# Reading prompts and calibration sets


def _to_logged(row: PromptLog) -> LoggedPrompt:
    messages = tuple(row.messages) if row.messages is not None else None
    return LoggedPrompt(
        id=row.id,
        content_digest=row.content_digest,
        received_at=row.received_at,
        route=row.route,
        model=row.model,
        text=flatten_prompt(messages, row.prompt_text),
        token_count=row.token_count,
        source=row.source,
        messages=messages,
        redactor_version=row.redactor_version,
        redacted_text=row.redacted_text,
        redacted_messages=(
            tuple(row.redacted_messages) if row.redacted_messages is not None else None
        ),
        redaction_counts=row.redaction_counts,
    )


def fetch_window(
    url: str | URL | None = None,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    routes: Sequence[str] | None = None,
    batch_size: int = 1000,
) -> Iterator[LoggedPrompt]:
    """Stream stored prompts with ``since <= received_at < until``, ordered by time then id.

    Purged prompts (raw text erased) are left out."""
    stmt = (
        sa.select(PromptLog)
        .where(PromptLog.purged_at.is_(None))
        .order_by(PromptLog.received_at, PromptLog.id)
    )
    if since is not None:
        stmt = stmt.where(PromptLog.received_at >= since)
    if until is not None:
        stmt = stmt.where(PromptLog.received_at < until)
    if routes:
        stmt = stmt.where(PromptLog.route.in_(list(routes)))
    with db.session_scope(url) as session:
        for row in session.scalars(stmt.execution_options(yield_per=batch_size)):
            yield _to_logged(row)


def count_prompts(url: str | URL | None = None, *, include_purged: bool = False) -> int:
    """Stored prompts (by default those whose raw text is still there)."""
    stmt = sa.select(sa.func.count()).select_from(PromptLog)
    if not include_purged:
        stmt = stmt.where(PromptLog.purged_at.is_(None))
    with db.get_engine(url).connect() as conn:
        return conn.execute(stmt).scalar_one()


def time_range(url: str | URL | None = None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(earliest, latest) ``received_at`` of the stored, unpurged prompts."""
    with db.session_scope(url) as session:
        low, high = session.execute(
            sa.select(sa.func.min(PromptLog.received_at), sa.func.max(PromptLog.received_at)).where(
                PromptLog.purged_at.is_(None)
            )
        ).one()
    utc = dt.timezone.utc
    if isinstance(low, str):  # SQLite aggregates bypass the column type
        low, high = dt.datetime.fromisoformat(low), dt.datetime.fromisoformat(high)
    low = low.replace(tzinfo=low.tzinfo or utc).astimezone(utc) if low else None
    high = high.replace(tzinfo=high.tzinfo or utc).astimezone(utc) if high else None
    return low, high


def _to_stored(row: CalibrationSet, with_members: bool) -> StoredCalibrationSet:
    members: tuple[CalibrationMemberRow, ...] = ()
    if with_members:
        order = {role: i for i, role in enumerate(MemberRole)}
        ordered = sorted(row.members, key=lambda m: (order[MemberRole(m.role)], m.position))
        members = tuple(
            CalibrationMemberRow(
                prompt_log_id=m.prompt_log_id,
                role=MemberRole(m.role).value,
                position=m.position,
                route=m.route,
                token_count=m.token_count,
                redacted_text=m.redacted_text,
                rendered_text=m.rendered_text,
                templated=bool(m.templated),
            )
            for m in ordered
        )
    return StoredCalibrationSet(
        id=row.id,
        digest=row.digest,
        created_at=row.created_at,
        filters=row.filters,
        size=row.size,
        holdout_size=row.holdout_size,
        seed=row.seed,
        summary=row.summary,
        members=members,
        sensitivity_size=row.sensitivity_size or 0,
    )


def save_calibration_set(
    *,
    digest: str,
    filters: Mapping[str, Any],
    seed: int,
    summary: Mapping[str, Any],
    members: Sequence[CalibrationMemberRow],
    url: str | URL | None = None,
) -> tuple[StoredCalibrationSet, bool]:
    """Store a calibration set (members hold REDACTED text only). Returns (set, created).

    Idempotent: a set with the same digest is returned as is (``created`` False).
    """
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"digest must be 64 lowercase hex characters, got {digest!r}")
    counts = {role: sum(m.role == role.value for m in members) for role in MemberRole}
    if sum(counts.values()) != len(members):
        raise ValueError(f"member roles must be one of {[r.value for r in MemberRole]}")
    size, holdout_size = counts[MemberRole.calibration], counts[MemberRole.holdout]
    with db.session_scope(url) as session:
        existing = session.scalar(sa.select(CalibrationSet).where(CalibrationSet.digest == digest))
        if existing is not None:
            return _to_stored(existing, with_members=True), False
        row = CalibrationSet(
            digest=digest,
            filters=dict(filters),
            size=size,
            sensitivity_size=counts[MemberRole.sensitivity],
            holdout_size=holdout_size,
            seed=seed,
            summary=dict(summary),
        )
        row.members = [
            CalibrationSetMember(
                prompt_log_id=m.prompt_log_id,
                role=MemberRole(m.role),
                position=m.position,
                route=m.route,
                token_count=m.token_count,
                redacted_text=m.redacted_text,
                rendered_text=m.rendered_text,
                templated=m.templated,
            )
            for m in members
        ]
        session.add(row)
        try:
            session.flush()
        except sa.exc.IntegrityError:
            # Lost a race with an identical set: return the winner.
            session.rollback()
            existing = session.scalar(
                sa.select(CalibrationSet).where(CalibrationSet.digest == digest)
            )
            if existing is None:
                raise
            return _to_stored(existing, with_members=True), False
        stored = _to_stored(row, with_members=True)
    logger.info("stored calibration set %s (%d + %d holdout)", digest[:12], size, holdout_size)
    return stored, True


def load_calibration_set(
    digest: str, url: str | URL | None = None, *, with_members: bool = True
) -> StoredCalibrationSet:
    """The calibration set whose digest is ``digest`` or starts with it (>= 6 hex characters)."""
    digest = digest.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{6,64}", digest):
        raise ValueError(f"digest prefix must be 6-64 hex characters, got {digest!r}")
    with db.session_scope(url) as session:
        rows = session.scalars(
            sa.select(CalibrationSet).where(CalibrationSet.digest.startswith(digest)).limit(2)
        ).all()
        if not rows:
            raise LookupError(f"no calibration set with digest {digest}")
        if len(rows) > 1:
            raise LookupError(f"digest prefix {digest} is ambiguous; give more characters")
        return _to_stored(rows[0], with_members=with_members)


def list_calibration_sets(url: str | URL | None = None) -> list[StoredCalibrationSet]:
    """Every calibration set, newest first, without members."""
    with db.session_scope(url) as session:
        rows = session.scalars(
            sa.select(CalibrationSet).order_by(
                CalibrationSet.created_at.desc(), CalibrationSet.id.desc()
            )
        ).all()
        return [_to_stored(r, with_members=False) for r in rows]


__all__ = [
    "BadLine",
    "PurgeReport",
    "CalibrationMemberRow",
    "ImportReport",
    "LoggedPrompt",
    "ParsedPrompt",
    "PromptShapeError",
    "StoredCalibrationSet",
    "approx_token_count",
    "bad_line_reason",
    "content_digest",
    "count_prompts",
    "fetch_window",
    "flatten_prompt",
    "import_files",
    "import_sql",
    "insert_prompt_rows",
    "list_calibration_sets",
    "load_calibration_set",
    "parse_column_mapping",
    "parse_prompt",
    "purge_prompts",
    "save_calibration_set",
    "store_redactions",
    "time_range",
]
