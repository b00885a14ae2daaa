"""The ingest worker: device uplinks from MQTT into object storage and the database, then the device's ack.

Order per crop (the reliability argument of ARCHITECTURE.md step 3):

1. ``contract.decode`` + ``contract.check_topic_matches`` + a full JPEG decode (Pillow);
2. the JPEG goes to object storage under its content-addressed key (create if absent);
3. one transaction inserts the crop row (``ON CONFLICT DO NOTHING``, unique on crop id and object key)
   and its annotation task;
4. only then a `CropAck` (QoS 1) goes to the device, and only then the broker gets our PUBACK
   (manual acks), so a crash anywhere before leaves the message with the broker (persistent session) and
   with the device (outbox), and the retry finds the object and the row already there.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import sqlalchemy as sa

from cloud_api import models as m
from cloud_api.db import Database, insert_ignore
from cloud_api.metrics import INGEST_LATENCY, INGEST_MESSAGES
from cloud_api.queue import enqueue_crop
from cloud_api.storage import ObjectConflict, ObjectStore, sha256_hex
from shelfloop import contract
from shelfloop.settings import Settings

__all__ = [
    "IngestResult",
    "IngestWorker",
    "Ingestor",
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


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What happened to one uplink, and the ack (if any) the device must get."""

    kind: str | None
    status: Literal["stored", "duplicate", "rejected"]
    reason: str | None = None
    crop_id: str | None = None
    object_key: str | None = None
    ack_topic: str | None = None
    ack: contract.CropAck | None = None
    dead_letter_id: int | None = None


class _CropIdPeek(msgspec.Struct):
    crop_id: Any = msgspec.UNSET


_PEEK = msgspec.msgpack.Decoder(_CropIdPeek)


def _readable_crop_id(payload: bytes) -> str | None:
    """The crop id of a payload that failed validation, when one can still be read (for the rejected ack)."""
    try:
        crop_id = _PEEK.decode(payload).crop_id
    except Exception:
        return None
    return crop_id if isinstance(crop_id, str) and _CROP_ID_RE.match(crop_id) else None


def _printable(text: str) -> str:
    """No NUL in text columns (PostgreSQL rejects it; error messages can quote device input)."""
    return text.replace("\x00", "\\x00")


def full_jpeg_decode(data: bytes) -> tuple[int, int]:
    """Decode every pixel with Pillow: the contract's structural check cannot see corrupt scan data."""
    from PIL import Image

    width, height = contract.jpeg_dimensions(data)
    if width * height > MAX_PIXELS:
        raise contract.InvalidImage(f"JPEG is {width}x{height}, over {MAX_PIXELS} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Pillow warns on some corrupt data instead of failing
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG":
                    raise contract.InvalidImage(f"not a JPEG ({img.format})")
                img.load()
                return img.size
    except contract.InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise contract.InvalidImage(f"JPEG does not decode: {exc}") from None


def _ack(crop_id: str, status: contract.AckStatus, reason: str | None, key: str | None) -> contract.CropAck:
    return contract.CropAck(
        crop_id=crop_id, status=status, reason=reason, object_key=key, acked_at=contract.utc_now()
    )


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

    # -- per kind -------------------------------------------------------------------------------------

    def _crop(self, topic: str, msg: contract.UncertainCrop) -> IngestResult:
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
        with self.db.session() as s:
            crop_pk = insert_ignore(s, m.Crop, row, returning=m.Crop.id)
            if crop_pk is not None:
                enqueue_crop(
                    s,
                    crop_pk,
                    priority=msg.priority,
                    novelty=msg.novelty,
                    source=msg.source,
                    required=self.consensus_k,
                )
                existing_key = key
            else:
                existing_key = s.scalar(sa.select(m.Crop.object_key).where(m.Crop.crop_id == msg.crop_id))
                existing_key = existing_key or key  # same bytes already filed under another crop id
        status: contract.AckStatus = "stored" if crop_pk is not None else "duplicate"
        return IngestResult(
            kind=msg.kind,
            status=status,
            crop_id=msg.crop_id,
            object_key=existing_key,
            ack_topic=contract.ack_topic(msg.store_id, msg.device_id),
            ack=_ack(msg.crop_id, status, None, existing_key),
        )

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
        return IngestResult(kind=msg.kind, status="stored" if new else "duplicate")

    # -- dead letters ---------------------------------------------------------------------------------

    def reject(self, topic: str, payload: bytes, reason: str, detail: str) -> IngestResult:
        """Dead-letter an uplink for a reason found outside `handle` (e.g. it keeps crashing ingest)."""
        return self._reject(topic, payload, reason, detail, record=True)

    def _reject(self, topic: str, payload: bytes, reason: str, detail: str, *, record: bool) -> IngestResult:
        crop_id = _readable_crop_id(payload)
        dl_id = self.record_dead_letter(topic, payload, reason, detail, crop_id) if record else None
        ack_topic = ack = None
        if crop_id is not None:
            try:
                info = contract.parse_topic(topic)
            except contract.ContractError:
                info = None
            # The ack goes to the sender: the broker ACL lets a device publish only under its own topics.
            if info is not None and info.direction == "up" and info.store_id and info.device_id:
                ack_topic = contract.ack_topic(info.store_id, info.device_id)
                ack = _ack(crop_id, "rejected", reason, None)
        log.info("dead letter", extra={"reason": reason, "topic": topic[:256], "crop_id": crop_id})
        return IngestResult(
            kind=None,
            status="rejected",
            reason=reason,
            crop_id=crop_id,
            ack_topic=ack_topic,
            ack=ack,
            dead_letter_id=dl_id,
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


class IngestWorker:
    """One ingest worker: a persistent MQTT v5 session on the shared subscription, QoS 1, manual acks.

    Messages are handled in arrival order on one thread; the broker's PUBACK for a message is sent only
    after it was stored (or dead-lettered) and its `CropAck` was handed to the client. Infrastructure
    errors are retried with backoff while holding the message, which is natural back-pressure.
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
    ) -> None:
        """``max_failures``: unexpected errors on one message before it is dead-lettered as
        ``ingest_error``. While the database itself is down, dead-lettering fails too and the worker keeps
        retrying with backoff, holding the message (and the broker holds the rest)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.ingestor = ingestor
        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self.subscription = contract.shared_ingest_subscription(group)
        self.session_expiry_s = session_expiry_s
        self.on_result = on_result
        self.max_failures = max_failures
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
        self._queue.put(msg)  # blocks the network loop when full: back-pressure to the broker

    # -- processing thread ----------------------------------------------------------------------------

    def _process_loop(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            self._process(msg)

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
        if result.ack is not None and result.ack_topic is not None:
            self._publish_ack(result.ack_topic, result.ack)
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
        self.processed += 1
        INGEST_MESSAGES.labels(kind=result.kind or "invalid", status=result.status).inc()
        INGEST_LATENCY.observe(time.perf_counter() - started)
        if self.on_result is not None:
            self.on_result(result)

    def _publish_ack(self, topic: str, ack: contract.CropAck) -> None:
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
        """Stop taking messages, finish the one in hand, disconnect (the session keeps the rest)."""
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
