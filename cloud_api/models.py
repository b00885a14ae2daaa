"""SQLAlchemy 2 typed ORM: the cloud's tables, identical on SQLite (embedded) and PostgreSQL (production).

Only portable column types are used (JSON, not JSONB; timestamps through `UTCDateTime`), so one Alembic
history serves both databases. Every table that ingest writes has a natural unique key, which is what makes
at-least-once delivery safe (``INSERT ... ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on both databases (SQLite drops the zone, so store naive UTC there)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """Python-side clock for every timestamp, so comparisons behave the same on SQLite and PostgreSQL."""
    return datetime.now(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names (Alembic needs them to alter SQLite tables)."""

    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: sa.JSON,
        list[Any]: sa.JSON,
    }


# --------------------------------------------------------------------------------------------------------
# Stores and devices


class Store(Base):
    __tablename__ = "stores"

    store_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    devices: Mapped[list[Device]] = relationship(back_populates="store")


class Device(Base):
    """A store device and its MQTT credential (PBKDF2-SHA512 in Mosquitto's own format, never plain)."""

    __tablename__ = "devices"
    __table_args__ = (sa.UniqueConstraint("store_id", "device_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    store_id: Mapped[str] = mapped_column(sa.ForeignKey("stores.store_id"))
    device_id: Mapped[str] = mapped_column(sa.String(64))
    mqtt_username: Mapped[str] = mapped_column(sa.String(128), unique=True)
    password_hash: Mapped[str | None] = mapped_column(sa.String(256))
    status: Mapped[str] = mapped_column(sa.String(16), default="active")  # active | revoked
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]

    store: Mapped[Store] = relationship(back_populates="devices")


# --------------------------------------------------------------------------------------------------------
# Ingested uplinks


class Crop(Base):
    """One uncertain crop; the JPEG lives in object storage under ``object_key`` (content-addressed)."""

    __tablename__ = "crops"

    id: Mapped[int] = mapped_column(primary_key=True)
    crop_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    object_key: Mapped[str] = mapped_column(sa.String(1024), unique=True)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size_bytes: Mapped[int]
    width: Mapped[int]
    height: Mapped[int]
    store_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    device_id: Mapped[str] = mapped_column(sa.String(64))
    camera_id: Mapped[str] = mapped_column(sa.String(64))
    captured_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(sa.String(16))
    model_version: Mapped[str] = mapped_column(sa.String(128))
    gallery_version: Mapped[str] = mapped_column(sa.String(128))
    detector_confidence: Mapped[float]
    box: Mapped[dict[str, Any]]
    frame_width: Mapped[int]
    frame_height: Mapped[int]
    candidates: Mapped[list[Any]]
    reasons: Mapped[list[Any]]
    priority: Mapped[int]
    margin: Mapped[float | None]
    novelty: Mapped[float | None]
    bay_id: Mapped[str | None] = mapped_column(sa.String(64))
    track_id: Mapped[int | None] = mapped_column(sa.BigInteger)


class DeadLetter(Base):
    """An uplink that could not be ingested, kept with its reason so it can be inspected and replayed."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(primary_key=True)
    reason: Mapped[str] = mapped_column(sa.String(32), index=True)
    detail: Mapped[str] = mapped_column(sa.Text)
    topic: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    payload_key: Mapped[str | None] = mapped_column(sa.String(1024))
    payload_size: Mapped[int]
    crop_id: Mapped[str | None] = mapped_column(sa.String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    replayed_at: Mapped[datetime | None]
    replay_result: Mapped[str | None] = mapped_column(sa.String(64))


class HeartbeatRow(Base):
    __tablename__ = "heartbeats"
    __table_args__ = (sa.UniqueConstraint("store_id", "device_id", "sent_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    store_id: Mapped[str] = mapped_column(sa.String(64))
    device_id: Mapped[str] = mapped_column(sa.String(64))
    sent_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    body: Mapped[dict[str, Any]]


class ComplianceSnapshotRow(Base):
    __tablename__ = "compliance_snapshots"

    id: Mapped[int] = mapped_column(primary_key=True)
    snapshot_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    store_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    device_id: Mapped[str] = mapped_column(sa.String(64))
    bay_id: Mapped[str] = mapped_column(sa.String(64))
    captured_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    compliance_pct: Mapped[float]
    availability_pct: Mapped[float]
    image_key: Mapped[str | None] = mapped_column(sa.String(1024))
    body: Mapped[dict[str, Any]]


class CheckoutItemRow(Base):
    __tablename__ = "checkout_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    store_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    device_id: Mapped[str] = mapped_column(sa.String(64))
    basket_id: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))
    sku_id: Mapped[str | None] = mapped_column(sa.String(64))
    probability: Mapped[float]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    body: Mapped[dict[str, Any]]


# --------------------------------------------------------------------------------------------------------
# Catalogue


class Sku(Base):
    """A canonical SKU. ``attributes`` holds what varies by category (product line, form, dimensions...)."""

    __tablename__ = "skus"

    sku_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    gtin: Mapped[str | None] = mapped_column(sa.String(14), unique=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    brand: Mapped[str] = mapped_column(sa.String(128), default="")
    category: Mapped[str] = mapped_column(sa.String(128), default="")
    size: Mapped[str] = mapped_column(sa.String(64), default="")
    flavour: Mapped[str] = mapped_column(sa.String(128), default="")
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(sa.String(16), default="active")  # new | active | discontinued
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    variants: Mapped[list[PackagingVariant]] = relationship(
        back_populates="sku", order_by="PackagingVariant.variant_id"
    )
    images: Mapped[list[ReferenceImage]] = relationship(back_populates="sku", order_by="ReferenceImage.id")


class PackagingVariant(Base):
    """Another look of a product (promo, seasonal, redesign) that counts as its canonical SKU."""

    __tablename__ = "packaging_variants"

    variant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    sku_id: Mapped[str] = mapped_column(sa.ForeignKey("skus.sku_id"), index=True)
    kind: Mapped[str] = mapped_column(sa.String(32), default="standard")
    gtin: Mapped[str | None] = mapped_column(sa.String(14))

    sku: Mapped[Sku] = relationship(back_populates="variants")


class ReferenceImage(Base):
    __tablename__ = "reference_images"
    __table_args__ = (sa.UniqueConstraint("sku_id", "object_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sku_id: Mapped[str] = mapped_column(sa.ForeignKey("skus.sku_id"), index=True)
    variant_id: Mapped[str | None] = mapped_column(sa.String(64))
    object_key: Mapped[str] = mapped_column(sa.String(1024))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    sku: Mapped[Sku] = relationship(back_populates="images")


class CatalogueEvent(Base):
    """Append-only history of catalogue changes: retraining reads it to know which classes changed."""

    __tablename__ = "catalogue_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(sa.String(128))
    action: Mapped[str] = mapped_column(sa.String(32))
    sku_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


# --------------------------------------------------------------------------------------------------------
# Annotation


class AnnotationTask(Base):
    """One crop to label. ``lease_token`` is the fencing token: it grows on every claim."""

    __tablename__ = "annotation_tasks"
    __table_args__ = (
        sa.UniqueConstraint("crop_pk", "is_gold"),
        sa.Index("ix_annotation_tasks_ready", "status", "priority", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    crop_pk: Mapped[int] = mapped_column(sa.ForeignKey("crops.id"))
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")  # pending leased review done dead
    priority: Mapped[int] = mapped_column(default=0)
    required: Mapped[int] = mapped_column(default=1)
    attempts: Mapped[int] = mapped_column(default=0)
    lease_token: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    leased_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"))
    lease_expires_at: Mapped[datetime | None]
    is_gold: Mapped[bool] = mapped_column(default=False)
    gold_label: Mapped[str | None] = mapped_column(sa.String(128))
    final_label: Mapped[str | None] = mapped_column(sa.String(128))
    resolved_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    crop: Mapped[Crop] = relationship()
    annotations: Mapped[list[Annotation]] = relationship(back_populates="task", order_by="Annotation.id")


sa.Index(
    "ix_annotation_tasks_claimable",
    AnnotationTask.is_gold,
    AnnotationTask.priority.desc(),
    AnnotationTask.id,
    # The claim's WHERE and ORDER BY (`cloud_api.queue`): a partial index of the claimable statuses only, so
    # a claim walks open tasks in queue order and never the done ones, which grow without bound. The claim
    # repeats this predicate verbatim, with literals: SQLite uses a partial index only then.
    postgresql_where=AnnotationTask.status.in_(("pending", "leased")),
    sqlite_where=AnnotationTask.status.in_(("pending", "leased")),
)


class Annotation(Base):
    """One annotator's answer to one task. ``label`` is the normalised answer compared for agreement."""

    __tablename__ = "annotations"
    __table_args__ = (sa.UniqueConstraint("task_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(sa.ForeignKey("annotation_tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    outcome: Mapped[str] = mapped_column(sa.String(16))  # sku new_sku not_a_product unreadable skip
    sku_id: Mapped[str | None] = mapped_column(sa.String(64))
    label: Mapped[str] = mapped_column(sa.String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lease_token: Mapped[int] = mapped_column(sa.BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    task: Mapped[AnnotationTask] = relationship(back_populates="annotations")


# --------------------------------------------------------------------------------------------------------
# Users


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(256))
    role: Mapped[str] = mapped_column(sa.String(16))  # annotator reviewer merchandiser admin
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored, so a database leak does not leak sessions."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
