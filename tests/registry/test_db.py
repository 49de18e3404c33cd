"""Engine set-up and Alembic migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry import db
from registry.schema import Base, Rollout, RolloutStatus

EXPECTED_TABLES = {
    "prompt_logs",
    "calibration_sets",
    "calibration_set_members",
    "rollouts",
    "stage_results",
    "alias_moves",
}


def test_upgrade_empty_database_and_is_idempotent(db_url: str) -> None:
    assert db.current_revision(db_url) is None
    first = db.upgrade(db_url)
    second = db.upgrade(db_url)  # a no-op, no error
    assert first == second == db.head_revision()
    tables = set(sa.inspect(db.get_engine(db_url)).get_table_names())
    assert tables >= EXPECTED_TABLES


def test_migrations_match_the_models(migrated_db_url: str) -> None:
    """Autogenerate finds nothing to do: migrations and schema.py describe the same tables."""
    with db.get_engine(migrated_db_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_one_active_rollout_per_model_is_enforced_by_the_database(migrated_db_url: str) -> None:
    with db.session_scope(migrated_db_url) as session:
        session.add(Rollout(model_name="m", candidate_version="2", stages=[1, 10, 100]))
    with pytest.raises(sa.exc.IntegrityError), db.session_scope(migrated_db_url) as session:
        session.add(
            Rollout(model_name="m", candidate_version="3", status=RolloutStatus.running, stages=[1])
        )
    # A finished rollout does not block; another model is independent.
    with db.session_scope(migrated_db_url) as session:
        session.add(
            Rollout(
                model_name="m", candidate_version="1", status=RolloutStatus.promoted, stages=[1]
            )
        )
        session.add(Rollout(model_name="other", candidate_version="1", stages=[1]))
    with db.session_scope(migrated_db_url) as session:
        rollouts = session.scalars(sa.select(Rollout).order_by(Rollout.id)).all()
        assert [r.status for r in rollouts] == [
            RolloutStatus.pending,
            RolloutStatus.promoted,
            RolloutStatus.pending,
        ]
        assert rollouts[0].created_at.tzinfo is not None


def test_naive_datetimes_are_refused(migrated_db_url: str) -> None:
    with (
        pytest.raises(sa.exc.StatementError, match="naive datetime"),
        db.session_scope(migrated_db_url) as session,
    ):
        session.add(
            Rollout(
                model_name="m",
                candidate_version="1",
                stages=[1],
                created_at=dt.datetime(2026, 1, 1),
            )
        )


def test_sqlite_default_is_wal_under_fp4roll_home(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FP4ROLL_DB_URL", raising=False)
    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))
    url = db.default_db_url()
    assert url == f"sqlite:///{tmp_path / 'home' / 'fp4roll.db'}"
    try:
        with db.get_engine(url).connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.dispose_engines()


def test_urls_are_normalised_and_passwords_masked(monkeypatch) -> None:
    monkeypatch.setenv("FP4ROLL_DB_URL", "postgresql://u:s3cret@db.example/prod")
    assert db.resolve_url().drivername == "postgresql+psycopg"
    assert "s3cret" not in db.safe_url()
    with pytest.raises(ValueError, match="unsupported database"):
        db.resolve_url("mysql://x@y/z")


def test_ensure_schema_creates_an_empty_database_and_is_a_no_op_after(db_url: str) -> None:
    assert db.ensure_schema(db_url) == db.head_revision()
    assert db.ensure_schema(db_url) == db.head_revision()


def test_require_schema_never_migrates(db_url: str) -> None:
    with pytest.raises(db.SchemaOutdatedError, match="fp4roll db upgrade"):
        db.require_schema(db_url)
    assert db.current_revision(db_url) is None  # still empty: reading created nothing
    db.upgrade(db_url)
    assert db.require_schema(db_url) == db.head_revision()
