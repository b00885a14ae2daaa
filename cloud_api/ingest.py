"""The ingest worker: device uplinks from MQTT into object storage and the database, then the device's ack.

Order per crop (the reliability argument of ARCHITECTURE.md step 3):

1. ``contract.decode`` + ``contract.check_topic_matches`` + a full JPEG decode (Pillow);
2. the JPEG goes to object storage under its content-addressed key (create if absent);
3. one transaction inserts the crop row (``ON CONFLICT DO NOTHING``, unique on crop id and object key)
   and its annotation task — the worker puts the objects of several crops concurrently and writes their
   rows in one transaction (`Ingestor.prepare`, `Ingestor.record_crops`), the order per crop unchanged;
4. only then a `CropAck` (QoS 1) goes to the device, and only then the broker gets our PUBACK
   (manual acks), so a crash anywhere before leaves the message with the broker (persistent session) and
   with the device (outbox), and the retry finds the object and the row already there.

A checkout item follows the same order without the object store: its row is committed (``ON CONFLICT DO
NOTHING`` on ``event_id``, so a resend is one row and a ``duplicate``), then a `CheckoutAck` goes to the
device, which deletes the item from its outbox only then.

Anything invalid becomes a dead letter with a stable reason code; nothing a device sends can stop the worker.
"""

from __future__ import annotations

import io
import logging
import queue
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgspec
import sqlalchemy as sa

from cloud_api import models as m
from cloud_api.db import Database, insert_ignore
from cloud_api.metrics import INGEST_LATENCY, INGEST_MESSAGES
from cloud_api.queue import task_priority
from cloud_api.storage import ObjectConflict, ObjectStore, sha256_hex
from shelfloop import contract
from shelfloop.settings import Settings

__all__ = [
    "IngestResult",
    "IngestWorker",
    "Ingestor",
    "PreparedCrop",
    "full_jpeg_decode",
    "main",
    "replay_dead_letter",
    "serve_metrics",
]

log = logging.getLogger("shelfloop.cloud.ingest")

INLINE_PAYLOAD_BYTES = 64 * 1024
"""Dead-letter payloads up to this size live in the table; larger ones in object storage."""
MAX_PIXELS = 40_000_000
_CROP_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_EVENT_ID_RE = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,64}$")  # contract.Identifier


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What happened to one uplink, and the ack (if any) the device must get."""

    kind: str | None
    status: Literal["stored", "duplicate", "rejected"]
    reason: str | None = None
    crop_id: str | None = None
    object_key: str | None = None
    ack_topic: str | None = None
    ack: contract.CropAck | contract.CheckoutAck | None = None
    dead_letter_id: int | None = None
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class PreparedCrop:
    """A valid crop whose JPEG is already in object storage; only its row and task are still to be written."""

    msg: contract.UncertainCrop
    key: str
    row: dict[str, Any]


def _insert_crops(conn: sa.Connection, rows: list[dict[str, Any]]) -> dict[str, int]:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING crop_id, id`` for many rows: the new rows' primary keys
    by crop id (a row whose crop id or object key is already taken is left out).

    Core ``executemany``, which SQLAlchemy sends as multi-row INSERTs ("insertmanyvalues") from one cached
    compiled statement: ``.values(rows)`` would compile a new statement for every batch, at about 5 ms a
    crop in the profile, more than the row itself costs."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    crops = m.Crop.__table__
    stmt = insert(crops).on_conflict_do_nothing().returning(crops.c.crop_id, crops.c.id)
    return {crop_id: pk for crop_id, pk in conn.execute(stmt, rows)}


class _IdPeek(msgspec.Struct):
    kind: Any = msgspec.UNSET
    crop_id: Any = msgspec.UNSET
    event_id: Any = msgspec.UNSET


_PEEK = msgspec.msgpack.Decoder(_IdPeek)


def _readable_ids(payload: bytes) -> tuple[str | None, str | None]:
    """``(crop_id, event_id)`` of a payload that failed validation, when one can still be read (for the
    rejected ack): the event id only of something that says it is a checkout item."""
    try:
        peek = _PEEK.decode(payload)
    except Exception:
        return None, None
    crop_id = peek.crop_id if isinstance(peek.crop_id, str) and _CROP_ID_RE.match(peek.crop_id) else None
    event_id = peek.event_id
    if peek.kind != contract.KIND_CHECKOUT_ITEM or not isinstance(event_id, str):
        return crop_id, None
    return crop_id, event_id if _EVENT_ID_RE.match(event_id) else None


def _printable(text: str) -> str:
    """No NUL in text columns (PostgreSQL rejects it; error messages can quote device input)."""
    return text.replace("\x00", "\\x00")


_DECODE_LOCK = threading.Lock()


def full_jpeg_decode(data: bytes) -> tuple[int, int]:
    """Decode every pixel with Pillow: the contract's structural check cannot see corrupt scan data.

    Pillow warns on some corrupt data instead of failing, so any warning this call raises rejects the JPEG.
    Warnings filters are process-wide and the worker decodes on several threads: decodes take a lock (two
    ``catch_warnings`` blocks on different threads would restore each other's state) and only the calling
    thread's warnings count; another thread's are shown as usual, not raised in that thread."""
    from PIL import Image

    width, height = contract.jpeg_dimensions(data)
    if width * height > MAX_PIXELS:
        raise contract.InvalidImage(f"JPEG is {width}x{height}, over {MAX_PIXELS} pixels")
    caller = threading.get_ident()
    own: list[Warning | str] = []  # warnings this thread raised while decoding

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if threading.get_ident() == caller:
            own.append(message)
        else:
            shown(message, category, filename, lineno, file, line)

    try:
        with _DECODE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("always")
            shown, warnings.showwarning = warnings.showwarning, show
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG":
                    raise contract.InvalidImage(f"not a JPEG ({img.format})")
                img.load()
                size = img.size
    except contract.InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise contract.InvalidImage(f"JPEG does not decode: {exc}") from None
    if own:
        raise contract.InvalidImage(f"JPEG does not decode cleanly: {own[0]}")
    return size


def _ack(crop_id: str, status: contract.AckStatus, reason: str | None, key: str | None) -> contract.CropAck:
    return contract.CropAck(
        crop_id=crop_id, status=status, reason=reason, object_key=key, acked_at=contract.utc_now()
    )


def _item_ack(event_id: str, status: contract.AckStatus, reason: str | None) -> contract.CheckoutAck:
    return contract.CheckoutAck(event_id=event_id, status=status, reason=reason, acked_at=contract.utc_now())


class Ingestor:
    """Uplink handling without MQTT: decode, validate, store, record. The worker and replay share it."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        *,
        image_check: Literal["full", "structural"] = "full",
        consensus_k: int = 1,
    ) -> None:
        self.db = db
        self.store = store
        self.image_check = image_check
        self.consensus_k = consensus_k

    # -- entry point ----------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, *, record_dead_letter: bool = True) -> IngestResult:
        """Ingest one uplink. Invalid input is dead-lettered and returned as ``rejected``; infrastructure
        failures (database, object storage down) raise, so the caller retries without acking."""
        try:
            msg = contract.decode(payload)
            contract.check_topic_matches(topic, msg)
            if isinstance(msg, contract.UncertainCrop):
                return self._crop(topic, msg)
            if isinstance(msg, contract.Heartbeat):
                return self._heartbeat(msg)
            if isinstance(msg, contract.ComplianceSnapshot):
                return self._compliance(msg)
            if isinstance(msg, contract.CheckoutItem):
                return self._checkout(msg)
            raise contract.TopicMismatch(f"{msg.kind} is not an uplink message")  # pragma: no cover
        except contract.ContractError as exc:
            return self._reject(topic, payload, exc.reason, str(exc), record=record_dead_letter)
        except ObjectConflict as exc:
            return self._reject(topic, payload, "object_conflict", str(exc), record=record_dead_letter)

    # -- crops in two stages (the worker runs the first on several threads, the second once per batch) --

    def prepare(self, topic: str, payload: bytes) -> PreparedCrop | None:
        """Decode and check an uplink and, for a crop, decode its JPEG and put it in object storage.

        None for any other kind (the caller passes those to `handle`). Raises what `handle` would turn
        into a dead letter (`contract.ContractError`, `ObjectConflict`) and infrastructure errors alike:
        the caller then runs the message through `handle`, which dead-letters or retries it."""
        msg = contract.decode(payload)
        contract.check_topic_matches(topic, msg)
        if not isinstance(msg, contract.UncertainCrop):
            return None
        return self._put_crop(msg)

    def record_crops(self, crops: Sequence[PreparedCrop]) -> list[IngestResult]:
        """Rows and annotation tasks of prepared crops in ONE transaction; results in input order.

        A crop whose id or object key is already stored, or that repeats an earlier one of ``crops`` (a
        resend caught in the same batch), is a ``duplicate`` acked with the stored crop's key."""
        if not crops:
            return []
        rows: dict[str, dict[str, Any]] = {}  # the first arrival of each crop id and of each object key
        keys: set[str] = set()
        for crop in crops:
            if crop.msg.crop_id not in rows and crop.key not in keys:
                rows[crop.msg.crop_id] = crop.row
                keys.add(crop.key)
        with self.db.session() as s:
            conn = s.connection()
            # Sorted, so two workers inserting overlapping batches take the row locks in the same order.
            new = _insert_crops(conn, sorted(rows.values(), key=lambda r: r["crop_id"]))
            tasks = [
                {
                    "crop_pk": new[crop_id],
                    "priority": task_priority(row["priority"], row["novelty"], row["source"]),
                    "required": self.consensus_k,
                    "status": "pending",
                }
                for crop_id, row in rows.items()  # arrival order, which breaks priority ties in the queue
                if crop_id in new
            ]
            if tasks:
                conn.execute(sa.insert(m.AnnotationTask.__table__), tasks)
            known = {crop_id: rows[crop_id]["object_key"] for crop_id in new}
            taken = list({crop.msg.crop_id for crop in crops} - known.keys())
            if taken:
                stmt = sa.select(m.Crop.crop_id, m.Crop.object_key).where(m.Crop.crop_id.in_(taken))
                known.update((crop_id, key) for crop_id, key in conn.execute(stmt))
        results: list[IngestResult] = []
        for crop in crops:
            crop_id = crop.msg.crop_id
            status: contract.AckStatus = "stored" if new.pop(crop_id, None) is not None else "duplicate"
            key = known.get(crop_id, crop.key)  # not known: the same bytes are filed under another crop id
            results.append(
                IngestResult(
                    kind=crop.msg.kind,
                    status=status,
                    crop_id=crop_id,
                    object_key=key,
                    ack_topic=contract.ack_topic(crop.msg.store_id, crop.msg.device_id),
                    ack=_ack(crop_id, status, None, key),
                )
            )
        return results

    # -- per kind -------------------------------------------------------------------------------------

    def _crop(self, topic: str, msg: contract.UncertainCrop) -> IngestResult:
        return self.record_crops([self._put_crop(msg)])[0]

    def _put_crop(self, msg: contract.UncertainCrop) -> PreparedCrop:
        if self.image_check == "full":
            width, height = full_jpeg_decode(msg.jpeg)
        else:
            width, height = contract.jpeg_dimensions(msg.jpeg)
        digest = sha256_hex(msg.jpeg)
        key = f"crops/{msg.store_id}/{msg.device_id}/{digest}.jpg"
        self.store.put_content_addressed(key, msg.jpeg, "image/jpeg")
        row = {
            "crop_id": msg.crop_id,
            "object_key": key,
            "sha256": digest,
            "size_bytes": len(msg.jpeg),
            "width": width,
            "height": height,
            "store_id": msg.store_id,
            "device_id": msg.device_id,
            "camera_id": msg.camera_id,
            "captured_at": msg.captured_at,
            "received_at": contract.utc_now(),
            "source": msg.source,
            "model_version": msg.model_version,
            "gallery_version": msg.gallery_version,
            "detector_confidence": msg.detector_confidence,
            "box": msgspec.to_builtins(msg.box),
            "frame_width": msg.frame_width,
            "frame_height": msg.frame_height,
            "candidates": msgspec.to_builtins(msg.candidates),
            "reasons": list(msg.reasons),
            "priority": msg.priority,
            "margin": msg.margin,
            "novelty": msg.novelty,
            "bay_id": msg.bay_id,
            "track_id": msg.track_id,
        }
        return PreparedCrop(msg=msg, key=key, row=row)

    def _heartbeat(self, msg: contract.Heartbeat) -> IngestResult:
        now = contract.utc_now()
        with self.db.session() as s:
            new = insert_ignore(
                s,
                m.HeartbeatRow,
                {
                    "store_id": msg.store_id,
                    "device_id": msg.device_id,
                    "sent_at": msg.sent_at,
                    "received_at": now,
                    "body": msgspec.to_builtins(msg),
                },
                returning=m.HeartbeatRow.id,
            )
            s.execute(
                sa.update(m.Device)
                .where(m.Device.store_id == msg.store_id, m.Device.device_id == msg.device_id)
                .values(last_seen_at=now)
            )
        return IngestResult(kind=msg.kind, status="stored" if new else "duplicate")

    def _compliance(self, msg: contract.ComplianceSnapshot) -> IngestResult:
        image_key = None
        if msg.image_jpeg is not None:
            if self.image_check == "full":
                full_jpeg_decode(msg.image_jpeg)
            image_key = f"compliance/{msg.store_id}/{msg.device_id}/{sha256_hex(msg.image_jpeg)}.jpg"
            self.store.put_if_absent(image_key, msg.image_jpeg, "image/jpeg")
        body = msgspec.to_builtins(msg)
        body.pop("image_jpeg", None)
        with self.db.session() as s:
            new = insert_ignore(
                s,
                m.ComplianceSnapshotRow,
                {
                    "snapshot_id": msg.snapshot_id,
                    "store_id": msg.store_id,
                    "device_id": msg.device_id,
                    "bay_id": msg.bay_id,
                    "captured_at": msg.captured_at,
                    "received_at": contract.utc_now(),
                    "compliance_pct": msg.compliance_pct,
                    "availability_pct": msg.availability_pct,
                    "image_key": image_key,
                    "body": body,
                },
                returning=m.ComplianceSnapshotRow.id,
            )
        return IngestResult(kind=msg.kind, status="stored" if new else "duplicate", object_key=image_key)

    def _checkout(self, msg: contract.CheckoutItem) -> IngestResult:
        """One row per ``event_id``; the ack is built here but published by the caller, after the commit
        (a resend finds the row and is acked as ``duplicate``, so the device can always let go)."""
        with self.db.session() as s:
            new = insert_ignore(
                s,
                m.CheckoutItemRow,
                {
                    "event_id": msg.event_id,
                    "store_id": msg.store_id,
                    "device_id": msg.device_id,
                    "basket_id": msg.basket_id,
                    "status": msg.status,
                    "sku_id": msg.sku_id,
                    "probability": msg.probability,
                    "received_at": contract.utc_now(),
                    "body": msgspec.to_builtins(msg),
                },
                returning=m.CheckoutItemRow.id,
            )
        status: contract.AckStatus = "stored" if new else "duplicate"
        return IngestResult(
            kind=msg.kind,
            status=status,
            event_id=msg.event_id,
            ack_topic=contract.checkout_ack_topic(msg.store_id, msg.device_id),
            ack=_item_ack(msg.event_id, status, None),
        )

    # -- dead letters ---------------------------------------------------------------------------------

    def reject(self, topic: str, payload: bytes, reason: str, detail: str) -> IngestResult:
        """Dead-letter an uplink for a reason found outside `handle` (e.g. it keeps crashing ingest)."""
        return self._reject(topic, payload, reason, detail, record=True)

    def _reject(self, topic: str, payload: bytes, reason: str, detail: str, *, record: bool) -> IngestResult:
        crop_id, event_id = _readable_ids(payload)
        dl_id = self.record_dead_letter(topic, payload, reason, detail, crop_id) if record else None
        ack_topic: str | None = None
        ack: contract.CropAck | contract.CheckoutAck | None = None
        if crop_id is not None or event_id is not None:
            try:
                info = contract.parse_topic(topic)
            except contract.ContractError:
                info = None
            # The ack goes to the sender: the broker ACL lets a device publish only under its own topics.
            if info is not None and info.direction == "up" and info.store_id and info.device_id:
                if event_id is not None:  # a checkout item: kept as a dead letter, so the device may let go
                    ack_topic = contract.checkout_ack_topic(info.store_id, info.device_id)
                    ack = _item_ack(event_id, "rejected", reason)
                elif crop_id is not None:
                    ack_topic = contract.ack_topic(info.store_id, info.device_id)
                    ack = _ack(crop_id, "rejected", reason, None)
        log.info(
            "dead letter",
            extra={"reason": reason, "topic": topic[:256], "crop_id": crop_id, "event_id": event_id},
        )
        return IngestResult(
            kind=None,
            status="rejected",
            reason=reason,
            crop_id=crop_id,
            ack_topic=ack_topic,
            ack=ack,
            dead_letter_id=dl_id,
            event_id=event_id,
        )

    def record_dead_letter(
        self, topic: str, payload: bytes, reason: str, detail: str, crop_id: str | None = None
    ) -> int:
        payload_key = None
        inline: bytes | None = payload
        if len(payload) > INLINE_PAYLOAD_BYTES:
            key = f"dead-letters/{sha256_hex(payload)}.bin"
            try:
                self.store.put_if_absent(key, payload)
                payload_key, inline = key, None
            except Exception:  # keep it in the table rather than lose it
                log.exception("dead-letter payload could not go to object storage")
        with self.db.session() as s:
            row = m.DeadLetter(
                reason=reason,
                detail=_printable(detail)[:4000],
                topic=_printable(topic)[:65535],
                payload=inline,
                payload_key=payload_key,
                payload_size=len(payload),
                crop_id=crop_id,
                received_at=contract.utc_now(),
            )
            s.add(row)
            s.flush()
            return row.id

    def dead_letter_payload(self, row: m.DeadLetter) -> bytes:
        if row.payload is not None:
            return row.payload
        assert row.payload_key is not None
        return self.store.get(row.payload_key)


def replay_dead_letter(ingestor: Ingestor, dead_letter_id: int) -> IngestResult:
    """Run a dead letter through ingest again (after a fix); the outcome is recorded on the row.

    A replay that fails again does not add a second dead letter; no ack is published (the device got its
    ``rejected`` ack and deleted the crop).
    """
    with ingestor.db.session() as s:
        row = s.get(m.DeadLetter, dead_letter_id)
        if row is None:
            raise KeyError(dead_letter_id)
        topic, payload = row.topic, ingestor.dead_letter_payload(row)
    result = ingestor.handle(topic, payload, record_dead_letter=False)
    outcome = result.status if result.status != "rejected" else f"rejected:{result.reason}"
    with ingestor.db.session() as s:
        s.execute(
            sa.update(m.DeadLetter)
            .where(m.DeadLetter.id == dead_letter_id)
            .values(replayed_at=contract.utc_now(), replay_result=outcome)
        )
    return result


# ---------------------------------------------------------------------------------------------------------
# The MQTT worker


class _Inbound(NamedTuple):
    """A received message, the pool's work on it (None: take the one-message path) and when it arrived."""

    msg: Any
    future: Future[PreparedCrop | None] | None
    received: float


class IngestWorker:
    """One ingest worker: a persistent MQTT v5 session on the shared subscription, QoS 1, manual acks.

    Messages are acked in arrival order; the broker's PUBACK for a message is sent only after it was
    stored (or dead-lettered) and its `CropAck` or `CheckoutAck` was handed to the client. A crop's checks
    and object write start on a small thread pool as it arrives; the processing thread takes the results
    in order and writes the rows of the crops ready together in one transaction, then acks them (the S3
    round trips of later crops overlap the database work of earlier ones). Everything else, and any crop
    whose fast path failed, goes through `Ingestor.handle` one message at a time. Infrastructure errors
    are retried with backoff while holding the message, which is natural back-pressure.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        host: str,
        port: int,
        client_id: str,
        group: str = "ingest",
        username: str | None = None,
        password: str | None = None,
        session_expiry_s: int = 3600,
        keepalive_s: int = 30,
        on_result: Callable[[IngestResult], None] | None = None,
        max_failures: int = 5,
        batch_size: int = 32,
        put_threads: int = 4,
    ) -> None:
        """``max_failures``: unexpected errors on one message before it is dead-lettered as
        ``ingest_error``. While the database itself is down, dead-lettering fails too and the worker keeps
        retrying with backoff, holding the message (and the broker holds the rest).

        ``put_threads``: crops validated and put in object storage at once (the S3 round trip is the
        slowest step, and the minio client is thread-safe). ``batch_size``: most crops written in one
        transaction; a batch is whatever arrived while the previous one was written, so it costs no wait."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.ingestor = ingestor
        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self.subscription = contract.shared_ingest_subscription(group)
        self.session_expiry_s = session_expiry_s
        self.on_result = on_result
        self.max_failures = max_failures
        self.batch_size = max(1, batch_size)
        self.put_threads = max(1, put_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._last_error = ""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1000)
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.processed = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.2, 5)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> IngestWorker:
        from cloud_api.storage import make_object_store

        db = Database(settings.database.url)
        ingestor = Ingestor(
            db,
            make_object_store(settings.storage),
            image_check=settings.cloud.image_check,
            consensus_k=settings.cloud.queue.consensus_k,
        )
        password = settings.mqtt.password.get_secret_value() if settings.mqtt.password else None
        return cls(
            ingestor,
            host=settings.mqtt.host,
            port=settings.mqtt.port,
            client_id=settings.cloud.ingest_client_id,
            group=settings.cloud.ingest_group,
            username=settings.mqtt.username,
            password=password,
            session_expiry_s=settings.cloud.session_expiry_s,
            keepalive_s=settings.mqtt.keepalive_s,
            **kwargs,
        )

    # -- paho callbacks (network thread) --------------------------------------------------------------

    def _on_connect(self, client: Any, _u: Any, flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            log.error("connect refused", extra={"reason_code": str(rc)})
            return
        log.info("connected", extra={"session_present": bool(flags.session_present)})
        self.connected.set()
        client.subscribe(self.subscription, qos=1)  # idempotent; needed when the session expired

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected", extra={"reason_code": str(rc)})

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: list[Any], _props: Any) -> None:
        if all(not rc.is_failure for rc in rcs):
            self.subscribed.set()
        else:
            log.error("subscription refused", extra={"reason_codes": [str(rc) for rc in rcs]})

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        """Start the message's checks and object write on the pool right away (a submit, no waiting), so
        they overlap the database work of earlier messages; the processing thread takes them in order."""
        pool = self._pool
        future = None if pool is None or self._stop.is_set() else pool.submit(self._prepare, msg)
        self._queue.put(_Inbound(msg, future, time.perf_counter()))  # blocks when full: back-pressure

    def _prepare(self, msg: Any) -> PreparedCrop | None:
        return self.ingestor.prepare(msg.topic, bytes(msg.payload))

    # -- processing thread ----------------------------------------------------------------------------

    def _process_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = batch[-1] is None
            self._process_batch([item for item in batch if item is not None])
            if stopping:
                return

    def _process_batch(self, batch: list[_Inbound]) -> None:
        """Prepared crops go to the database together; anything else (another kind, invalid input, an
        error on the way) takes the one-message path of `_process` in its place, so acks keep the order."""
        ready: list[tuple[_Inbound, PreparedCrop]] = []
        for item in batch:
            try:
                prepared = item.future.result() if item.future is not None else None
            except Exception:
                prepared = None  # `_process` runs it again and dead-letters, retries or parks it
            if prepared is None:
                self._record(ready)
                ready = []
                self._process(item.msg)
            else:
                ready.append((item, prepared))
        self._record(ready)

    def _record(self, ready: list[tuple[_Inbound, PreparedCrop]]) -> None:
        """One transaction for the crops in hand; their acks and PUBACKs only after it committed."""
        if not ready:
            return
        try:
            results = self.ingestor.record_crops([prepared for _, prepared in ready])
        except Exception:
            log.exception("batch insert failed; ingesting its crops one by one", extra={"crops": len(ready)})
            for item, _ in ready:
                self._process(item.msg)
            return
        for (item, _), result in zip(ready, results, strict=True):
            self._finish(item.msg, result, item.received)

    def _process(self, msg: Any) -> None:
        started = time.perf_counter()
        delay, failures = 0.2, 0
        payload = bytes(msg.payload)
        while True:
            try:
                if failures < self.max_failures:
                    result = self.ingestor.handle(msg.topic, payload)
                else:  # a poison message (a bug, not an outage): park it instead of blocking the queue
                    result = self.ingestor.reject(msg.topic, payload, "ingest_error", self._last_error)
                break
            except Exception as exc:
                failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"[:2000]
                log.exception(
                    "ingest failed; retrying", extra={"topic": msg.topic[:256], "failures": failures}
                )
                if self._stop.wait(delay):
                    return  # shutting down: leave the message un-acked, the broker redelivers it
                delay = min(delay * 2, 5.0)
        self._finish(msg, result, started)

    def _finish(self, msg: Any, result: IngestResult, started: float) -> None:
        """The device's ack, then the broker's PUBACK: only for a message that is stored or dead-lettered."""
        if result.ack is not None and result.ack_topic is not None:
            self._publish_ack(result.ack_topic, result.ack)
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
        self.processed += 1
        INGEST_MESSAGES.labels(kind=result.kind or "invalid", status=result.status).inc()
        INGEST_LATENCY.observe(time.perf_counter() - started)
        if self.on_result is not None:
            self.on_result(result)

    def _publish_ack(self, topic: str, ack: contract.CropAck | contract.CheckoutAck) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = contract.CONTENT_TYPE
        self.client.publish(topic, contract.encode(ack), qos=1, properties=props)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self._pool = ThreadPoolExecutor(self.put_threads, thread_name_prefix="ingest-put")
        self._thread = threading.Thread(target=self._process_loop, name="ingest", daemon=True)
        self._thread.start()
        self.client.connect_async(
            self.host, self.port, keepalive=self.keepalive_s, clean_start=False, properties=props
        )
        self.client.loop_start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Connected and subscribed (tests and the benchmark wait for this before publishing)."""
        return self.subscribed.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, finish the batch in hand, disconnect (the session keeps the rest)."""
        self._stop.set()
        if self._thread is not None:
            while True:  # drop what was received but not processed: it was not acked, so it is redelivered
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        if self._pool is not None:  # after the network loop, which submits to it, has stopped
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()


def serve_metrics(settings: Settings) -> None:
    """Expose the worker's Prometheus metrics when ``cloud.ingest_metrics_port`` is set."""
    if settings.cloud.ingest_metrics_port is None:
        return
    from prometheus_client import start_http_server

    from cloud_api.metrics import REGISTRY

    start_http_server(
        settings.cloud.ingest_metrics_port, addr=settings.cloud.ingest_metrics_host, registry=REGISTRY
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m cloud_api.ingest [--config FILE]``: one worker in the foreground."""
    import argparse

    from cloud_api.logs import setup_logging
    from shelfloop.settings import load_settings

    parser = argparse.ArgumentParser(prog="cloud_api.ingest", description=main.__doc__)
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    setup_logging(json_logs=settings.cloud.json_logs)
    worker = IngestWorker.from_settings(settings)
    serve_metrics(settings)
    worker.run_forever()
    worker.ingestor.db.dispose()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
