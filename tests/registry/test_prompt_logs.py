"""Prompt-log import and calibration-set storage, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import gzip
import json

import pytest
import sqlalchemy as sa

from registry import db
from registry import prompt_logs as store
from registry.schema import PromptLog

UTC = dt.timezone.utc


def _chat(
    text: str, route: str = "chat-support", ts: str = "2026-01-05T10:00:00Z", **extra
) -> dict:
    return {
        "model": "acme",
        "messages": [{"role": "user", "content": text}],
        "metadata": {"route": route},
        "timestamp": ts,
        **extra,
    }


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


MAX_LINE = 2048
# (content, expected bad reason fragment or None for valid); line numbers are 1-based positions.
MALFORMED_LINES: list[tuple[bytes, str | None]] = [
    (b"\xef\xbb\xbf" + _line(_chat("valid chat one")), None),  # UTF-8 BOM on line 1 is fine
    (b'{"messages": [{"role": "user", "content": "unterminated"}\n', "invalid JSON"),
    (b"\n", "empty line"),
    (_line({"prompt": "valid plain prompt", "route": "summarize", "created": 1767610000}), None),
    ("caf\xe9 not utf-8 ".encode("latin-1") + b'{"prompt": "x"}\n', "not valid UTF-8"),
    (_line(["a", "json", "list"]), "expected a JSON object"),
    (_line({"prompt": "x" * (MAX_LINE + 10)}), "over the 2048-byte limit"),
    (_line({"messages": "not a list"}), "'messages' is a string but not JSON"),
    (_line({"messages": []}), "non-empty list"),
    (_line({"messages": [{"role": "wizard", "content": "hi"}]}), "role is not one of"),
    (_line({"model": "acme"}), "neither 'messages' nor 'prompt'"),
    (_line({"prompt": 42}), "'prompt' must be a string"),
    (_line({"prompt": "   "}), "'prompt' is empty"),
    (_line(_chat("bad time", ts="yesterday-ish")), "not ISO 8601"),
    (_line({"prompt": "nul \u0000 inside"}), "NUL character"),
    (b'{"prompt": "lone surrogate \\ud800 here"}\n', "not encodable as UTF-8"),
    (b"   \t  \n", "empty line"),
    (
        _line(
            {
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": [{"type": "text", "text": "valid parts"}]},
                ],
                "route": "code-help",
            }
        ),
        None,
    ),
    (_line(_chat("valid chat one")), None),  # exact duplicate of line 1: valid, not new
    (_line(_chat("no timestamp", ts=None)), None),
    (b'{"prompt": "last line without newline", "route": "x"}', None),
]


@pytest.fixture
def malformed_file(tmp_path):
    path = tmp_path / "malformed.jsonl"
    path.write_bytes(b"".join(content for content, _ in MALFORMED_LINES))
    return path


def test_malformed_file_imports_every_valid_line_and_reports_every_bad_one(
    migrated_db_url: str, malformed_file
) -> None:
    report = store.import_files([malformed_file], migrated_db_url, max_line_bytes=MAX_LINE)
    expected_bad = {i + 1: reason for i, (_, reason) in enumerate(MALFORMED_LINES) if reason}
    n_valid = len(MALFORMED_LINES) - len(expected_bad)
    assert report.lines == len(MALFORMED_LINES)
    assert report.bad == len(expected_bad)
    assert {b.line: b.reason for b in report.bad_lines}.keys() == expected_bad.keys()
    for bad in report.bad_lines:
        assert expected_bad[bad.line] in bad.reason, (bad.line, bad.reason)
        assert bad.source == str(malformed_file)
        assert str(bad).startswith(f"{malformed_file}:{bad.line}: ")
    assert report.imported == n_valid - 1  # line 19 repeats line 1
    assert report.duplicates == 1
    assert report.missing_timestamps == 3  # lines 18, 20, 21
    assert report.exit_code == 2  # partial success
    assert store.count_prompts(migrated_db_url) == n_valid - 1

    with db.session_scope(migrated_db_url) as session:
        rows = {r.source_line: r for r in session.scalars(sa.select(PromptLog))}
    assert rows[4].prompt_text == "valid plain prompt" and rows[4].route == "summarize"
    assert rows[4].received_at == dt.datetime.fromtimestamp(1767610000, tz=UTC)
    assert rows[18].messages[1] == {"role": "user", "content": "valid parts"}
    assert rows[18].route == "code-help"
    assert rows[1].received_at == dt.datetime(2026, 1, 5, 10, tzinfo=UTC)


def test_reimport_adds_nothing_and_gzip_is_detected_by_magic_bytes(
    migrated_db_url, tmp_path
) -> None:
    lines = b"".join(
        _line(_chat(f"prompt number {i}", ts=f"2026-01-0{1 + i % 9}T00:00:00Z")) for i in range(30)
    )
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(lines)
    disguised = tmp_path / "b.jsonl"  # gzip content behind a .jsonl name
    disguised.write_bytes(gzip.compress(lines))
    first = store.import_files([plain], migrated_db_url, batch_size=7)
    assert (first.imported, first.duplicates, first.bad, first.exit_code) == (30, 0, 0, 0)
    second = store.import_files([disguised, plain], migrated_db_url)
    assert (second.imported, second.duplicates, second.bad) == (0, 60, 0)
    assert store.count_prompts(migrated_db_url) == 30


def test_missing_file_and_truncated_gzip_are_reported(migrated_db_url, tmp_path) -> None:
    truncated = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(b"".join(_line(_chat(f"p {i} " + "w" * i)) for i in range(200)))
    truncated.write_bytes(data[: len(data) // 2])
    report = store.import_files([tmp_path / "nope.jsonl", truncated], migrated_db_url)
    reasons = [b.reason for b in report.bad_lines]
    assert reasons[0].startswith("cannot open")
    assert any("corrupt or truncated" in r for r in reasons)
    assert report.imported > 0 and report.exit_code == 2


def test_all_bad_is_exit_code_1(migrated_db_url, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"nope\n[]\n")
    report = store.import_files([path], migrated_db_url)
    assert (report.imported, report.bad, report.exit_code) == (0, 2, 1)


def test_content_digest_covers_content_and_route_only() -> None:
    a = store.parse_prompt(_chat("hello"))
    b = store.parse_prompt(_chat("hello", ts="2026-02-01T00:00:00Z", model="other"))
    c = store.parse_prompt(_chat("hello", route="translate"))
    d = store.parse_prompt(_chat("hello!"))
    assert a.content_digest == b.content_digest
    assert len({a.content_digest, c.content_digest, d.content_digest}) == 3
    assert store.parse_prompt({"prompt": "p", "created": 1767610000000}).received_at.year == 2026
    naive = store.parse_prompt({"prompt": "p", "timestamp": "2026-01-05T10:00:00"})
    assert naive.received_at.tzinfo is not None


def test_import_from_sql_table(migrated_db_url, tmp_path) -> None:
    source_url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(source_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE requests (id INTEGER PRIMARY KEY, body TEXT, endpoint TEXT, at TEXT, llm TEXT)"
        )
        conn.exec_driver_sql(
            "INSERT INTO requests (body, endpoint, at, llm) VALUES "
            "('[{\"role\": \"user\", \"content\": \"from sql\"}]', 'chat', '2026-01-06T08:00:00Z', 'm'),"
            "('not json', 'chat', '2026-01-06T09:00:00Z', 'm'),"
            '(\'[{"role": "user", "content": "second"}]\', \'code\', \'2026-01-06T10:00:00Z\', NULL)'
        )
    engine.dispose()
    mapping = store.parse_column_mapping(
        ["body=messages", "endpoint=route", "at=timestamp", "llm=model"]
    )
    report = store.import_sql(source_url, "requests", mapping, migrated_db_url)
    assert (report.imported, report.bad, report.exit_code) == (2, 1, 2)
    assert report.bad_lines[0].line == 2
    assert report.sources == (f"sql:sqlite/{tmp_path / 'app.db'}/requests",)
    prompts = list(store.fetch_window(migrated_db_url))
    assert [p.text for p in prompts] == ["user: from sql", "user: second"]
    with pytest.raises(ValueError, match="COLUMN=FIELD"):
        store.parse_column_mapping(["body"])
    with pytest.raises(ValueError, match="unknown field"):
        store.parse_column_mapping(["body=content"])
    with pytest.raises(ValueError, match="no column"):
        store.import_sql(source_url, "requests", {"prompt": "missing"}, migrated_db_url)


def test_fetch_window_bounds_and_routes(migrated_db_url, tmp_path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(
        b"".join(
            _line(_chat(f"p{i}", route="a" if i % 2 else "b", ts=f"2026-01-{10 + i:02d}T00:00:00Z"))
            for i in range(10)
        )
    )
    store.import_files([path], migrated_db_url)
    since, until = dt.datetime(2026, 1, 12, tzinfo=UTC), dt.datetime(2026, 1, 15, tzinfo=UTC)
    window = list(store.fetch_window(migrated_db_url, since=since, until=until))
    assert [p.text for p in window] == ["user: p2", "user: p3", "user: p4"]
    assert all(p.received_at.tzinfo is not None for p in window)
    assert [
        p.text for p in store.fetch_window(migrated_db_url, since=since, until=until, routes=["a"])
    ] == ["user: p3"]
    assert store.time_range(migrated_db_url) == (
        dt.datetime(2026, 1, 10, tzinfo=UTC),
        dt.datetime(2026, 1, 19, tzinfo=UTC),
    )


def test_calibration_set_roundtrip_is_idempotent(migrated_db_url, tmp_path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"".join(_line(_chat(f"p{i}")) for i in range(4)))
    store.import_files([path], migrated_db_url)
    ids = [p.id for p in store.fetch_window(migrated_db_url)]
    members = [
        store.CalibrationMemberRow(ids[0], "calibration", 0, "chat-support", 2, "user: p0"),
        store.CalibrationMemberRow(ids[1], "calibration", 1, "chat-support", 2, "user: p1"),
        store.CalibrationMemberRow(ids[2], "holdout", 0, "chat-support", 2, "user: p2"),
    ]
    digest = "ab" * 32
    saved, created = store.save_calibration_set(
        digest=digest,
        filters={"until": None},
        seed=3,
        summary={"k": 1},
        members=members,
        url=migrated_db_url,
    )
    assert created and (saved.size, saved.holdout_size) == (2, 1)
    again, created_again = store.save_calibration_set(
        digest=digest, filters={}, seed=9, summary={}, members=members[:1], url=migrated_db_url
    )
    assert not created_again and again.id == saved.id and again.seed == 3
    loaded = store.load_calibration_set(digest[:8], migrated_db_url)
    assert loaded.members == tuple(members)
    assert loaded.role("holdout") == (members[2],)
    assert [s.digest for s in store.list_calibration_sets(migrated_db_url)] == [digest]
    with pytest.raises(LookupError, match="no calibration set"):
        store.load_calibration_set("cd" * 4, migrated_db_url)
    with pytest.raises(ValueError, match="hex"):
        store.load_calibration_set("xyz", migrated_db_url)
    with pytest.raises(ValueError, match="digest must be"):
        store.save_calibration_set(
            digest="short", filters={}, seed=0, summary={}, members=[], url=migrated_db_url
        )


def test_concurrent_imports_of_overlapping_files(migrated_db_url, tmp_path) -> None:
    """Two importers at once (CLI + flow): no lock errors, no duplicates, nothing lost."""
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for name, start in (("x", 0), ("y", 150)):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"".join(_line(_chat(f"overlap {i}")) for i in range(start, start + 300)))
        paths.append(path)
    with ThreadPoolExecutor(2) as pool:
        reports = list(
            pool.map(lambda p: store.import_files([p], migrated_db_url, batch_size=25), paths)
        )
    assert sum(r.imported for r in reports) == 450
    assert sum(r.duplicates for r in reports) == 150
    assert store.count_prompts(migrated_db_url) == 450
