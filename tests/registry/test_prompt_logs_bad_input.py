"""Hostile input costs one line, never the import (issue 11, deliverable 1), on SQLite and PostgreSQL.

Every case below crashed or could crash a decoder somewhere (int conversion of a 5 000-digit number,
a UTC offset that leaves the calendar, NaN/inf epochs, deep nesting, bytes that are not UTF-8, ...).
Each bad line sits between valid lines; the test demands that every valid line is stored, every bad
one is reported with file:line, no reason quotes the line's values, and a rerun changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import sqlalchemy as sa

from registry import prompt_logs as store

UTC = dt.timezone.utc
MARK = "Zq7leak"  # planted in the values of bad lines: must never appear in a reason or a log line
FUTURE_ISO = (dt.datetime.now(UTC) + dt.timedelta(hours=1)).isoformat()
FUTURE_MS = int((dt.datetime.now(UTC) + dt.timedelta(days=2)).timestamp() * 1000)


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _prompt(ts, **extra) -> bytes:
    return _j({"prompt": f"{MARK} prompt", "timestamp": ts, **extra})


BAD_LINES: list[tuple[str, bytes]] = [
    (
        "5000-digit int timestamp",
        b'{"prompt": "' + MARK.encode() + b'", "timestamp": ' + b"7" * 5000 + b"}",
    ),
    ("5000-digit int elsewhere", b'{"prompt": "x", "model": ' + b"9" * 5000 + b"}"),
    ("offset leaves the calendar", _prompt("0001-01-01T00:00+01:00")),
    ("offset past year 9999", _prompt("9999-12-31T23:59:59-01:00")),
    ("huge float", b'{"prompt": "x", "timestamp": 1e308}'),
    ("float overflow to inf", b'{"prompt": "x", "timestamp": 1e999}'),
    ("NaN epoch", b'{"prompt": "x", "timestamp": NaN}'),
    ("-Infinity epoch", b'{"prompt": "x", "timestamp": -Infinity}'),
    ("int too large for a float", b'{"prompt": "x", "created": ' + b"1" * 400 + b"}"),
    ("year 2999", _prompt("2999-01-01T00:00:00Z")),
    ("an hour ahead", _prompt(FUTURE_ISO)),
    ("epoch ms two days ahead", _prompt(FUTURE_MS)),
    ("timestamp with a secret", _prompt(f"2026-13-45 password={MARK}")),
    ("5000-digit timestamp text", _prompt("8" * 5000)),
    ("timestamp is an object", _prompt({"when": MARK})),
    ("timestamp is a list", _prompt([2026, 1, 5])),
    ("timestamp is true", _prompt(True)),
    ("not UTF-8", b'{"prompt": "caf\xe9 ' + MARK.encode() + b'"}'),
    ("deep nesting", b"[" * 200_000 + b"]" * 200_000),
    (
        "deep nesting inside",
        b'{"prompt": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ),
    ("JSON string", _j(MARK)),
    ("JSON number", b"42"),
    ("JSON null", b"null"),
    ("JSON list", _j([MARK])),
    ("lone surrogate in prompt", b'{"prompt": "' + MARK.encode() + b' \\udc80"}'),
    ("lone surrogate in route", b'{"prompt": "x", "route": "r\\ud800' + MARK.encode() + b'"}'),
    ("lone surrogate in model", b'{"prompt": "x", "model": "\\ud83d' + MARK.encode() + b'"}'),
    ("NUL escape in route", b'{"prompt": "x", "route": "a\\u0000' + MARK.encode() + b'"}'),
    ("raw NUL byte", b'{"prompt": "a\x00' + MARK.encode() + b'"}'),
    ("role is an object", _j({"messages": [{"role": {"x": MARK}, "content": "hi"}]})),
    ("role is unknown", _j({"messages": [{"role": MARK, "content": "hi"}]})),
    ("content is an object", _j({"messages": [{"role": "user", "content": {"t": MARK}}]})),
    (
        "text part not a string",
        _j({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ),
    ("messages JSON with a huge int", _j({"messages": "[" + "1" * 5000 + "]"})),
    ("route is a list", _j({"prompt": "x", "route": [MARK]})),
    ("route too long", _j({"prompt": "x", "route": MARK * 100})),
    ("metadata route is a number", _j({"prompt": "x", "metadata": {"route": 7}})),
    ("prompt is a dict", _j({"prompt": {"p": MARK}})),
]


def _valid(i: int) -> bytes:
    return _j(
        {
            "messages": [{"role": "user", "content": f"valid prompt number {i}"}],
            "metadata": {"route": "chat"},
            "timestamp": f"2026-01-{1 + i % 28:02d}T10:00:00Z",
        }
    )


def _hostile_file(tmp_path):
    lines, expected_bad = [], {}
    for i, (label, bad) in enumerate(BAD_LINES):
        lines.append(_valid(i))
        lines.append(bad)
        expected_bad[len(lines)] = label
    lines.append(_valid(len(BAD_LINES)))
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected_bad, len(BAD_LINES) + 1


def test_every_hostile_line_costs_one_line_and_never_echoes_values(
    migrated_db_url, tmp_path, caplog
) -> None:
    path, expected_bad, n_valid = _hostile_file(tmp_path)
    with caplog.at_level(logging.DEBUG):
        report = store.import_files([path], migrated_db_url, max_line_bytes=1 << 21)
    assert report.lines == len(expected_bad) + n_valid
    bad_by_line = {b.line: b for b in report.bad_lines}
    missing = {line: label for line, label in expected_bad.items() if line not in bad_by_line}
    assert not missing, f"accepted as valid: {missing}"
    assert report.bad == len(expected_bad)
    assert (report.imported, report.duplicates, report.exit_code) == (n_valid, 0, 2)
    for line, bad in bad_by_line.items():
        assert str(bad).startswith(f"{path}:{line}: ")
        assert MARK.lower() not in bad.reason.lower(), (expected_bad[line], bad.reason)
        assert "7777" not in bad.reason and "8888" not in bad.reason and "9999" not in bad.reason
        assert "2999" not in bad.reason and "0001" not in bad.reason
    assert MARK.lower() not in caplog.text.lower()
    reasons = {expected_bad[line]: bad.reason for line, bad in bad_by_line.items()}
    assert "future" in reasons["year 2999"] and "future" in reasons["epoch ms two days ahead"]
    assert "range" in reasons["offset leaves the calendar"]
    assert "nested too deeply" in reasons["deep nesting"]
    assert "UTF-8" in reasons["not UTF-8"]
    stored = sorted(p.text for p in store.fetch_window(migrated_db_url))
    assert stored == sorted(f"user: valid prompt number {i}" for i in range(n_valid))

    # A rerun is idempotent: same bad lines, nothing new, every valid line a duplicate.
    again = store.import_files([path], migrated_db_url, max_line_bytes=1 << 21)
    assert (again.imported, again.duplicates, again.bad) == (0, n_valid, len(expected_bad))
    assert store.count_prompts(migrated_db_url) == n_valid


def test_timestamps_within_the_skew_and_in_the_past_are_fine() -> None:
    now = dt.datetime(2026, 3, 1, 12, tzinfo=UTC)
    near = store.parse_prompt({"prompt": "p", "timestamp": "2026-03-01T12:04:00Z"}, now=now)
    assert near.received_at == dt.datetime(2026, 3, 1, 12, 4, tzinfo=UTC)
    old = store.parse_prompt({"prompt": "p", "timestamp": "0001-01-01T00:00:00Z"}, now=now)
    assert old.received_at.year == 1
    assert store.parse_prompt({"prompt": "p", "timestamp": 0}, now=now).received_at.year == 1970


def test_a_row_the_database_refuses_costs_that_row(migrated_db_url, tmp_path, monkeypatch) -> None:
    """A batch insert that fails is retried row by row: only the refused row is lost."""
    real_insert = store.insert_prompt_rows

    def picky(engine, rows):
        if any("poison" in (r["prompt_text"] or "") for r in rows):
            raise sa.exc.IntegrityError("INSERT", {}, Exception("refused"))
        return real_insert(engine, rows)

    monkeypatch.setattr(store, "insert_prompt_rows", picky)
    path = tmp_path / "p.jsonl"
    texts = ["one", "two", "poison pill", "three", "four"]
    path.write_bytes(b"".join(_j({"prompt": t, "created": 1767610000}) + b"\n" for t in texts))
    report = store.import_files([path], migrated_db_url, batch_size=100)
    assert (report.imported, report.bad) == (4, 1)
    assert report.bad_lines[0].line == 3 and "refused" in report.bad_lines[0].reason
    assert "poison" not in report.bad_lines[0].reason


def test_import_sql_rows_are_handled_one_by_one(migrated_db_url, tmp_path) -> None:
    source_url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(source_url)
    rows = [
        ("valid one", "2026-01-06T08:00:00Z", None),
        ("digits", "7" * 5000, None),
        ("calendar", "0001-01-01T00:00+01:00", None),
        ("future", "2999-01-01T00:00:00Z", None),
        ("valid two", "2026-01-06T09:00:00Z", None),
        ("bad real", None, float("nan")),
        ("huge real", None, 1e308),
        ("huge int", None, 9223372036854775807),
        ("valid three", None, 1767700000),
    ]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE requests (id INTEGER PRIMARY KEY, body TEXT, at TEXT, epoch NUMERIC, "
            "stamp DATETIME)"
        )
        for body, at, epoch in rows:
            conn.exec_driver_sql(
                "INSERT INTO requests (body, at, epoch, stamp) VALUES (?, ?, ?, ?)",
                (body, at, epoch, "garbage " + MARK),
            )
        # Bytes that are not UTF-8 in a TEXT cell (sqlite3 raises on them unless told otherwise).
        conn.exec_driver_sql(
            "INSERT INTO requests (body, at) VALUES (CAST(X'6361669F' AS TEXT), '2026-01-06T10:00:00Z')"
        )
        conn.exec_driver_sql(
            "INSERT INTO requests (body, at) VALUES ('valid four', '2026-01-06T11:00:00Z')"
        )
    engine.dispose()

    def run(mapping):
        return store.import_sql(
            source_url, "requests", store.parse_column_mapping(mapping), migrated_db_url
        )

    by_text = run(["body=prompt", "at=timestamp"])
    # Rows 6-8 have no text time (import time is used): valid here.
    bad_lines = {b.line for b in by_text.bad_lines}
    assert bad_lines == {2, 3, 4, 10}, by_text.bad_lines
    assert by_text.imported == 7
    assert all(MARK not in b.reason and "7777" not in b.reason for b in by_text.bad_lines)

    by_epoch = run(["body=prompt", "epoch=timestamp", "at=route"])
    # SQLite stores NaN as NULL (row 6 then has no time: the import time is used).
    assert {b.line for b in by_epoch.bad_lines} >= {7, 8}
    by_datetime = run(["body=prompt", "stamp=timestamp"])  # a DATETIME column holding garbage
    assert by_datetime.bad >= 9 and all(MARK not in b.reason for b in by_datetime.bad_lines)
    assert by_datetime.exit_code in (1, 2)
