"""The uplink against a real Mosquitto with the real cloud ingest worker as the consumer.

Done-when checks of issue 4 here, for crops and for checkout items alike: broker down at the start, then
stopped (and crashed) and restarted while both are produced -> every accepted crop and item reaches the
cloud and nothing leaves the outbox before the cloud's ack for it (PUBACKs delete nothing); the agent
SIGKILLed mid-stream and restarted -> no accepted crop or item lost; malformed acks ignored; a refused
login is a fault and the outbox is kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from test_edge_outbox import item_ack, make_item

from cloud_api import models as m
from cloud_api.db import Database
from cloud_api.devsim import make_crop
from cloud_api.ingest import Ingestor, IngestWorker
from cloud_api.storage import LocalObjectStore
from edge_agent.outbox import Outbox
from edge_agent.uplink import Uplink, UplinkConfig
from shelfloop import contract as c

ROOT = Path(__file__).resolve().parents[1]
STORE, DEV = "store-1", "dev-1"
BROKER_CONFIG = ("max_queued_messages 100000", "max_queued_bytes 0")
pytestmark = pytest.mark.broker


def stored_crop_ids(db: Database) -> set[str]:
    with db.session() as s:
        return set(s.scalars(sa.select(m.Crop.crop_id)))


def stored_event_ids(db: Database) -> set[str]:
    with db.session() as s:
        return set(s.scalars(sa.select(m.CheckoutItemRow.event_id)))


class Cloud:
    """The real ingest worker (SQLite + local objects) on a broker; records every crop it stored."""

    def __init__(self, broker: Any, tmp: Path) -> None:
        self.db = Database(f"sqlite:///{tmp / 'cloud.db'}")
        self.worker = IngestWorker(
            Ingestor(self.db, LocalObjectStore(tmp / "objects")),
            host=broker.host,
            port=broker.port,
            client_id="ingest-edge-test",
        )

    def start(self) -> None:
        self.worker.start()
        assert self.worker.wait_ready(15), "ingest worker did not subscribe"

    def stop(self) -> None:
        self.worker.stop()
        self.db.dispose()


class CheckingOutbox(Outbox):
    """An outbox that checks, at every deletion, that the cloud really has the crop or item already."""

    cloud_db: Database | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.violations: list[str] = []
        self.deleted: list[str] = []

    def ack(self, ack: c.CropAck) -> bool:
        self._check(ack.crop_id, ack.status, stored_crop_ids)
        deleted = super().ack(ack)
        if deleted:
            self.deleted.append(ack.crop_id)
        return deleted

    def ack_item(self, ack: c.CheckoutAck) -> bool:
        self._check(ack.event_id, ack.status, stored_event_ids)
        deleted = super().ack_item(ack)
        if deleted:
            self.deleted.append(ack.event_id)
        return deleted

    def _check(self, ident: str, status: str, stored: Any) -> None:
        if self.cloud_db is not None and status != "rejected" and ident not in stored(self.cloud_db):
            self.report(ident)

    def report(self, ident: str) -> None:
        """A deletion before the cloud had the row (the feeder subprocess prints it instead)."""
        self.violations.append(ident)


def fast_config(broker: Any, **kw: Any) -> UplinkConfig:
    values: dict[str, Any] = {
        "store_id": STORE,
        "device_id": DEV,
        "host": broker.host,
        "port": broker.port,
        "ack_timeout_s": 1.0,
        "max_backoff_s": 4.0,
        "reconnect_min_s": 0.5,
        "reconnect_max_s": 1.0,
        "keepalive_s": 5,
    }
    values.update(kw)
    return UplinkConfig(**values)


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop()


def test_crops_are_deleted_only_on_the_clouds_ack_not_on_puback(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    box = CheckingOutbox(tmp_path / "outbox.db")
    uplink = Uplink(fast_config(broker, ack_timeout_s=0.5, max_backoff_s=1.0), box)
    uplink.start()
    cleanup.append(uplink)
    assert uplink.wait_connected(10)
    crops = [make_crop(STORE, DEV) for _ in range(5)]
    items = [make_item(STORE, DEV) for _ in range(5)]
    for crop, item in zip(crops, items, strict=True):
        assert box.put(crop).accepted and box.put_item(item).accepted
    uplink.kick()
    time.sleep(2.5)  # PUBACKed by the broker, resent after timeouts, but no cloud is listening yet
    stats = uplink.stats()
    assert box.stats().depth == 10 and box.stats().items == 5
    assert stats.published >= 10 and stats.resent >= 5
    assert stats.items_published >= 10 and stats.items_resent >= 5
    cloud = Cloud(broker, tmp_path)
    cloud.start()
    cleanup.insert(0, cloud)  # stopped last
    box.cloud_db = cloud.db
    assert uplink.wait_drained(20)
    assert stored_crop_ids(cloud.db) == {crop.crop_id for crop in crops}
    assert stored_event_ids(cloud.db) == {item.event_id for item in items}
    assert box.violations == [] and len(box.deleted) == 10
    with cloud.db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(m.Crop)) == 5  # resends deduplicated
        assert s.scalar(sa.select(sa.func.count()).select_from(m.CheckoutItemRow)) == 5
    counters = box.counters()
    assert counters["acked_stored"] == 5 and counters["items_acked_stored"] == 5


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_broker_down_at_start_and_restarted_mid_stream_loses_no_crop_or_item(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any], outage: str
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG, start=False)
    box = CheckingOutbox(tmp_path / "outbox.db")
    uplink = Uplink(fast_config(broker), box)
    uplink.start()  # the broker is down: the uplink keeps trying
    cleanup.append(uplink)
    accepted: list[str] = []
    accepted_items: list[str] = []

    def produce(n: int) -> None:
        for _ in range(n):
            crop = make_crop(STORE, DEV, priority=50)
            if box.put(crop).accepted:
                accepted.append(crop.crop_id)
            item = make_item(STORE, DEV)
            if box.put_item(item).accepted:
                accepted_items.append(item.event_id)
            uplink.kick()
            time.sleep(0.01)

    produce(10)
    assert not uplink.connected.is_set() and box.stats().items == 10  # queued on disk while down
    broker.start()
    cloud = Cloud(broker, tmp_path)
    cloud.start()
    cleanup.insert(0, cloud)
    box.cloud_db = cloud.db
    assert uplink.wait_connected(15)
    producer = threading.Thread(target=produce, args=(60,))
    producer.start()
    time.sleep(0.3)
    broker.kill() if outage == "kill" else broker.stop()  # crash: PUBACKed messages can be lost
    producer.join()
    produce(10)  # produced during the outage
    assert not uplink.connected.is_set()
    broker.start()
    produce(10)
    assert uplink.wait_drained(45), f"outbox still holds {box.stats()}"
    assert set(accepted) <= stored_crop_ids(cloud.db)
    assert set(accepted_items) == stored_event_ids(cloud.db)
    assert len(accepted) == len(accepted_items) == 90
    assert box.violations == []
    assert uplink.stats().connects >= 2


FEEDER = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from cloud_api.db import Database
    from cloud_api.devsim import make_crop  # test helper: a valid crop with random pixels
    from edge_agent.uplink import Uplink, UplinkConfig
    from test_edge_outbox import make_item
    from test_edge_uplink import CheckingOutbox

    class Feeder(CheckingOutbox):
        def report(self, ident):
            print("violation", ident, flush=True)  # deleted before the cloud had it

    mode, what, db, port, cloud_db = sys.argv[1:6]
    box = Feeder(db)
    box.cloud_db = Database(f"sqlite:///{{cloud_db}}")
    uplink = Uplink(UplinkConfig(store_id="store-1", device_id="dev-1", port=int(port), ack_timeout_s=1.0,
                                 max_backoff_s=2.0), box)
    uplink.start()
    if mode == "produce":
        while True:
            if what == "crop":
                crop = make_crop("store-1", "dev-1")
                ident, result = crop.crop_id, box.put(crop)
            else:
                item = make_item("store-1", "dev-1")
                ident, result = item.event_id, box.put_item(item)
            if result.accepted:
                print("accepted", ident, flush=True)
            uplink.kick()
            time.sleep(0.01)
    else:
        ok = uplink.wait_drained(40)
        uplink.stop()
        print("drained" if ok else "not drained", flush=True)
    """
)


@pytest.mark.parametrize("what", ["crop", "checkout_item"])
def test_agent_sigkilled_mid_stream_and_restarted_loses_nothing_accepted(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any], what: str
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    cloud = Cloud(broker, tmp_path)
    cloud.start()
    cleanup.append(cloud)
    script = tmp_path / "feeder.py"
    script.write_text(FEEDER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    db = tmp_path / "edge" / "outbox.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(script)]
    tail = [what, str(db), str(broker.port), str(tmp_path / "cloud.db")]
    stored = stored_crop_ids if what == "crop" else stored_event_ids
    proc = subprocess.Popen([*args, "produce", *tail], stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while sum(ln.startswith("accepted") for ln in lines) < 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        lines += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    accepted = [ln.split()[1] for ln in lines if ln.startswith("accepted")]
    assert len(accepted) >= 60
    with Outbox(db) as box:
        assert box.integrity_ok()
        pending = set(box.crop_ids() if what == "crop" else box.item_ids())
    assert set(accepted) <= pending | stored(cloud.db)  # nothing vanished in the kill
    result = subprocess.run([*args, "drain", *tail], capture_output=True, text=True, env=env, timeout=60)
    assert "drained" in result.stdout.split(), result.stderr[-3000:]
    assert set(accepted) <= stored(cloud.db)
    violations = [ln for ln in [*lines, *result.stdout.splitlines()] if ln.startswith("violation")]
    assert violations == []  # no process deleted anything before the cloud had stored it


def test_malformed_acks_are_ignored_and_counted(mosquitto: Any, tmp_path: Path, cleanup: list[Any]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = mosquitto(extra_config=BROKER_CONFIG)
    box = Outbox(tmp_path / "outbox.db")
    uplink = Uplink(fast_config(broker), box)
    uplink.start()
    cleanup.append(uplink)
    assert uplink.wait_connected(10)
    time.sleep(0.3)  # subscription in place
    evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil", protocol=mqtt.MQTTv5)
    evil.connect(broker.host, broker.port)
    evil.loop_start()
    try:
        topic, item_topic = c.ack_topic(STORE, DEV), c.checkout_ack_topic(STORE, DEV)
        crop, item = make_crop(STORE, DEV), make_item(STORE, DEV)
        ack = c.CropAck(
            crop_id=crop.crop_id, status="duplicate", reason=None, object_key=None, acked_at=c.utc_now()
        )
        box.put(crop)
        box.put_item(item)
        wrong_kind = c.encode(make_crop(STORE, DEV))
        for payload in (b"", b"\xc1garbage", b"\x80", wrong_kind, os.urandom(300)):
            evil.publish(topic, payload, qos=1).wait_for_publish(5)
        # On the checkout ack topic a crop ack for the item's id is the wrong kind too: it deletes nothing.
        wrong_ack = c.encode(msgspec.structs.replace(ack, crop_id=item.event_id))
        for payload in (b"\xc1garbage", wrong_ack):
            evil.publish(item_topic, payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while uplink.stats().malformed_acks < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert uplink.stats().malformed_acks == 7
        assert box.contains(crop.crop_id) and box.item_ids() == [item.event_id]
        # Still alive: a real ack from the cloud deletes the crop, and a real checkout ack the item.
        evil.publish(topic, c.encode(ack), qos=1).wait_for_publish(5)
        evil.publish(item_topic, c.encode(item_ack(item.event_id, "duplicate")), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while (box.contains(crop.crop_id) or box.item_ids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not box.contains(crop.crop_id) and box.item_ids() == []
    finally:
        evil.disconnect()
        evil.loop_stop()


def test_a_refused_login_is_a_fault_and_the_outbox_is_kept(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any]
) -> None:
    broker = mosquitto(allow_anonymous=False, users={"dev-1": "right"}, extra_config=BROKER_CONFIG)
    box = Outbox(tmp_path / "outbox.db")
    crop = make_crop(STORE, DEV)
    box.put(crop)
    uplink = Uplink(fast_config(broker, username="dev-1", password="wrong"), box)
    uplink.start()
    cleanup.append(uplink)
    deadline = time.monotonic() + 10
    faults: list[str] = []
    while not faults and time.monotonic() < deadline:
        faults = uplink.take_faults()
        time.sleep(0.1)
    assert faults and "refused" in faults[0]
    time.sleep(1.5)  # it keeps retrying; the same refusal is not reported again and again
    assert len(uplink.take_faults()) <= 1
    assert not uplink.connected.is_set() and box.contains(crop.crop_id)


def test_a_publish_the_broker_refuses_is_a_fault_and_the_crop_is_kept(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any]
) -> None:
    acl = f"user dev-1\ntopic read {c.TOPIC_PREFIX}/#\n"  # may listen, may not publish crops
    broker = mosquitto(allow_anonymous=False, users={"dev-1": "pw"}, acl=acl)
    box = Outbox(tmp_path / "outbox.db")
    crop = make_crop(STORE, DEV)
    box.put(crop)
    uplink = Uplink(fast_config(broker, username="dev-1", password="pw"), box)
    uplink.start()
    cleanup.append(uplink)
    assert uplink.wait_connected(10)
    deadline = time.monotonic() + 10
    faults: list[str] = []
    while not faults and time.monotonic() < deadline:
        faults = uplink.take_faults()
        time.sleep(0.1)
    assert faults and "refused crop" in faults[0] and crop.crop_id in faults[0]
    assert box.contains(crop.crop_id)
