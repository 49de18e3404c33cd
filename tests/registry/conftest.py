"""Store fixtures: the same tests run on SQLite and on PostgreSQL (own schema per test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from registry import db


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An EMPTY database URL: a fresh SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fp4roll.db'}"
        yield url
        db.dispose_engines()
        return
    base_url = request.getfixturevalue("postgres_url")
    schema = f"fp4roll_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = (
        sa.engine.make_url(base_url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        yield url
    finally:
        db.dispose_engines()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    """``db_url`` upgraded to the newest schema."""
    db.upgrade(db_url)
    return db_url
