"""The production database stack (SQLAlchemy 2 + psycopg 3) against a real PostgreSQL server.

Idempotent insert is the primitive the cloud's ingest relies on for exactly-once crops."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.postgres


def test_idempotent_insert_on_a_real_server(postgres_url):
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(postgres_url)
    meta = sa.MetaData()
    crops = sa.Table(
        "crops",
        meta,
        sa.Column("object_key", sa.String, primary_key=True),
        sa.Column("crop_id", sa.String, nullable=False),
    )
    meta.create_all(engine)
    from sqlalchemy.dialects.postgresql import insert

    # RETURNING tells the ingest worker whether this delivery created the row or found it already there.
    stmt = (
        insert(crops)
        .values(object_key="crops/s1/d1/abc.jpg", crop_id="c1")
        .on_conflict_do_nothing()
        .returning(crops.c.object_key)
    )
    with engine.begin() as conn:
        first = len(conn.execute(stmt).all())
        second = len(conn.execute(stmt).all())
        rows = conn.execute(sa.select(sa.func.count()).select_from(crops)).scalar_one()
    assert (first, second, rows) == (1, 0, 1)
    assert engine.dialect.name == "postgresql"
    engine.dispose()
