"""Engines, sessions and migrations for the fp4roll store.

Default: a SQLite file ``$FP4ROLL_HOME/fp4roll.db`` (FP4ROLL_HOME defaults to ``~/.fp4roll``) in WAL
mode with a busy timeout, so a CLI, a flow and a reader can share it. The store holds raw prompts:
FP4ROLL_HOME is created 0700 and the SQLite file and its side files 0600; looser existing modes are
tightened with a warning. Production: PostgreSQL by URL,
through the argument or ``FP4ROLL_DB_URL`` (``postgresql://`` is mapped to the psycopg 3 driver).

Schema changes go through Alembic (``upgrade(url)``, CLI ``fp4roll db upgrade``); the migration scripts
ship inside the package, so this works from an installed wheel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from registry.url_redaction import redact_urls

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


PRIVATE_DIR_MODE = 0o700  # FP4ROLL_HOME: raw prompts, MLflow runs and checkpoints live below it
PRIVATE_FILE_MODE = 0o600  # the SQLite store and its -wal / -shm / -journal side files
SQLITE_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
_tightened: set[str] = set()


def tighten_permissions(path: Path, mode: int) -> bool:
    """Remove every permission bit of ``path`` outside ``mode`` (group/other access), with a
    warning naming the path and both modes. Missing paths are ignored. Returns True if changed."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if not current & ~mode:
        return False
    tightened = current & mode
    os.chmod(path, tightened)
    if str(path) not in _tightened:
        _tightened.add(str(path))
        logger.warning(
            "%s was readable by others (mode %o): tightened to %o", path, current, tightened
        )
    return True


def secure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) private to the owner, or tighten it if it exists."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    else:
        tighten_permissions(path, PRIVATE_DIR_MODE)
    return path


def _home_path() -> Path:
    return Path(os.environ.get("FP4ROLL_HOME") or Path.home() / ".fp4roll").expanduser()


def fp4roll_home() -> Path:
    """``$FP4ROLL_HOME`` or ``~/.fp4roll``, created 0700 (an existing looser one is tightened)."""
    return secure_dir(_home_path())


def secure_sqlite_file(database: str | Path) -> None:
    """Create the SQLite file 0600 before SQLite opens it (it would use the umask, usually 0644)
    and tighten it and its side files if they exist with looser modes. SQLite gives the -wal and
    -shm files it creates the mode of the database file."""
    path = Path(database)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE_MODE))
    for candidate in (path, *(Path(f"{path}{suffix}") for suffix in SQLITE_SIDE_SUFFIXES)):
        tighten_permissions(candidate, PRIVATE_FILE_MODE)


def default_db_url() -> str:
    """``$FP4ROLL_DB_URL`` if set, else the SQLite file under ``FP4ROLL_HOME``."""
    env_url = os.environ.get("FP4ROLL_DB_URL")
    if env_url:
        return env_url
    return f"sqlite:///{_home_path() / 'fp4roll.db'}"


def resolve_url(url: str | URL | None = None) -> URL:
    """Normalise a database URL: default when None, psycopg 3 driver for bare PostgreSQL URLs."""
    parsed = make_url(url if url is not None else default_db_url())
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not (parsed.drivername.startswith("sqlite") or parsed.drivername.startswith("postgresql")):
        raise ValueError(
            f"unsupported database {parsed.drivername!r}: use sqlite:///path or postgresql://…"
        )
    return parsed


def safe_url(url: str | URL | None = None) -> str:
    """The URL with its credentials masked (:func:`registry.url_redaction.redact_urls`), for
    logs and messages."""
    return redact_urls(resolve_url(url).render_as_string(hide_password=False))


def _configure_sqlite(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")  # ignored (stays 'memory') for :memory:
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def create_engine_for(url: str | URL | None = None) -> Engine:
    """A new engine for ``url`` (see module doc). Creates the SQLite file's directory if needed."""
    resolved = resolve_url(url)
    if resolved.drivername.startswith("sqlite"):
        database = resolved.database
        on_disk = database and database != ":memory:" and not database.startswith("file:")
        if on_disk:
            path = Path(database).expanduser()
            if path.parent == _home_path() or not path.parent.exists():
                secure_dir(path.parent)  # never chmod a folder the user chose (e.g. /tmp)
            secure_sqlite_file(path)
        engine = sa.create_engine(resolved, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        sa.event.listen(engine, "connect", _configure_sqlite)
        if on_disk:
            # WAL mode creates -wal/-shm on the first connection: check them then too.
            sa.event.listen(engine, "connect", lambda *_: secure_sqlite_file(path))
    else:
        engine = sa.create_engine(resolved, pool_pre_ping=True)
    logger.debug("engine for %s", safe_url(resolved))
    return engine


def get_engine(url: str | URL | None = None) -> Engine:
    """A process-wide cached engine per URL."""
    key = resolve_url(url).render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = create_engine_for(key)
    return engine


def dispose_engines() -> None:
    """Close every cached engine (tests, forked workers)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(url: str | URL | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str | URL | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(connection: sa.Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Hand the live connection to env.py: no URL round trip (passwords with '%' survive).
    config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs INFO lines on every run; keep them unless DEBUG logging is on."""
    alembic_logger = logging.getLogger("alembic")
    previous_level = alembic_logger.level
    if not alembic_logger.isEnabledFor(logging.DEBUG):
        alembic_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic_logger.setLevel(previous_level)


def upgrade(url: str | URL | None = None, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision``; idempotent. Returns the new revision."""
    with _quiet_alembic():
        from alembic import command

        with get_engine(url).begin() as connection:
            command.upgrade(_alembic_config(connection), revision)
        current = current_revision(url)
    logger.debug("database %s at revision %s", safe_url(url), current)
    return current


def current_revision(url: str | URL | None = None) -> str | None:
    """The Alembic revision the database is at (None for an empty database)."""
    with _quiet_alembic():
        from alembic.runtime.migration import MigrationContext

        with get_engine(url).connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()


class SchemaOutdatedError(RuntimeError):
    """The database schema is older than this package and must be migrated explicitly."""


def ensure_schema(url: str | URL | None = None) -> str | None:
    """Make the schema usable: an empty database (or SQLite) is migrated to head; an outdated
    PostgreSQL database is refused with the command to run (production migrations are explicit)."""
    current, head = current_revision(url), head_revision()
    if current == head:
        return current
    if current is None or resolve_url(url).drivername.startswith("sqlite"):
        return upgrade(url)
    raise SchemaOutdatedError(
        f"database {safe_url(url)} is at revision {current}, this fp4roll needs {head}: "
        "run `fp4roll db upgrade` first"
    )


def require_schema(url: str | URL | None = None) -> str:
    """For read-only commands: the schema must already be at head; never migrates (creating or
    changing a schema is the job of the commands that write, or of ``fp4roll db upgrade``)."""
    current, head = current_revision(url), head_revision()
    if current == head and current is not None:
        return current
    if current is None:
        raise SchemaOutdatedError(
            f"database {safe_url(url)} has no fp4roll schema yet: run `fp4roll db upgrade` "
            "(or a command that writes, e.g. `fp4roll logs import`) first"
        )
    raise SchemaOutdatedError(
        f"database {safe_url(url)} is at revision {current}, this fp4roll needs {head}: "
        "run `fp4roll db upgrade` first"
    )


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
