"""The uplink against a real Mosquitto with the real cloud ingest worker as the consumer.

Done-when checks of issue 4 here: broker stopped (and crashed) and restarted while crops are produced ->
every accepted crop reaches the cloud and nothing leaves the outbox before its ack; the agent SIGKILLed
mid-stream and restarted -> no accepted crop lost; malformed acks ignored; a refused login is a fault and
the outbox is kept.
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

import pytest
import sqlalchemy as sa

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
    """An outbox that checks, at every deletion, that the cloud really has the crop already."""

    cloud_db: Database | None = None
    violations: list[str]
    deleted: list[str]

    def ack(self, ack: c.CropAck) -> bool:
        if not hasattr(self, "violations"):
            self.violations, self.deleted = [], []
        if (
            self.cloud_db is not None
            and ack.status != "rejected"
            and ack.crop_id not in stored_crop_ids(self.cloud_db)
        ):
            self.violations.append(ack.crop_id)
        deleted = super().ack(ack)
        if deleted:
            self.deleted.append(ack.crop_id)
        return deleted


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
    for crop in crops:
        assert box.put(crop).accepted
    uplink.kick()
    time.sleep(2.5)  # PUBACKed by the broker, resent after timeouts, but no cloud is listening yet
    assert box.stats().depth == 5 and uplink.stats().published >= 10 and uplink.stats().resent >= 5
    cloud = Cloud(broker, tmp_path)
    cloud.start()
    cleanup.insert(0, cloud)  # stopped last
    box.cloud_db = cloud.db
    assert uplink.wait_drained(20)
    assert stored_crop_ids(cloud.db) == {crop.crop_id for crop in crops}
    assert box.violations == []
    with cloud.db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(m.Crop)) == 5  # resends deduplicated
    counters = box.counters()
    assert counters["acked_stored"] == 5


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_broker_down_at_start_and_restarted_mid_stream_loses_nothing(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any], outage: str
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG, start=False)
    box = CheckingOutbox(tmp_path / "outbox.db")
    uplink = Uplink(fast_config(broker), box)
    uplink.start()  # the broker is down: the uplink keeps trying
    cleanup.append(uplink)
    accepted: list[str] = []

    def produce(n: int) -> None:
        for _ in range(n):
            crop = make_crop(STORE, DEV, priority=50)
            if box.put(crop).accepted:
                accepted.append(crop.crop_id)
            uplink.kick()
            time.sleep(0.01)

    produce(10)
    assert not uplink.connected.is_set()
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
    assert uplink.wait_drained(45), f"outbox still holds {box.stats().depth} crops"
    assert set(accepted) <= stored_crop_ids(cloud.db)
    assert len(accepted) == 90
    assert box.violations == []
    assert uplink.stats().connects >= 2


FEEDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from cloud_api.devsim import make_crop  # test helper: a valid crop with random pixels
    from edge_agent.outbox import Outbox
    from edge_agent.uplink import Uplink, UplinkConfig

    mode, db, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    box = Outbox(db)
    uplink = Uplink(UplinkConfig(store_id="store-1", device_id="dev-1", port=port, ack_timeout_s=1.0,
                                 max_backoff_s=2.0), box)
    uplink.start()
    if mode == "produce":
        while True:
            crop = make_crop("store-1", "dev-1")
            if box.put(crop).accepted:
                print(crop.crop_id, flush=True)
            uplink.kick()
            time.sleep(0.01)
    else:
        ok = uplink.wait_drained(40)
        uplink.stop()
        print("drained" if ok else "not drained", flush=True)
    """
)


def test_agent_sigkilled_mid_stream_and_restarted_loses_no_accepted_crop(
    mosquitto: Any, tmp_path: Path, cleanup: list[Any]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    cloud = Cloud(broker, tmp_path)
    cloud.start()
    cleanup.append(cloud)
    script = tmp_path / "feeder.py"
    script.write_text(FEEDER.format(root=str(ROOT)))
    db = tmp_path / "edge" / "outbox.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(script)]
    proc = subprocess.Popen(
        [*args, "produce", str(db), str(broker.port)], stdout=subprocess.PIPE, text=True, env=env
    )
    accepted: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while len(accepted) < 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            accepted.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        accepted += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert len(accepted) >= 60
    with Outbox(db) as box:
        assert box.integrity_ok()
        pending = set(box.crop_ids())
    assert set(accepted) <= pending | stored_crop_ids(cloud.db)  # nothing vanished in the kill
    result = subprocess.run(
        [*args, "drain", str(db), str(broker.port)], capture_output=True, text=True, env=env, timeout=60
    )
    assert "drained" in result.stdout.split(), result.stderr[-3000:]
    assert set(accepted) <= stored_crop_ids(cloud.db)


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
        topic = c.ack_topic(STORE, DEV)
        wrong_kind = c.encode(make_crop(STORE, DEV))
        for payload in (b"", b"\xc1garbage", b"\x80", wrong_kind, os.urandom(300)):
            evil.publish(topic, payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while uplink.stats().malformed_acks < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert uplink.stats().malformed_acks == 5
        # Still alive: a real ack from the cloud deletes the crop.
        crop = make_crop(STORE, DEV)
        box.put(crop)
        ack = c.CropAck(
            crop_id=crop.crop_id, status="duplicate", reason=None, object_key=None, acked_at=c.utc_now()
        )
        evil.publish(topic, c.encode(ack), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while box.contains(crop.crop_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not box.contains(crop.crop_id)
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
