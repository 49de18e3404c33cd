"""Raw store hygiene (issue 11, deliverable 3): private files, erasable raw prompts, stored redactions.

Purge and stored redactions run on SQLite and PostgreSQL; file modes are SQLite's concern.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat

import pytest
import sqlalchemy as sa

from registry import db
from registry import prompt_logs as store
from registry.schema import CalibrationSetMember, PromptLog

UTC = dt.timezone.utc
SECRET_NAME = "Ingrid Vastergaard"  # the text an erasure request names


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------------------------------
# File modes


def test_home_and_sqlite_files_are_private(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FP4ROLL_DB_URL", raising=False)
    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))
    old_umask = os.umask(0o022)  # the usual umask would make everything world-readable
    try:
        url = db.default_db_url()
        db.upgrade(url)
        store.import_files([_jsonl(tmp_path, ["hello there"])], url)
        home = tmp_path / "home"
        assert _mode(home) == 0o700
        database = home / "fp4roll.db"
        assert _mode(database) == 0o600
        side_files = [p for p in home.iterdir() if p.name != "fp4roll.db"]
        assert any(p.name.endswith("-wal") for p in side_files)  # WAL mode: side files exist
        for path in side_files:
            assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
    finally:
        os.umask(old_umask)
        db.dispose_engines()


def test_looser_existing_modes_are_tightened_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    database = home / "fp4roll.db"
    database.touch()
    os.chmod(database, 0o644)
    wal = home / "fp4roll.db-wal"
    wal.touch()
    os.chmod(wal, 0o666)
    monkeypatch.delenv("FP4ROLL_DB_URL", raising=False)
    monkeypatch.setenv("FP4ROLL_HOME", str(home))
    try:
        with caplog.at_level(logging.WARNING, logger="registry.db"):
            db.upgrade(db.default_db_url())
        assert (_mode(home), _mode(database), _mode(wal)) == (0o700, 0o600, 0o600)
        warned = caplog.text
        assert str(home) in warned and str(database) in warned and "tightened" in warned
    finally:
        db.dispose_engines()


def test_a_folder_the_user_chose_is_not_chmodded(tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    url = f"sqlite:///{shared / 'store.db'}"
    try:
        db.upgrade(url)
        assert _mode(shared) == 0o755  # not ours to change
        assert _mode(shared / "store.db") == 0o600  # the store itself is private
    finally:
        db.dispose_engines()


# --------------------------------------------------------------------------------------------------
# Purge


def _jsonl(tmp_path, texts, route="chat", day=5, name="logs.jsonl"):
    path = tmp_path / name
    lines = [
        json.dumps(
            {
                "messages": [{"role": "user", "content": text}],
                "metadata": {"route": route},
                "timestamp": f"2026-01-{day + i % 20:02d}T10:00:00Z",
            }
        )
        for i, text in enumerate(texts)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _seed(url, tmp_path):
    store.import_files(
        [
            _jsonl(tmp_path, [f"support question {i}" for i in range(6)], "chat", 1, "a.jsonl"),
            _jsonl(tmp_path, [f"code question {i}" for i in range(4)], "code", 10, "b.jsonl"),
            _jsonl(
                tmp_path,
                [f"please delete my data, I am {SECRET_NAME}", f"{SECRET_NAME.upper()} again"],
                "chat",
                20,
                "c.jsonl",
            ),
        ],
        url,
    )
    prompts = {p.text: p for p in store.fetch_window(url)}
    victim = prompts[f"user: please delete my data, I am {SECRET_NAME}"]
    members = [
        store.CalibrationMemberRow(
            victim.id, "calibration", 0, "chat", 9, "user: please delete my data, I am Ingrid"
        ),
        store.CalibrationMemberRow(
            prompts["user: code question 0"].id, "holdout", 0, "code", 3, "user: code question 0"
        ),
    ]
    digest = "cd" * 32
    store.save_calibration_set(
        digest=digest, filters={}, seed=0, summary={}, members=members, url=url
    )
    return digest, members


def test_purge_by_matching_text_erases_raw_text_and_keeps_sets(
    migrated_db_url, tmp_path, caplog
) -> None:
    digest, members = _seed(migrated_db_url, tmp_path)
    assert store.count_prompts(migrated_db_url) == 12

    with caplog.at_level(logging.DEBUG):
        dry = store.purge_prompts(migrated_db_url, matching=SECRET_NAME.lower())
        assert (dry.selected, dry.purged, dry.in_calibration_sets, dry.dry_run) == (2, 0, 1, True)
        assert store.count_prompts(migrated_db_url) == 12  # a dry run changes nothing

        done = store.purge_prompts(migrated_db_url, matching=SECRET_NAME, dry_run=False)
    assert (done.selected, done.purged, done.in_calibration_sets) == (2, 2, 1)
    assert SECRET_NAME.lower() not in caplog.text.lower()  # the text is never logged

    # Raw text gone everywhere in prompt_logs; the rows stay (members still reference them).
    with db.get_engine(migrated_db_url).connect() as conn:
        rows = conn.execute(
            sa.select(PromptLog.messages, PromptLog.prompt_text, PromptLog.redacted_text).where(
                PromptLog.purged_at.is_not(None)
            )
        ).all()
        assert len(rows) == 2 and all(r == (None, None, None) for r in rows)
        dump = " ".join(str(v) for row in conn.execute(sa.select(PromptLog)).all() for v in row)
        assert SECRET_NAME not in dump and SECRET_NAME.upper() not in dump
        kept = conn.execute(
            sa.select(sa.func.count()).select_from(CalibrationSetMember)
        ).scalar_one()
        assert kept == 2
    assert store.count_prompts(migrated_db_url) == 10
    assert store.count_prompts(migrated_db_url, include_purged=True) == 12
    assert all(SECRET_NAME not in p.text for p in store.fetch_window(migrated_db_url))

    # The calibration set is still explainable: same digest, same redacted members.
    loaded = store.load_calibration_set(digest, migrated_db_url)
    assert loaded.members == tuple(members)

    # Idempotent; a re-import of the same lines does not bring the text back.
    again = store.purge_prompts(migrated_db_url, matching=SECRET_NAME, dry_run=False)
    assert (again.selected, again.purged) == (0, 0)
    report = store.import_files([tmp_path / "c.jsonl"], migrated_db_url)
    assert (report.imported, report.duplicates) == (0, 2)
    assert store.count_prompts(migrated_db_url) == 10


def test_purge_by_time_route_and_regex(migrated_db_url, tmp_path) -> None:
    _seed(migrated_db_url, tmp_path)
    by_time = store.purge_prompts(
        migrated_db_url, before=dt.datetime(2026, 1, 4, tzinfo=UTC), dry_run=False
    )
    assert by_time.purged == 3  # 2026-01-01 .. 01-03 of route chat
    by_route = store.purge_prompts(migrated_db_url, routes=["code"], dry_run=False)
    assert by_route.purged == 4
    combined = store.purge_prompts(
        migrated_db_url, routes=["chat"], matching=r"question [45]", regex=True, dry_run=False
    )
    assert combined.purged == 2 and combined.already_purged == 3
    left = sorted(p.text for p in store.fetch_window(migrated_db_url))
    assert left == [
        f"user: {SECRET_NAME.upper()} again",
        f"user: please delete my data, I am {SECRET_NAME}",
        "user: support question 3",
    ]
    with pytest.raises(ValueError, match="at least one filter"):
        store.purge_prompts(migrated_db_url)
    with pytest.raises(ValueError, match="invalid regular expression") as info:
        store.purge_prompts(migrated_db_url, matching="Ingrid(", regex=True)
    assert "Ingrid" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# Stored redactions


def test_redactions_are_stored_once_per_prompt_and_version(migrated_db_url, tmp_path) -> None:
    store.import_files([_jsonl(tmp_path, ["mail bob@example.com", "plain text"])], migrated_db_url)
    calls = []

    def fake_redact(messages, text):
        from calibration.redaction import RedactedPrompt

        calls.append(messages)
        redacted = tuple(
            {"role": m["role"], "content": m["content"].replace("bob@example.com", "[EMAIL]")}
            for m in messages
        )
        counts = {"email": 1} if "bob@" in messages[0]["content"] else {}
        flat = "\n\n".join(f"{m['role']}: {m['content']}" for m in redacted)
        return RedactedPrompt(flat, redacted, counts)

    assert store.store_redactions(migrated_db_url, redact_prompt=fake_redact, version="v1") == 2
    assert store.store_redactions(migrated_db_url, redact_prompt=fake_redact, version="v1") == 0
    assert len(calls) == 2  # once per prompt
    prompts = {p.text: p for p in store.fetch_window(migrated_db_url)}
    mail = prompts["user: mail bob@example.com"]
    assert mail.redacted_text == "user: mail [EMAIL]" and mail.redactor_version == "v1"
    assert mail.redacted_messages == ({"role": "user", "content": "mail [EMAIL]"},)
    assert mail.redaction_counts == {"email": 1}
    assert store.store_redactions(migrated_db_url, redact_prompt=fake_redact, version="v2") == 2
    assert {p.redactor_version for p in store.fetch_window(migrated_db_url)} == {"v2"}


def test_migration_downgrade_and_upgrade_again(db_url) -> None:
    from alembic import command

    db.upgrade(db_url)
    with db.get_engine(db_url).begin() as connection:
        command.downgrade(db._alembic_config(connection), "0002")
    assert db.current_revision(db_url) == "0002"
    assert db.upgrade(db_url) == db.head_revision()


def test_import_sql_leaves_the_source_database_alone(migrated_db_url, tmp_path) -> None:
    source = tmp_path / "app.db"
    engine = sa.create_engine(f"sqlite:///{source}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (body TEXT)")
        conn.exec_driver_sql("INSERT INTO t VALUES ('hello from the app')")
    engine.dispose()
    os.chmod(source, 0o644)
    report = store.import_sql(f"sqlite:///{source}", "t", {"prompt": "body"}, migrated_db_url)
    assert report.imported == 1
    assert _mode(source) == 0o644  # not our file: no chmod
    assert not (tmp_path / "app.db-wal").exists()  # and no switch to WAL
    with pytest.raises(sa.exc.OperationalError):
        store.import_sql(
            f"sqlite:///{tmp_path / 'missing' / 'x.db'}", "t", {"prompt": "body"}, migrated_db_url
        )
    assert not (tmp_path / "missing").exists()
