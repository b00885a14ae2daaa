"""The wire contract against a real Mosquitto broker over real MQTT v5 connections (paho-mqtt 2.x).

What is checked here cannot be checked in memory: that the shared ingest subscription really receives
device uplinks, that the broker's size limit and the contract's size limit agree, and that the ACL text
produced by `device_acl` really confines a device to its own topics.
"""

from __future__ import annotations

import contextlib
import io
import queue
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from PIL import Image

from shelfloop import contract as c

pytestmark = pytest.mark.broker

TIMEOUT = 10.0
QUIET = 0.3  # how long to wait for a message that must NOT arrive, after a sentinel has already arrived
RC_SUCCESS = 0x00
RC_NO_MATCHING_SUBSCRIBERS = 0x10
RC_OK = (RC_SUCCESS, RC_NO_MATCHING_SUBSCRIBERS)
RC_NOT_AUTHORIZED = 0x87
RC_PACKET_TOO_LARGE = 0x95
STORE = "store-001"


def _jpeg(width: int = 48, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (180, 40, 40)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _crop(device_id: str = "dev-a", store_id: str = STORE) -> c.UncertainCrop:
    return c.UncertainCrop(
        crop_id=c.new_crop_id(),
        store_id=store_id,
        device_id=device_id,
        camera_id="cam-0",
        captured_at=c.utc_now(),
        source="shelf",
        model_version="det-2024.06.1",
        gallery_version="gal-17",
        detector_confidence=0.41,
        box=c.BoundingBox(x1=10.0, y1=20.0, x2=58.0, y2=52.0),
        frame_width=1920,
        frame_height=1080,
        candidates=[c.SkuCandidate(sku_id="sku-1", score=0.52), c.SkuCandidate(sku_id="sku-2", score=0.47)],
        reasons=["low_margin"],
        priority=70,
        margin=0.05,
        novelty=None,
        bay_id="bay-3",
        jpeg=_jpeg(),
    )


class Client:
    """A paho v5 client with blocking helpers that always time out instead of hanging."""

    def __init__(self, broker: Any, client_id: str, username: str | None = None, password: str | None = None):
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=False
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._cond = threading.Condition()
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._connack: ReasonCode | None = None
        self.disconnected: ReasonCode | None = None
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._connack is not None, TIMEOUT), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        with self._cond:
            self._connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        with self._cond:
            self.disconnected = rc
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _props: Any) -> None:
        with self._cond:
            self._acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _props: Any) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    @property
    def connack(self) -> ReasonCode:
        assert self._connack is not None
        return self._connack

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK reason codes."""
        rc, mid = self.client.subscribe([(t, 1) for t in topics])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, TIMEOUT), "no SUBACK"
            return [code.value for code in self._subacks.pop(mid)]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, content_type: bool = True) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        props = Properties(PacketTypes.PUBLISH)
        if content_type:
            props.ContentType = c.CONTENT_TYPE
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._acks, TIMEOUT), "no PUBACK"
            return self._acks.pop(info.mid).value

    def publish_outcome(self, topic: str, payload: bytes) -> int | str:
        """Publish at QoS 1; the PUBACK reason code, or "disconnected" if the connection ends first (also
        while paho is still writing the packet: the broker may drop it mid-write, and paho says NO_CONN)."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            return "disconnected"
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            done = self._cond.wait_for(
                lambda: info.mid in self._acks or self.disconnected is not None, TIMEOUT
            )
            assert done, "neither PUBACK nor disconnect"
            return self._acks.pop(info.mid).value if info.mid in self._acks else "disconnected"

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no message within {timeout}s")

    def assert_no_message(self, timeout: float = QUIET) -> None:
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        pytest.fail(f"unexpected message on {msg.topic} ({len(msg.payload)} bytes)")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects clients a test opens and closes them all, whatever the outcome."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def test_crop_round_trip_through_shared_ingest_subscription(mosquitto: Any, clients: list[Client]) -> None:
    broker = mosquitto()
    ingest = Client(broker, "ingest-0")
    device = Client(broker, "dev-a")
    clients += [ingest, device]
    assert ingest.subscribe(c.INGEST_SHARED_SUBSCRIPTION) == [1]

    crop = _crop()
    topic = c.uplink_topic_for(crop)
    assert topic == f"shelfloop/v1/{STORE}/dev-a/up/crop"
    assert device.publish(topic, c.encode(crop)) == RC_SUCCESS

    received = ingest.next_message()
    assert received.topic == topic
    assert received.qos == 1
    assert received.properties.ContentType == c.CONTENT_TYPE
    decoded = c.decode(received.payload, expect=c.UncertainCrop)
    assert decoded == crop
    assert decoded.jpeg == crop.jpeg
    assert c.check_topic_matches(received.topic, decoded).device_id == "dev-a"


def _oversize_snapshot() -> c.ComplianceSnapshot:
    """A valid-looking compliance snapshot whose encoding is over MAX_MESSAGE_BYTES."""
    now = c.utc_now()
    slots = [
        c.SlotResult(
            shelf_row=i // 100,
            slot_index=i % 100,
            planned_sku=f"sku-{i:060d}",
            status="wrong_shelf",
            facings_planned=2,
            facings_found=1,
            found_sku=f"sku-{i + 1:060d}",
            boxes=[c.BoundingBox(x1=1.0, y1=2.0, x2=3.0, y2=4.0)],
        )
        for i in range(4000)
    ]
    return c.ComplianceSnapshot(
        snapshot_id="snap-1",
        store_id=STORE,
        device_id="dev-a",
        camera_id="cam-0",
        bay_id="bay-3",
        planogram_version="pg-9",
        captured_at=now - timedelta(seconds=1),
        model_version="det-1",
        gallery_version="gal-1",
        slots=slots,
        unplanned=[],
        compliance_pct=10.0,
        availability_pct=50.0,
        image_jpeg=_jpeg(),
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawMqtt5:
    """Just enough MQTT v5 over a socket to see the exact PUBACK reason code on the wire.

    Needed because Mosquitto 2.0 answers an over-limit QoS 1 publish with PUBACK 0x95, a code MQTT 5
    allows only in CONNACK/DISCONNECT: paho-mqtt 2.x cannot parse it and drops the connection instead.
    """

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        cid = client_id.encode()
        # CONNECT: "MQTT", level 5, clean start, keepalive 30 s, no properties, client id.
        body = b"\x00\x04MQTT\x05\x02\x00\x1e\x00" + len(cid).to_bytes(2, "big") + cid
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        kind, connack = self._read_packet()
        assert kind == 0x20 and connack[1] == 0x00, f"CONNACK refused: {connack!r}"
        self._next_id = 1

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def _read_packet(self) -> tuple[int, bytes]:
        header = self._read_exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header & 0xF0, self._read_exact(length)

    def publish_qos1(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0 when the broker omits it)."""
        packet_id, self._next_id = self._next_id, self._next_id + 1
        name = topic.encode()
        variable = len(name).to_bytes(2, "big") + name + packet_id.to_bytes(2, "big") + b"\x00"
        self.sock.sendall(b"\x32" + _varint(len(variable) + len(payload)) + variable + payload)
        kind, body = self._read_packet()
        assert kind == 0x40, f"expected PUBACK, got packet type 0x{kind:02X}"
        assert int.from_bytes(body[:2], "big") == packet_id
        return body[2] if len(body) > 2 else 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
        self.sock.close()


def test_oversize_is_refused_by_encode_and_by_the_broker(mosquitto: Any, clients: list[Client]) -> None:
    broker = mosquitto(message_size_limit=c.MAX_MESSAGE_BYTES)
    ingest = Client(broker, "ingest-0")
    clients.append(ingest)
    assert ingest.subscribe(c.INGEST_SHARED_SUBSCRIPTION) == [1]
    topic = c.uplink_topic(STORE, "dev-a", c.KIND_COMPLIANCE_SNAPSHOT)

    # The contract refuses before anything reaches the broker ...
    snapshot = _oversize_snapshot()
    raw = msgspec.msgpack.encode(snapshot)
    assert len(raw) > c.MAX_MESSAGE_BYTES
    with pytest.raises(c.OversizeMessage) as excinfo:
        c.encode(snapshot)
    assert excinfo.value.reason == "oversize"

    # ... and a v5 publisher that bypasses it gets PUBACK 0x95 (Packet too large); nothing is delivered.
    publisher = RawMqtt5(broker.host, broker.port, "dev-a")
    try:
        assert publisher.publish_qos1(topic, raw) == RC_PACKET_TOO_LARGE
        assert publisher.publish_qos1(topic, b"\x00" * (c.MAX_MESSAGE_BYTES + 1)) == RC_PACKET_TOO_LARGE
        # The limits agree exactly: a payload of exactly MAX_MESSAGE_BYTES still goes through ...
        assert publisher.publish_qos1(topic, b"\x00" * c.MAX_MESSAGE_BYTES) == RC_SUCCESS
    finally:
        publisher.close()
    # ... and is the first delivery, so neither oversize publish was delivered before it.
    assert len(ingest.next_message().payload) == c.MAX_MESSAGE_BYTES
    ingest.assert_no_message()


def test_paho_publisher_never_sees_an_oversize_message_delivered(
    mosquitto: Any, clients: list[Client]
) -> None:
    """paho reports the 0x95 PUBACK, or (paho 2.2) ends the connection on it; either way no delivery."""
    broker = mosquitto(message_size_limit=64 * 1024)
    ingest = Client(broker, "ingest-0")
    device = Client(broker, "dev-a")
    clients += [ingest, device]
    assert ingest.subscribe(c.INGEST_SHARED_SUBSCRIPTION) == [1]
    crop = _crop()
    big = c.encode(crop) + b"\x00" * (64 * 1024)  # over the broker limit; not a valid payload either
    with pytest.raises(c.OversizeMessage):
        c.encode(crop, max_bytes=1024)  # the contract's per-call limit, matched to a smaller broker

    outcome = device.publish_outcome(c.uplink_topic_for(crop), big)
    assert outcome in (RC_PACKET_TOO_LARGE, "disconnected")
    assert "Dropped too large PUBLISH" in broker.log_text()

    sentinel = Client(broker, "dev-a-2")
    clients.append(sentinel)
    assert sentinel.publish(c.uplink_topic_for(crop), c.encode(crop)) == RC_SUCCESS
    assert c.decode(ingest.next_message().payload) == crop
    ingest.assert_no_message()


def _acl_broker(mosquitto: Any) -> Any:
    acl = "\n".join(
        [
            c.device_acl(STORE, "dev-a", "user-a"),
            c.device_acl(STORE, "dev-b", "user-b"),
            c.cloud_acl("cloud"),
        ]
    )
    users = {"user-a": "pw-a", "user-b": "pw-b", "cloud": "pw-cloud"}
    return mosquitto(allow_anonymous=False, users=users, acl=acl)


def test_acl_stops_a_device_publishing_for_another(mosquitto: Any, clients: list[Client]) -> None:
    broker = _acl_broker(mosquitto)
    ingest = Client(broker, "ingest-0", "cloud", "pw-cloud")
    device_a = Client(broker, "dev-a", "user-a", "pw-a")
    clients += [ingest, device_a]
    assert ingest.subscribe(c.INGEST_SHARED_SUBSCRIPTION) == [1]

    forged = _crop(device_id="dev-b")
    assert device_a.publish(c.uplink_topic_for(forged), c.encode(forged)) == RC_NOT_AUTHORIZED
    other_store = _crop(device_id="dev-a", store_id="store-002")
    assert device_a.publish(c.uplink_topic_for(other_store), c.encode(other_store)) == RC_NOT_AUTHORIZED
    # Nor may it fake cloud traffic: another device's acks or a store-wide release pointer.
    assert device_a.publish(c.ack_topic(STORE, "dev-b"), b"x") == RC_NOT_AUTHORIZED
    assert device_a.publish(c.release_topic("model", store_id=STORE), b"x") == RC_NOT_AUTHORIZED
    own = _crop(device_id="dev-a")
    assert device_a.publish(c.uplink_topic_for(own), c.encode(own)) == RC_SUCCESS
    first = ingest.next_message()  # the first delivery: none of the refused publishes came before it
    assert first.topic == c.uplink_topic_for(own)
    assert c.decode(first.payload) == own
    ingest.assert_no_message()


def test_acl_stops_a_device_reading_another_devices_downlink(mosquitto: Any, clients: list[Client]) -> None:
    broker = _acl_broker(mosquitto)
    cloud = Client(broker, "cloud-0", "cloud", "pw-cloud")
    device_a = Client(broker, "dev-a", "user-a", "pw-a")
    clients += [cloud, device_a]
    # Mosquitto 2.0 may grant the SUBSCRIBE itself (0x01) or refuse it (0x87); the read ACL is what
    # stops delivery, and that is what matters.
    granted = device_a.subscribe(f"shelfloop/v1/{STORE}/dev-b/down/#", f"shelfloop/v1/{STORE}/+/down/ack")
    assert all(code in (1, RC_NOT_AUTHORIZED) for code in granted)
    assert device_a.subscribe(*c.device_subscriptions(STORE, "dev-a")) == [1, 1, 1]

    now = c.utc_now()
    ack_b = c.CropAck(crop_id=c.new_crop_id(), status="duplicate", reason=None, object_key=None, acked_at=now)
    ack_a = c.CropAck(
        crop_id=c.new_crop_id(), status="stored", reason=None, object_key="k/a.jpg", acked_at=now
    )
    assert cloud.publish(c.ack_topic(STORE, "dev-b"), c.encode(ack_b)) in RC_OK
    assert cloud.publish(c.ack_topic(STORE, "dev-a"), c.encode(ack_a)) == RC_SUCCESS
    first = device_a.next_message()
    assert first.topic == c.ack_topic(STORE, "dev-a")
    assert c.decode(first.payload, expect=c.CropAck) == ack_a
    # dev-a matches the ack through two subscriptions (its own down/# and +/down/ack): drain duplicates.
    while True:
        try:
            extra = device_a.messages.get(timeout=QUIET)
        except queue.Empty:
            break
        assert extra.topic == c.ack_topic(STORE, "dev-a"), f"leaked {extra.topic}"


def test_checkout_acks_reach_only_their_device_and_only_the_cloud_sends_them(
    mosquitto: Any, clients: list[Client]
) -> None:
    broker = _acl_broker(mosquitto)
    cloud = Client(broker, "cloud-0", "cloud", "pw-cloud")
    device_a = Client(broker, "dev-a", "user-a", "pw-a")
    clients += [cloud, device_a]
    assert device_a.subscribe(*c.device_subscriptions(STORE, "dev-a")) == [1, 1, 1]
    # A device cannot ack its own (or anyone's) checkout items: only the cloud writes downlinks.
    assert device_a.publish(c.checkout_ack_topic(STORE, "dev-a"), b"x") == RC_NOT_AUTHORIZED

    now = c.utc_now()
    ack_b = c.CheckoutAck(event_id=c.new_id(), status="stored", reason=None, acked_at=now)
    ack_a = c.CheckoutAck(event_id=c.new_id(), status="duplicate", reason=None, acked_at=now)
    assert cloud.publish(c.checkout_ack_topic(STORE, "dev-b"), c.encode(ack_b)) in RC_OK
    assert cloud.publish(c.checkout_ack_topic(STORE, "dev-a"), c.encode(ack_a)) == RC_SUCCESS
    first = device_a.next_message()
    assert first.topic == c.checkout_ack_topic(STORE, "dev-a")
    assert c.decode(first.payload, expect=c.CheckoutAck) == ack_a
    device_a.assert_no_message()


def test_anonymous_clients_are_refused_when_acl_is_on(mosquitto: Any, clients: list[Client]) -> None:
    broker = _acl_broker(mosquitto)
    anonymous = Client(broker, "anon")
    clients.append(anonymous)
    assert anonymous.connack.is_failure


def test_device_subscriptions_receive_its_downlink_only(mosquitto: Any, clients: list[Client]) -> None:
    broker = _acl_broker(mosquitto)
    cloud = Client(broker, "cloud-0", "cloud", "pw-cloud")
    clients.append(cloud)
    now = c.utc_now()
    pointers = {
        topic: c.ReleasePointer(
            artifact="model",
            name="shelf-detector",
            version=version,
            url=f"https://artifacts.example/models/{version}.onnx",
            size_bytes=1234,
            sha256="ab" * 32,
            signature="A" * 86 + "==",
            key_id="release-2024",
            published_at=now,
        )
        for topic, version in [
            (c.release_topic("model"), "1.0.0"),
            (c.release_topic("model", store_id=STORE), "1.1.0"),
            (c.release_topic("model", store_id=STORE, device_id="dev-a"), "1.2.0-canary"),
            (c.release_topic("model", store_id="store-002"), "9.9.9"),  # another store: not for dev-a
        ]
    }
    for topic, pointer in pointers.items():
        assert cloud.publish(topic, c.encode(pointer), retain=True) in RC_OK

    device = Client(broker, "dev-a", "user-a", "pw-a")
    clients.append(device)
    assert device.subscribe(*c.device_subscriptions(STORE, "dev-a")) == [1, 1, 1]
    ack = c.CropAck(crop_id=c.new_crop_id(), status="stored", reason=None, object_key="k/1.jpg", acked_at=now)
    assert cloud.publish(c.ack_topic(STORE, "dev-b"), c.encode(ack)) in RC_OK  # not for dev-a
    assert cloud.publish(c.ack_topic(STORE, "dev-a"), c.encode(ack)) in RC_OK

    received: dict[str, c.Message] = {}
    while len(received) < 4:
        msg = device.next_message()
        decoded = c.decode(msg.payload)
        c.check_topic_matches(msg.topic, decoded)
        received[msg.topic] = decoded
    device.assert_no_message()
    assert received[c.ack_topic(STORE, "dev-a")] == ack
    versions = {
        c.parse_topic(t).scope: m.version for t, m in received.items() if isinstance(m, c.ReleasePointer)
    }
    assert versions == {"fleet": "1.0.0", "store": "1.1.0", "device": "1.2.0-canary"}


def test_broker_restart_keeps_retained_pointers_and_clients_can_reconnect(
    mosquitto: Any, clients: list[Client]
) -> None:
    """The fixture's stop/start/restart/kill, as later broker-outage tests will use them."""
    broker = mosquitto()
    cloud = Client(broker, "cloud-0")
    pointer = c.ReleasePointer(
        artifact="gallery",
        name="shelf-gallery",
        version="42",
        url="https://artifacts.example/galleries/42.faiss",
        size_bytes=99,
        sha256="cd" * 32,
        signature="B" * 86 + "==",
        key_id="release-2024",
        published_at=c.utc_now(),
    )
    topic = c.release_topic("gallery", store_id=STORE)
    assert cloud.publish(topic, c.encode(pointer), retain=True) in RC_OK
    cloud.close()
    port = broker.port

    broker.restart()  # graceful: the persistence database is written on SIGTERM
    assert broker.running and broker.port == port
    device = Client(broker, "dev-a")
    clients.append(device)
    assert device.subscribe(*c.device_subscriptions(STORE, "dev-a")) == [1, 1, 1]
    received = device.next_message()
    assert received.retain and received.topic == topic
    assert c.decode(received.payload) == pointer

    broker.kill()  # a crash: the database already on disk (last save or autosave) holds the pointer
    assert not broker.running
    broker.start()
    again = Client(broker, "dev-a-2")
    clients.append(again)
    again.subscribe(topic)
    assert c.decode(again.next_message().payload) == pointer
