"""Engine, sessions and schema migrations for SQLite (embedded default) and PostgreSQL (production).

Migrations run programmatically at start (`migrate`), so `shelfloop cloud serve` and `shelfloop cloud
ingest` work on an empty database without a separate ``alembic upgrade`` step. On PostgreSQL an advisory
lock serialises concurrent starts (API and workers booting together).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
PING_AFTER_IDLE_S = 10.0
"""A pooled PostgreSQL connection idle longer than this is pinged before use (a restarted server or a
firewall that dropped it); one in steady use is not, which saves a round trip per transaction."""
_MIGRATION_LOCK_ID = 0x5E1F100  # arbitrary, constant: one advisory lock for all ShelfLoop migrations


def make_engine(url: str, *, ping_after_idle_s: float = PING_AFTER_IDLE_S, **kwargs: Any) -> sa.Engine:
    """An engine with the per-dialect settings the cloud relies on.

    SQLite: WAL, foreign keys and ``BEGIN IMMEDIATE`` for every transaction. Deferred transactions that
    later write fail with "database is locked" instead of waiting; immediate ones queue on busy_timeout,
    which makes SQLite's single writer a correct (if serial) queue.
    """
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = sa.create_engine(url, **kwargs)
    _ping_idle_connections(engine, ping_after_idle_s)
    return engine


def _ping_idle_connections(engine: sa.Engine, after_idle_s: float) -> None:
    """``pool_pre_ping``, but only for connections that sat idle.

    A plain pre-ping costs a round trip on every checkout: half the round trips of a queue claim. Stale
    connections come from idleness (server restarts, dropped TCP state), so pinging those catches them
    before use; a server lost mid-burst fails one transaction, the pool invalidates every connection
    older than the failure, and the next checkout gets a fresh one.
    """

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < after_idle_s:
            return
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_conn.rollback()
        except Exception as exc:  # the driver's own error types; any failure means "reconnect"
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc


def is_postgres(bind: sa.Engine | sa.Connection | Session) -> bool:
    """True on PostgreSQL, where the queue can use ``FOR UPDATE SKIP LOCKED``."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name == "postgresql"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from several processes at once on PostgreSQL."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
        command.upgrade(alembic_config(conn), revision)


def current_revision(engine: sa.Engine) -> str | None:
    """The schema's Alembic revision, or None for an empty database (readiness checks use it)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def insert_ignore(
    session: Session, model: type[Any], values: dict[str, Any], *, returning: Any
) -> Any | None:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING``: the new row's ``returning`` value, or None when a
    unique key (any of them) already held it. The same statement on PostgreSQL and SQLite >= 3.35."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported databases
        raise NotImplementedError(dialect)
    stmt = insert(model).values(**values).on_conflict_do_nothing().returning(returning)
    return session.execute(stmt).scalar_one_or_none()


class Database:
    """An engine plus its session factory; one per process."""

    def __init__(self, url: str, *, run_migrations: bool = True, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        if run_migrations:
            migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
