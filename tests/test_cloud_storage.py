"""Step 1 of the cloud: schema migrations on SQLite and PostgreSQL, and both object stores."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cloud_api import models as m
from cloud_api.db import Database, current_revision, head_revision, insert_ignore
from cloud_api.devsim import crop_row
from cloud_api.storage import (
    LocalObjectStore,
    ObjectConflict,
    ObjectNotFound,
    ObjectStore,
    S3ObjectStore,
    crop_key,
    make_object_store,
)
from shelfloop import contract as c
from shelfloop.settings import StorageSettings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cloud.db'}"
    return request.getfixturevalue("postgres_db")


def test_migrations_create_the_schema_and_are_idempotent(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert current_revision(db.engine) == head_revision() is not None
        Database(db_url).dispose()  # a second start migrates nothing and does not fail
        names = set(sa.inspect(db.engine).get_table_names())
        assert {"crops", "annotation_tasks", "dead_letters", "skus", "devices", "users"} <= names
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        with db.engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), m.Base.metadata
            )
        assert diff == [], "models and migrations disagree"
    finally:
        db.dispose()


def test_timestamps_come_back_timezone_aware(db_url: str) -> None:
    db = Database(db_url)
    try:
        now = c.utc_now()
        with db.session() as s:
            s.add(m.Store(store_id="s1", name="one", created_at=now))
        with db.session() as s:
            got = s.get(m.Store, "s1")
            assert got is not None and got.created_at == now and got.created_at.tzinfo is not None
    finally:
        db.dispose()


def test_idempotent_crop_insert_on_both_databases(db_url: str) -> None:
    db = Database(db_url)
    row = crop_row(
        crop_id="CROP0000001",
        object_key="crops/s/d/abc.jpg",
        sha256="abc",
        size_bytes=3,
        frame_width=10,
        frame_height=10,
        reasons=["novelty"],
        priority=1,
    )
    try:
        with db.session() as s:
            first = insert_ignore(s, m.Crop, row, returning=m.Crop.id)
            second = insert_ignore(s, m.Crop, row, returning=m.Crop.id)
            third = insert_ignore(s, m.Crop, {**row, "crop_id": "CROP0000002"}, returning=m.Crop.id)
        assert first is not None and second is None and third is None  # object_key is unique too
    finally:
        db.dispose()


# ---------------------------------------------------------------------------------------------------------
# Object stores


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return make_object_store(StorageSettings(backend="local", local_dir=tmp_path / "objects"))
    s3 = request.getfixturevalue("s3_server")
    return make_object_store(StorageSettings(**s3.storage_settings(bucket=f"b-{os.urandom(6).hex()}")))


def test_put_if_absent_is_create_only_and_idempotent(store: ObjectStore) -> None:
    key = crop_key("store-1", "dev-1", b"jpeg bytes")
    assert key.startswith("crops/store-1/dev-1/") and key.endswith(".jpg")
    assert store.exists(key) is False
    assert store.put_if_absent(key, b"jpeg bytes", "image/jpeg") is True
    assert store.put_if_absent(key, b"jpeg bytes", "image/jpeg") is False
    assert store.get(key) == b"jpeg bytes"
    with pytest.raises(ObjectConflict):
        store.put_if_absent(key, b"other bytes")
    assert store.get(key) == b"jpeg bytes"
    with pytest.raises(ObjectNotFound):
        store.get("crops/none/none/x.jpg")
    store.delete(key)
    assert store.exists(key) is False
    store.check()


def test_content_addressed_put_needs_no_round_trip_and_checks_the_name(store: ObjectStore) -> None:
    from cloud_api.storage import sha256_hex

    data = b"\xff\xd8 some crop bytes \xff\xd9"
    key = f"crops/s1/d1/{sha256_hex(data)}.jpg"
    store.put_content_addressed(key, data, "image/jpeg")
    store.put_content_addressed(key, data, "image/jpeg")  # a resend rewrites the same bytes
    assert store.get(key) == data
    with pytest.raises(ValueError, match="does not name the SHA-256"):
        store.put_content_addressed(f"crops/s1/d1/{'0' * 64}.jpg", data)


def test_concurrent_writers_of_one_key_both_succeed(store: ObjectStore) -> None:
    data = b"\xff\xd8" + bytes(range(256)) * 40
    key = crop_key("s", "d", data)
    results: list[bool] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            results.append(store.put_if_absent(key, data))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and len(results) == 4 and any(results)
    assert store.get(key) == data


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/./b"])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path).put_if_absent(key, b"x")


def test_crop_key_rejects_ids_that_are_not_topic_levels() -> None:
    with pytest.raises(c.InvalidTopic):
        crop_key("..", "dev", b"x")
    with pytest.raises(c.InvalidTopic):
        crop_key("store", "a/b", b"x")


def test_s3_store_reaches_an_existing_bucket(s3_server: Any) -> None:
    first = S3ObjectStore(s3_server.endpoint, "k", "s", "shared-bucket", region="us-east-1")
    second = S3ObjectStore(s3_server.endpoint, "k", "s", "shared-bucket", region="us-east-1")
    assert first.put_if_absent("a/b", b"1") is True
    assert second.put_if_absent("a/b", b"1") is False


def _backend_pid(db: Database) -> int:
    with db.session() as s:
        return int(s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(db_url: str, pid: int) -> None:
    import psycopg

    url = sa.engine.make_url(db_url)
    with psycopg.connect(f"host={url.host} port={url.port} user={url.username} dbname=postgres") as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@contextmanager
def _pooled_connection_dropped(db_url: str, ping_after_idle_s: float) -> Iterator[tuple[Database, int]]:
    """A one-connection pool whose connection the server has just terminated: (db, its backend pid)."""
    db = Database(db_url, ping_after_idle_s=ping_after_idle_s, pool_size=1, max_overflow=0)
    try:
        first = _backend_pid(db)
        _terminate(db_url, first)
        yield db, first
    finally:
        db.dispose()


@pytest.mark.postgres
def test_an_idle_connection_the_server_dropped_is_replaced_before_use(postgres_db: str) -> None:
    with _pooled_connection_dropped(postgres_db, ping_after_idle_s=0.0) as (db, first):
        assert _backend_pid(db) != first  # no error reached the caller: the ping found it dead


@pytest.mark.postgres
def test_a_busy_connection_is_not_pinged_and_a_dropped_one_fails_once(postgres_db: str) -> None:
    with _pooled_connection_dropped(postgres_db, ping_after_idle_s=3600.0) as (db, first):
        with pytest.raises(sa.exc.OperationalError):
            _backend_pid(db)  # not idle long enough to be pinged: the one transaction in flight fails
        assert _backend_pid(db) != first  # and the pool has already replaced the connection
