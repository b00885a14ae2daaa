"""A minimal simulated store device for the ingest benchmark and tests.

It behaves like the edge agent's outbox towards the cloud: every crop stays in memory until the cloud's
`CropAck` arrives (never on the broker's PUBACK) and is re-sent after ``resend_after_s`` until then.
It speaks only the wire contract, so it does not import ``edge_agent``.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import defaultdict
from typing import Any

from shelfloop import contract

__all__ = ["DeviceSim", "crop_row", "make_crop", "random_jpeg"]


def random_jpeg(width: int = 32, height: int = 32, quality: int = 85) -> bytes:
    """A JPEG of random pixels: distinct bytes every call, so every crop gets its own object key."""
    from PIL import Image

    img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_crop(
    store_id: str = "store-1", device_id: str = "dev-1", *, jpeg: bytes | None = None, **fields: Any
) -> contract.UncertainCrop:
    """A valid `UncertainCrop` with plausible values; ``fields`` override any of them."""
    values: dict[str, Any] = {
        "crop_id": contract.new_crop_id(),
        "store_id": store_id,
        "device_id": device_id,
        "camera_id": "cam-0",
        "captured_at": contract.utc_now(),
        "source": "shelf",
        "model_version": "rec-1",
        "gallery_version": "gal-1",
        "detector_confidence": 0.6,
        "box": contract.BoundingBox(x1=10.0, y1=10.0, x2=60.0, y2=90.0),
        "frame_width": 1920,
        "frame_height": 1080,
        "candidates": [
            contract.SkuCandidate(sku_id="sku-a", score=0.41),
            contract.SkuCandidate(sku_id="sku-b", score=0.39),
        ],
        "reasons": ["low_margin"],
        "priority": 50,
        "margin": 0.02,
        "novelty": 0.3,
        "jpeg": jpeg if jpeg is not None else random_jpeg(),
    }
    values.update(fields)
    return contract.UncertainCrop(**values)


def crop_row(**fields: Any) -> dict[str, Any]:
    """Column values of a plausible stored crop (`cloud_api.models.Crop`); ``fields`` override any of them.

    For benchmarks and tests that need queue rows without going through ingest."""
    values: dict[str, Any] = {
        "crop_id": contract.new_crop_id(),
        "object_key": f"crops/s/d/{os.urandom(32).hex()}.jpg",
        "sha256": "0" * 64,
        "size_bytes": 1,
        "width": 1,
        "height": 1,
        "store_id": "s",
        "device_id": "d",
        "camera_id": "cam",
        "captured_at": contract.utc_now(),
        "source": "shelf",
        "model_version": "m",
        "gallery_version": "g",
        "detector_confidence": 0.5,
        "box": {},
        "frame_width": 1,
        "frame_height": 1,
        "candidates": [],
        "reasons": ["audit_sample"],
        "priority": 50,
        "margin": None,
        "novelty": None,
    }
    values.update(fields)
    return values


class DeviceSim:
    """One device connection: publishes uplinks at QoS 1, collects acks, re-sends what is not acked."""

    def __init__(
        self,
        host: str,
        port: int,
        store_id: str,
        device_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        resend_after_s: float = 2.0,
        client_id: str | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.store_id, self.device_id = store_id, device_id
        self.resend_after_s = resend_after_s
        self._lock = threading.Condition()
        self.outbox: dict[str, tuple[str, bytes, float]] = {}
        self.acks: dict[str, list[str]] = defaultdict(list)
        self.ack_reasons: dict[str, str | None] = {}
        self.puback_codes: dict[int, int] = {}
        self.sends = 0
        self.connack: int | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{store_id}.{device_id}.{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self._lock:
            self.connack = rc.value
            self._lock.notify_all()
        if not rc.is_failure:
            client.subscribe(contract.ack_topic(self.store_id, self.device_id), qos=1)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._lock:
            self.puback_codes[mid] = rc.value
            self._lock.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            ack = contract.decode(msg.payload, expect=contract.CropAck)
        except contract.ContractError:
            return
        with self._lock:
            self.acks[ack.crop_id].append(ack.status)
            self.ack_reasons[ack.crop_id] = ack.reason
            self.outbox.pop(ack.crop_id, None)
            self._lock.notify_all()

    def wait_connected(self, timeout: float = 10.0) -> int | None:
        with self._lock:
            self._lock.wait_for(lambda: self.connack is not None, timeout)
            return self.connack

    def publish_raw(self, topic: str, payload: bytes) -> int:
        """Publish bytes as they are (for malformed input); returns the message id."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = contract.CONTENT_TYPE
        info = self.client.publish(topic, payload, qos=1, properties=props)
        self.sends += 1
        return info.mid

    def wait_puback(self, mid: int, timeout: float = 10.0) -> int | None:
        """The broker's PUBACK reason code for a publish (0x87 when the ACL refuses it)."""
        with self._lock:
            self._lock.wait_for(lambda: mid in self.puback_codes, timeout)
            return self.puback_codes.get(mid)

    def send(self, crop: contract.UncertainCrop | bytes, crop_id: str | None = None) -> str:
        """Put a crop in the outbox and publish it; it stays there until the cloud acks it."""
        if isinstance(crop, bytes):
            assert crop_id is not None
            topic, payload, key = contract.uplink_topic(self.store_id, self.device_id, "crop"), crop, crop_id
        else:
            topic, payload, key = contract.uplink_topic_for(crop), contract.encode(crop), crop.crop_id
        with self._lock:
            self.outbox[key] = (topic, payload, time.monotonic())
        self.publish_raw(topic, payload)
        return key

    def resend_due(self) -> int:
        """Re-send every crop whose last send is older than ``resend_after_s``."""
        now = time.monotonic()
        with self._lock:
            due = [(k, t, p) for k, (t, p, sent) in self.outbox.items() if now - sent >= self.resend_after_s]
            for k, t, p in due:
                self.outbox[k] = (t, p, now)
        for _k, t, p in due:
            self.publish_raw(t, p)
        return len(due)

    def pending(self) -> int:
        with self._lock:
            return len(self.outbox)

    def wait_all_acked(self, timeout: float, *, resend: bool = True) -> bool:
        """Wait (re-sending when due) until the outbox is empty; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.outbox:
                    return True
                self._lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            if resend:
                self.resend_due()
        return self.pending() == 0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
