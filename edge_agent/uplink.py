"""The uplink: publishes the outbox's checkout items and crops over MQTT v5 and deletes each only on the
cloud's application-level ack (`CheckoutAck` by ``event_id``, `CropAck` by ``crop_id``).

Why it looks like this:

- QoS 1 on a persistent session (fixed client id per device, ``clean_start=False`` and a session expiry),
  so acks and release pointers published while the device was offline are waiting when it returns.
- A bounded window of messages awaiting the cloud's ack, checkout items first (tiny, and what customers
  are billed for), then crops by priority; one without an ack is resent after a timeout that doubles per
  attempt (capped). The payload bytes and id are the same on every resend, so the cloud, which dedupes on
  them, never counts an item or a crop twice.
- After every (re)connect everything un-acked is due again at once: the broker may have lost what it
  PUBACKed (Mosquitto persists by snapshot), and the cloud's ack is the only proof of storage.
- Nothing here deletes an item or a crop except an ack; a refused login (bad credentials, banned device)
  is a fault in the heartbeat while the outbox keeps everything and paho keeps retrying with back-off.
- Heartbeats and compliance snapshots are telemetry: `publish_message` sends them once, best-effort, and
  the next one supersedes a lost one.
- paho re-raises exceptions from callbacks and that would end its network thread, so every callback
  catches and logs; malformed acks are counted and ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.outbox import Outbox
from shelfloop import contract

__all__ = ["Uplink", "UplinkConfig", "UplinkStats"]

log = logging.getLogger("shelfloop.edge.uplink")

ReleaseHandler = Callable[[str, contract.ReleasePointer], None]
_Key = tuple[str, str]
"""An outbox entry in flight: (``"checkout_item"`` or ``"crop"``, its event id or crop id)."""
_ITEM, _CROP = contract.KIND_CHECKOUT_ITEM, contract.KIND_CROP


@dataclass(frozen=True)
class UplinkConfig:
    """Where and how a device talks to the broker; timings sized for a store's flaky uplink."""

    store_id: str
    device_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    keepalive_s: int = 30
    client_id: str | None = None
    session_expiry_s: int = 7 * 24 * 3600
    max_inflight: int = 32
    ack_timeout_s: float = 10.0
    max_backoff_s: float = 300.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    poll_s: float = 0.05

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"shelfloop-edge.{self.store_id}.{self.device_id}"


@dataclass(frozen=True)
class UplinkStats:
    """Counters for the heartbeat and for tests; ``published``, ``resent`` and ``acks`` count crops."""

    connected: bool
    connects: int
    published: int
    resent: int
    acks: int
    malformed_acks: int
    in_flight: int
    items_published: int = 0
    items_resent: int = 0
    item_acks: int = 0


class Uplink:
    """Drains an `Outbox` to the broker; call `start`, later `stop` (the outbox keeps what is un-acked)."""

    def __init__(
        self, config: UplinkConfig, outbox: Outbox, *, on_release: ReleaseHandler | None = None
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.config = config
        self.outbox = outbox
        self.on_release = on_release
        self.crop_topic = contract.uplink_topic(config.store_id, config.device_id, contract.KIND_CROP)
        self.item_topic = contract.uplink_topic(
            config.store_id, config.device_id, contract.KIND_CHECKOUT_ITEM
        )
        self.ack_topic = contract.ack_topic(config.store_id, config.device_id)
        self.checkout_ack_topic = contract.checkout_ack_topic(config.store_id, config.device_id)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[_Key, float] = {}  # (kind, id) -> monotonic deadline for its ack
        self._faults: list[str] = []
        self._last_fault = ""
        self._connects = self._published = self._resent = self._acks = self._malformed = 0
        self._items_published = self._items_resent = self._item_acks = 0
        self._thread: threading.Thread | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=config.mqtt_client_id, protocol=mqtt.MQTTv5
        )
        if config.username is not None:
            self.client.username_pw_set(config.username, config.password)
        if config.tls:
            self.client.tls_set()
        self.client.reconnect_delay_set(max(1, round(config.reconnect_min_s)), round(config.reconnect_max_s))
        self.client.max_inflight_messages_set(max(config.max_inflight, 20))
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._mids: dict[int, _Key] = {}  # MQTT message id -> (kind, id), to name what the broker refuses
        self._success = mqtt.MQTT_ERR_SUCCESS

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (the broker may be down: paho retries with back-off)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        self.client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()
        self._thread = threading.Thread(target=self._pump_loop, name="uplink-pump", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout_s: float = 0.0) -> bool:
        """Stop sending; first wait up to ``drain_timeout_s`` for the outbox to empty. True if it did."""
        drained = (
            self.wait_drained(drain_timeout_s) if drain_timeout_s > 0 else self.outbox.stats().depth == 0
        )
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
        self.connected.clear()
        return drained

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every checkout item and crop in the outbox was acked by the cloud."""
        deadline = time.monotonic() + timeout
        while self.outbox.stats().depth > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- publishing -----------------------------------------------------------------------------------

    def _pump_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.poll_s)
            self._wake.clear()
            if not self.connected.is_set():
                continue
            try:
                self._pump_once()
            except Exception as exc:  # never let the sender die: the outbox still holds everything
                log.exception("uplink pump failed")
                self._fault(f"uplink pump error: {exc}")
                time.sleep(1.0)

    def _pump_once(self) -> None:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, deadline in self._in_flight.items() if deadline <= now]:
                del self._in_flight[key]
            free = self.config.max_inflight - len(self._in_flight)
            busy_items = {i for kind, i in self._in_flight if kind == _ITEM}
            busy_crops = {i for kind, i in self._in_flight if kind == _CROP}
        # Checkout items first: a crop backlog (or its drop policy) must never hold a billed item back.
        items = self.outbox.due_items(free, exclude=busy_items)
        for item in items:
            if not self._send((_ITEM, item.event_id), item.payload, item.attempts, now):
                return
        for crop in self.outbox.due(free - len(items), exclude=busy_crops):
            if not self._send((_CROP, crop.crop_id), crop.payload, crop.attempts, now):
                return

    def _send(self, key: _Key, payload: bytes, attempts: int, now: float) -> bool:
        """Publish one outbox entry and schedule its resend; False when the client cannot take it now."""
        if self._stop.is_set() or not self.connected.is_set():
            return False
        kind, ident = key
        topic = self.item_topic if kind == _ITEM else self.crop_topic
        info = self.client.publish(topic, payload, qos=1, properties=self._props())
        if info.rc != self._success:
            log.info(
                "uplink: publish of %s %s not accepted (rc %s); retry after reconnect", kind, ident, info.rc
            )
            return False
        with self._lock:
            self._mids[info.mid] = key
            if len(self._mids) > 10_000:  # PUBACKs lost with a connection never come: bound the map
                del self._mids[next(iter(self._mids))]
        retry = min(self.config.max_backoff_s, self.config.ack_timeout_s * 2**attempts)
        if kind == _ITEM:
            self.outbox.mark_item_sent(ident, retry)
        else:
            self.outbox.mark_sent(ident, retry)
        with self._lock:
            self._in_flight[key] = now + retry
            if kind == _ITEM:
                self._items_published += 1
                self._items_resent += attempts > 0
            else:
                self._published += 1
                self._resent += attempts > 0
        if attempts:
            log.info("uplink: resent %s %s (attempt %d)", kind, ident, attempts + 1)
        return True

    def publish_message(self, msg: contract.Heartbeat | contract.ComplianceSnapshot) -> bool:
        """Best-effort QoS-1 publish of telemetry; False when offline or refused by the contract.

        Heartbeats and compliance snapshots are not stored: the latest one wins and a lost one is replaced
        by the next. Checkout items never come here; they go through the outbox (`Outbox.put_item`).
        """
        if not self.connected.is_set():
            return False
        try:
            payload = contract.encode(msg)
        except contract.ContractError as exc:
            self._fault(f"{msg.kind} not sent: {exc}")
            return False
        info = self.client.publish(contract.uplink_topic_for(msg), payload, qos=1, properties=self._props())
        return info.rc == self._success

    def _props(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = contract.CONTENT_TYPE
        return props

    def kick(self) -> None:
        """A new crop or checkout item is in the outbox: send now rather than at the next poll."""
        self._wake.set()

    # -- paho callbacks (network thread) --------------------------------------------------------------

    def _on_connect(self, client: Any, _userdata: Any, flags: Any, rc: Any, _props: Any) -> None:
        try:
            if rc.is_failure:
                self.connected.clear()
                self._fault(f"broker refused connection: {rc} (will retry; outbox kept)")
                return
            subs = [
                (topic, 1)
                for topic in contract.device_subscriptions(self.config.store_id, self.config.device_id)
            ]
            client.subscribe(subs)
            with self._lock:
                self._in_flight.clear()
                self._connects += 1
            self.outbox.make_all_due()
            self._last_fault = ""
            log.info(
                "uplink connected to %s:%d (session present: %s)",
                self.config.host,
                self.config.port,
                getattr(flags, "session_present", None),
            )
            self.connected.set()
            self._wake.set()
        except Exception:  # pragma: no cover - defensive: paho would end its thread
            log.exception("uplink on_connect failed")

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        """A v5 PUBACK with a failure code (0x87 not authorised, 0x95 too large) is a fault to report;
        the crop or item stays in the outbox (an ACL fixed later lets it through)."""
        with self._lock:
            key = self._mids.pop(mid, None)
        if key is not None and getattr(rc, "is_failure", False):
            kind, ident = key
            self._fault(f"broker refused {kind} publishes: {rc} (e.g. {kind} {ident})")

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("uplink disconnected (%s); reconnecting with back-off", rc)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            if msg.topic == self.ack_topic:
                self._handle_ack(msg.payload)
            elif msg.topic == self.checkout_ack_topic:
                self._handle_item_ack(msg.payload)
            elif "/release/" in msg.topic:
                self._handle_release(msg.topic, msg.payload)
        except Exception:
            log.exception("uplink: message on %s could not be handled", getattr(msg, "topic", "?"))

    def _handle_ack(self, payload: bytes) -> None:
        try:
            ack = contract.decode(payload, expect=contract.CropAck)
        except contract.ContractError as exc:
            with self._lock:
                self._malformed += 1
            log.warning("uplink: ignored malformed ack (%s)", exc)
            return
        deleted = self.outbox.ack(ack)
        with self._lock:
            self._in_flight.pop((_CROP, ack.crop_id), None)
            self._acks += 1
        if ack.status == "rejected":
            log.warning("cloud rejected crop %s: %s", ack.crop_id, ack.reason)
        elif not deleted:
            log.debug("uplink: ack for %s which is no longer in the outbox", ack.crop_id)
        self._wake.set()

    def _handle_item_ack(self, payload: bytes) -> None:
        try:
            ack = contract.decode(payload, expect=contract.CheckoutAck)
        except contract.ContractError as exc:
            with self._lock:
                self._malformed += 1
            log.warning("uplink: ignored malformed checkout ack (%s)", exc)
            return
        deleted = self.outbox.ack_item(ack)
        with self._lock:
            self._in_flight.pop((_ITEM, ack.event_id), None)
            self._item_acks += 1
        if ack.status == "rejected":
            log.warning("cloud rejected checkout item %s: %s", ack.event_id, ack.reason)
        elif not deleted:
            log.debug("uplink: ack for checkout item %s which is no longer in the outbox", ack.event_id)
        self._wake.set()

    def _handle_release(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained pointer
        try:
            pointer = contract.decode(payload, expect=contract.ReleasePointer)
        except contract.ContractError as exc:
            self._fault(f"malformed release pointer on {topic}: {exc}")
            return
        if self.on_release is not None:
            self.on_release(topic, pointer)

    # -- reporting ------------------------------------------------------------------------------------

    def _fault(self, text: str) -> None:
        with self._lock:
            if text == self._last_fault:
                return  # a broker refusing every retry is one fault, not one per second
            self._last_fault = text
            self._faults.append(text)
            del self._faults[:-16]
        log.error("uplink fault: %s", text)

    def take_faults(self) -> list[str]:
        with self._lock:
            faults, self._faults = self._faults, []
        return faults

    def stats(self) -> UplinkStats:
        with self._lock:
            return UplinkStats(
                connected=self.connected.is_set(),
                connects=self._connects,
                published=self._published,
                resent=self._resent,
                acks=self._acks,
                malformed_acks=self._malformed,
                in_flight=len(self._in_flight),
                items_published=self._items_published,
                items_resent=self._items_resent,
                item_acks=self._item_acks,
            )
