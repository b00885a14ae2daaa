"""Step 2 of the cloud: the ingest worker, in memory and against a real Mosquitto, S3 (moto) and PostgreSQL.

Done-when checks of issue 5 here: the same crop delivered three times yields one object and one task and
the acks ``stored, duplicate, duplicate``; a worker SIGKILLed mid-ingest loses and doubles nothing while
the device re-sends until acked; thousands of malformed payloads are all dead-lettered with reasons and
the worker still ingests valid crops afterwards. Issue 4 (checkout items): an item is acked with a
`CheckoutAck` only once its row is committed, and a duplicate delivery is one row and another ack.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import sqlalchemy as sa
import yaml
from test_edge_outbox import make_item

from cloud_api import models as m
from cloud_api.db import Database
from cloud_api.devsim import DeviceSim, make_crop, random_jpeg
from cloud_api.ingest import Ingestor, IngestWorker, full_jpeg_decode, replay_dead_letter
from cloud_api.storage import LocalObjectStore, ObjectStore, make_object_store
from shelfloop import contract as c
from shelfloop.broker import free_port
from shelfloop.settings import StorageSettings

ROOT = Path(__file__).resolve().parents[1]
STORE, DEV = "store-1", "dev-1"
CROP_TOPIC = c.uplink_topic(STORE, DEV, "crop")
# As in deploy/mosquitto: the default queue of 1000 messages per session silently drops a backlog.
BROKER_CONFIG = ("max_queued_messages 100000", "max_queued_bytes 0")


def corrupt_jpeg() -> bytes:
    """Structurally a JPEG (the contract accepts it) with a garbage Huffman table: only decoding finds it."""
    data = bytearray(random_jpeg(48, 48))
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16
    out = bytes(data)
    c.jpeg_dimensions(out)
    return out


def count(db: Database, model: type[Any], *where: Any) -> int:
    with db.session() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(model).where(*where)) or 0


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'cloud.db'}")
    yield db
    db.dispose()


@pytest.fixture
def ingestor(sqlite_db: Database, tmp_path: Path) -> Ingestor:
    return Ingestor(sqlite_db, LocalObjectStore(tmp_path / "objects"))


# ---------------------------------------------------------------------------------------------------------
# In memory (SQLite + local directory)


def test_a_crop_is_stored_once_and_gets_one_task(ingestor: Ingestor) -> None:
    crop = make_crop(STORE, DEV, priority=40, novelty=0.5, source="checkout")
    payload = c.encode(crop)
    first = ingestor.handle(CROP_TOPIC, payload)
    second = ingestor.handle(CROP_TOPIC, payload)
    assert (first.status, second.status) == ("stored", "duplicate")
    assert first.ack is not None and first.ack.status == "stored" and first.ack.crop_id == crop.crop_id
    assert second.ack is not None and second.ack.object_key == first.object_key
    assert first.ack_topic == c.ack_topic(STORE, DEV)
    assert first.object_key == f"crops/{STORE}/{DEV}/{hashlib.sha256(crop.jpeg).hexdigest()}.jpg"
    assert ingestor.store.get(first.object_key) == crop.jpeg
    assert count(ingestor.db, m.Crop) == 1 and count(ingestor.db, m.AnnotationTask) == 1
    with ingestor.db.session() as s:
        task = s.scalars(sa.select(m.AnnotationTask)).one()
        assert task.priority == 40 + 5 + 10  # novelty and checkout raise it
        assert task.crop.candidates[0] == {"sku_id": "sku-a", "score": 0.41}


def test_same_bytes_under_a_new_crop_id_is_a_duplicate(ingestor: Ingestor) -> None:
    jpeg = random_jpeg()
    a = ingestor.handle(CROP_TOPIC, c.encode(make_crop(STORE, DEV, jpeg=jpeg)))
    b = ingestor.handle(CROP_TOPIC, c.encode(make_crop(STORE, DEV, jpeg=jpeg)))
    assert (a.status, b.status) == ("stored", "duplicate") and a.object_key == b.object_key
    assert count(ingestor.db, m.Crop) == 1


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_batch_of_crops_is_one_transaction_with_each_crops_own_outcome(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What the worker does per batch: first arrivals stored, resends (already stored, or twice in the
    batch) and the same bytes under another crop id acked as duplicates with the stored key."""
    url = f"sqlite:///{tmp_path / 'b.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_db")
    db = Database(url)
    try:
        ingestor = Ingestor(db, LocalObjectStore(tmp_path / "o"))
        old = make_crop(STORE, DEV)
        assert ingestor.handle(CROP_TOPIC, c.encode(old)).status == "stored"
        jpeg = random_jpeg()
        fresh, same_bytes, other = (
            make_crop(STORE, DEV, jpeg=jpeg),
            make_crop(STORE, DEV, jpeg=jpeg),
            make_crop(),
        )
        batch = [fresh, old, fresh, same_bytes, other]
        prepared = [ingestor.prepare(c.uplink_topic_for(x), c.encode(x)) for x in batch]
        results = ingestor.record_crops([x for x in prepared if x is not None])
        assert [r.status for r in results] == ["stored", "duplicate", "duplicate", "duplicate", "stored"]
        assert [r.crop_id for r in results] == [x.crop_id for x in batch]
        assert results[0].object_key == results[2].object_key == results[3].object_key
        assert results[1].object_key == f"crops/{STORE}/{DEV}/{hashlib.sha256(old.jpeg).hexdigest()}.jpg"
        for r in results:
            assert r.ack is not None and (r.ack.status, r.ack.object_key) == (r.status, r.object_key)
            assert ingestor.store.get(r.object_key)
        assert count(db, m.Crop) == 3 and count(db, m.AnnotationTask) == 3
        assert ingestor.record_crops([]) == []
        with pytest.raises(c.ContractError):
            ingestor.prepare(CROP_TOPIC, b"\xc1 not msgpack")
    finally:
        db.dispose()


def test_full_jpeg_decode_gives_the_same_verdicts_on_many_threads() -> None:
    """The worker decodes on a pool; the process-wide warnings filters must come out as they went in."""
    filters = list(warnings.filters)
    good, bad = random_jpeg(64, 64), corrupt_jpeg()

    def verdict_is_right(i: int) -> bool:
        data = bad if i % 3 == 0 else good
        try:
            full_jpeg_decode(data)
        except c.InvalidImage:
            return data is bad
        return data is good

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(verdict_is_right, range(300)))
    assert warnings.filters == filters


def test_a_warning_while_decoding_rejects_the_jpeg_but_not_another_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import ImageFile

    load = ImageFile.ImageFile.load
    other = threading.Thread(target=lambda: warnings.warn("from elsewhere", UserWarning, stacklevel=1))

    def warning_load(self: Any) -> Any:
        other.start()  # another thread warns meanwhile: shown as usual, no verdict on this JPEG
        other.join()
        warnings.warn("Corrupt EXIF data", UserWarning, stacklevel=1)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", warning_load)
    with (
        pytest.warns(UserWarning, match="from elsewhere"),
        pytest.raises(c.InvalidImage, match="Corrupt EXIF"),
    ):
        full_jpeg_decode(random_jpeg())


def _mutated(**fields: Any) -> bytes:
    body = msgspec.msgpack.decode(c.encode(make_crop(STORE, DEV)))
    body.update(fields)
    return msgspec.msgpack.encode(body)


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "acked"),
    [
        (CROP_TOPIC, b"\xc1 not msgpack", "malformed", False),
        (CROP_TOPIC, b"x" * (c.MAX_MESSAGE_BYTES + 1), "oversize", False),
        (CROP_TOPIC, _mutated(kind="selfie"), "unknown_kind", True),
        (CROP_TOPIC, _mutated(schema_version=9), "schema_version", True),
        (CROP_TOPIC, _mutated(priority=1000), "malformed", True),
        (CROP_TOPIC, _mutated(jpeg=b"\x89PNG\r\n"), "invalid_image", True),
        (CROP_TOPIC, _mutated(jpeg=corrupt_jpeg()), "invalid_image", True),
        (c.uplink_topic(STORE, "dev-2", "crop"), _mutated(), "topic_mismatch", True),
        (c.uplink_topic(STORE, DEV, "heartbeat"), _mutated(), "topic_mismatch", True),
        ("shelfloop/v1/x/y/up/nonsense", _mutated(), "invalid_topic", False),
    ],
)
def test_invalid_uplinks_are_dead_lettered_with_a_reason(
    ingestor: Ingestor, topic: str, payload: bytes, reason: str, acked: bool
) -> None:
    result = ingestor.handle(topic, payload)
    assert result.status == "rejected" and result.reason == reason
    with ingestor.db.session() as s:
        dl = s.scalars(sa.select(m.DeadLetter)).one()
        assert (dl.reason, dl.topic, dl.payload_size) == (reason, topic, len(payload))
        assert ingestor.dead_letter_payload(dl) == payload
    if acked:  # the crop id was readable and the topic names the sender: it gets a rejected ack
        assert result.ack is not None and result.ack.status == "rejected" and result.ack.reason == reason
        assert result.ack_topic == c.ack_topic(*topic.split("/")[2:4])
    else:
        assert result.ack is None
    assert count(ingestor.db, m.Crop) == 0


def test_a_dead_letter_can_be_replayed_after_a_fix(sqlite_db: Database, tmp_path: Path) -> None:
    strict = Ingestor(sqlite_db, LocalObjectStore(tmp_path / "o"), image_check="full")
    crop = make_crop(STORE, DEV, jpeg=corrupt_jpeg())
    rejected = strict.handle(CROP_TOPIC, c.encode(crop))
    assert rejected.status == "rejected" and rejected.dead_letter_id is not None
    again = replay_dead_letter(strict, rejected.dead_letter_id)  # still failing: no second dead letter
    assert again.status == "rejected" and count(sqlite_db, m.DeadLetter) == 1
    lenient = Ingestor(sqlite_db, LocalObjectStore(tmp_path / "o"), image_check="structural")
    replayed = replay_dead_letter(lenient, rejected.dead_letter_id)
    assert replayed.status == "stored" and count(sqlite_db, m.Crop) == 1
    with sqlite_db.session() as s:
        assert s.get(m.DeadLetter, rejected.dead_letter_id).replay_result == "stored"


def test_heartbeats_snapshots_and_checkout_items_are_kept(ingestor: Ingestor) -> None:
    now = c.utc_now()
    hb = c.Heartbeat(
        store_id=STORE,
        device_id=DEV,
        sent_at=now,
        agent_version="0.1",
        uptime_s=5.0,
        frames_per_s=2.0,
        stage_latency={"detect": c.LatencyStats(p50_ms=10, p95_ms=20, count=5)},
        model_version="m",
        gallery_version="g",
        outbox_depth=1,
        outbox_bytes=100,
        outbox_dropped=0,
        crops_sent=3,
        crops_deduplicated=0,
        cpu_percent=10.0,
        memory_mb=100.0,
    )
    snap = c.ComplianceSnapshot(
        snapshot_id="snap-1",
        store_id=STORE,
        device_id=DEV,
        camera_id="cam-0",
        bay_id="bay-1",
        planogram_version="p1",
        captured_at=now,
        model_version="m",
        gallery_version="g",
        slots=[
            c.SlotResult(
                shelf_row=0,
                slot_index=0,
                planned_sku="sku-a",
                status="correct",
                facings_planned=2,
                facings_found=2,
            )
        ],
        unplanned=[],
        compliance_pct=100.0,
        availability_pct=100.0,
        image_jpeg=random_jpeg(),
    )
    item = c.CheckoutItem(
        event_id="ev-1",
        store_id=STORE,
        device_id=DEV,
        camera_id="cam-1",
        basket_id="b-1",
        track_id=3,
        status="unresolved",
        sku_id=None,
        probability=0.3,
        candidates=[],
        votes=4,
        first_seen=now,
        last_seen=now,
        reason="ambiguous",
    )
    for msg in (hb, snap, item):
        topic = c.uplink_topic_for(msg)
        assert ingestor.handle(topic, c.encode(msg)).status == "stored"
        assert ingestor.handle(topic, c.encode(msg)).status == "duplicate"
    assert count(ingestor.db, m.HeartbeatRow) == 1
    assert count(ingestor.db, m.CheckoutItemRow) == 1
    with ingestor.db.session() as s:
        row = s.scalars(sa.select(m.ComplianceSnapshotRow)).one()
        assert row.image_key is not None and ingestor.store.get(row.image_key) == snap.image_jpeg
        assert "image_jpeg" not in row.body and row.body["slots"][0]["planned_sku"] == "sku-a"


def test_a_checkout_item_is_acked_after_commit_and_a_duplicate_is_one_row_and_an_ack(
    ingestor: Ingestor,
) -> None:
    item = make_item(STORE, DEV)
    topic, payload = c.uplink_topic_for(item), c.encode(item)
    first = ingestor.handle(topic, payload)
    assert count(ingestor.db, m.CheckoutItemRow, m.CheckoutItemRow.event_id == item.event_id) == 1
    second = ingestor.handle(topic, payload)  # the device resent it: its ack was lost, or late
    assert (first.status, second.status) == ("stored", "duplicate")
    for result, status in ((first, "stored"), (second, "duplicate")):
        assert isinstance(result.ack, c.CheckoutAck) and result.event_id == item.event_id
        assert (result.ack.event_id, result.ack.status, result.ack.reason) == (item.event_id, status, None)
        assert result.ack_topic == c.checkout_ack_topic(STORE, DEV)
        assert c.decode(c.encode(result.ack), expect=c.CheckoutAck) == result.ack
    assert count(ingestor.db, m.CheckoutItemRow) == 1


def _item_payload(**fields: Any) -> bytes:
    body = msgspec.msgpack.decode(c.encode(make_item(STORE, DEV, event_id="ev.7")))
    body.update(fields)
    return msgspec.msgpack.encode(body)


ITEM_TOPIC = c.uplink_topic(STORE, DEV, "checkout_item")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (ITEM_TOPIC, _item_payload(probability=5.0), "malformed"),
        (ITEM_TOPIC, _item_payload(schema_version=9), "schema_version"),
        (ITEM_TOPIC, _item_payload(device_id="dev-2"), "topic_mismatch"),  # speaking for another
        (CROP_TOPIC, _item_payload(), "topic_mismatch"),
    ],
)
def test_a_rejected_checkout_item_is_dead_lettered_and_gets_a_rejected_checkout_ack(
    ingestor: Ingestor, topic: str, payload: bytes, reason: str
) -> None:
    result = ingestor.handle(topic, payload)
    assert result.status == "rejected" and result.reason == reason and result.event_id == "ev.7"
    assert isinstance(result.ack, c.CheckoutAck)
    assert (result.ack.event_id, result.ack.status, result.ack.reason) == ("ev.7", "rejected", reason)
    assert result.ack_topic == c.checkout_ack_topic(STORE, DEV)  # to the sender, on its own topic
    assert count(ingestor.db, m.DeadLetter, m.DeadLetter.reason == reason) == 1
    assert count(ingestor.db, m.CheckoutItemRow) == 0


# ---------------------------------------------------------------------------------------------------------
# Through a real broker


class RunningWorker:
    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def __enter__(self) -> IngestWorker:
        self.worker.start()
        assert self.worker.wait_ready(10), "worker did not subscribe"
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()


def _worker(broker: Any, db: Database, store: ObjectStore, client_id: str = "ingest-test") -> IngestWorker:
    return IngestWorker(Ingestor(db, store), host=broker.host, port=broker.port, client_id=client_id)


@pytest.fixture
def devices() -> Iterator[list[DeviceSim]]:
    opened: list[DeviceSim] = []
    yield opened
    for d in opened:
        d.close()


@pytest.mark.broker
@pytest.mark.postgres
def test_same_crop_three_times_gives_one_object_one_task_and_acks(
    mosquitto: Any, s3_server: Any, postgres_db: str, devices: list[DeviceSim]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    db = Database(postgres_db)
    store = make_object_store(StorageSettings(**s3_server.storage_settings(bucket="dedupe")))
    try:
        with RunningWorker(_worker(broker, db, store)):
            device = DeviceSim(broker.host, broker.port, STORE, DEV)
            devices.append(device)
            assert device.wait_connected() == 0
            crop = make_crop(STORE, DEV)
            for _ in range(3):
                device.send(crop)
                assert device.wait_all_acked(10, resend=False)
            assert device.acks[crop.crop_id] == ["stored", "duplicate", "duplicate"]
        assert count(db, m.Crop) == 1 and count(db, m.AnnotationTask) == 1 and count(db, m.DeadLetter) == 0
        keys = [o.object_name for o in store.client.list_objects("dedupe", prefix="crops/", recursive=True)]
        assert keys == [f"crops/{STORE}/{DEV}/{hashlib.sha256(crop.jpeg).hexdigest()}.jpg"]
    finally:
        db.dispose()


@pytest.mark.broker
def test_a_device_speaking_for_another_gets_a_rejected_ack(
    mosquitto: Any, sqlite_db: Database, tmp_path: Path, devices: list[DeviceSim]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    with RunningWorker(_worker(broker, sqlite_db, LocalObjectStore(tmp_path / "o"))):
        device = DeviceSim(broker.host, broker.port, STORE, DEV)
        devices.append(device)
        device.wait_connected()
        forged = make_crop(STORE, "dev-2")
        device.send(c.encode(forged), crop_id=forged.crop_id)  # on dev-1's own topic
        assert device.wait_all_acked(10, resend=False)
        assert (
            device.acks[forged.crop_id] == ["rejected"]
            and device.ack_reasons[forged.crop_id] == "topic_mismatch"
        )
    assert (
        count(sqlite_db, m.Crop) == 0
        and count(sqlite_db, m.DeadLetter, m.DeadLetter.reason == "topic_mismatch") == 1
    )


@pytest.mark.broker
def test_the_worker_acks_a_checkout_item_after_its_row_is_committed_and_acks_a_resend_too(
    mosquitto: Any, sqlite_db: Database, tmp_path: Path
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = mosquitto(extra_config=BROKER_CONFIG)
    item = make_item(STORE, DEV)
    acks: list[tuple[str, str, int]] = []  # (event id, status, rows for it when the ack arrived)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        ack = c.decode(msg.payload, expect=c.CheckoutAck)
        rows = count(sqlite_db, m.CheckoutItemRow, m.CheckoutItemRow.event_id == ack.event_id)
        acks.append((ack.event_id, ack.status, rows))

    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="till-dev", protocol=mqtt.MQTTv5)
    device.on_message = on_message
    device.connect(broker.host, broker.port)
    device.loop_start()
    try:
        device.subscribe(c.checkout_ack_topic(STORE, DEV), qos=1)
        time.sleep(0.3)
        with RunningWorker(_worker(broker, sqlite_db, LocalObjectStore(tmp_path / "o"))):
            for expected in (1, 2):  # the same bytes twice: a resend after a lost ack
                device.publish(c.uplink_topic_for(item), c.encode(item), qos=1).wait_for_publish(5)
                deadline = time.monotonic() + 10
                while len(acks) < expected and time.monotonic() < deadline:
                    time.sleep(0.05)
    finally:
        device.disconnect()
        device.loop_stop()
    assert acks == [(item.event_id, "stored", 1), (item.event_id, "duplicate", 1)]
    assert count(sqlite_db, m.CheckoutItemRow) == 1 and count(sqlite_db, m.DeadLetter) == 0


def _fuzz_payloads(n: int, seed: int) -> list[tuple[str, bytes]]:
    """Random bytes, bit flips and truncations of valid messages, wrong types, wrong topics: each one checked
    to be invalid (a mutation can by chance still be a valid crop) before it is used."""
    rng = random.Random(seed)
    template = c.encode(make_crop(STORE, DEV))
    body = msgspec.msgpack.decode(template)
    keys = sorted(body)
    junk_values: list[Any] = [None, -1, 2**64 - 1, "", "x" * 300, [], {}, 1.5e308, b"\xff\xd8", True]
    topics = [CROP_TOPIC, *(c.uplink_topic(STORE, DEV, k) for k in ("heartbeat", "checkout_item"))]
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        choice = rng.randrange(6)
        if choice == 0:
            payload = rng.randbytes(rng.randrange(0, 200))
        elif choice == 1:
            buf = bytearray(template)
            for _ in range(rng.randrange(1, 8)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            payload = bytes(buf)
        elif choice == 2:
            payload = template[: rng.randrange(len(template))]
        elif choice == 3:
            mutated = dict(body)
            mutated[rng.choice(keys)] = rng.choice(junk_values)
            payload = msgspec.msgpack.encode(mutated)
        elif choice == 4:
            mutated = dict(body)
            del mutated[rng.choice(keys)]
            payload = msgspec.msgpack.encode(mutated)
        else:
            payload = msgspec.msgpack.encode(rng.choice([[1, 2], "crop", 7, {"kind": 5}, {"kind": "crop"}]))
        topic = rng.choice(topics) if rng.random() < 0.2 else CROP_TOPIC
        try:
            msg = c.decode(payload)
            c.check_topic_matches(topic, msg)
            if isinstance(msg, c.UncertainCrop):
                full_jpeg_decode(msg.jpeg)
            continue  # still valid: not a fuzz case
        except c.ContractError:
            out.append((topic, payload))
    return out


@pytest.mark.broker
def test_thousands_of_malformed_payloads_are_dead_lettered_and_the_worker_goes_on(
    mosquitto: Any, sqlite_db: Database, tmp_path: Path, devices: list[DeviceSim]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    cases = _fuzz_payloads(2000, seed=5)
    seen: list[Any] = []
    worker = _worker(broker, sqlite_db, LocalObjectStore(tmp_path / "o"))
    worker.on_result = seen.append
    with RunningWorker(worker):
        device = DeviceSim(broker.host, broker.port, STORE, DEV)
        devices.append(device)
        device.wait_connected()
        for i, (topic, payload) in enumerate(cases):
            device.publish_raw(topic, payload)
            if i % 200 == 0:
                time.sleep(0.01)
        deadline = time.monotonic() + 60
        started = time.monotonic()
        while len(seen) < len(cases) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(seen) == len(cases)
        print(f"{len(cases)} malformed payloads handled in {time.monotonic() - started:.1f}s")
        assert all(r.status == "rejected" for r in seen)
        valid = [make_crop(STORE, DEV) for _ in range(5)]
        for crop in valid:
            device.send(crop)
        assert device.wait_all_acked(15)
        assert all(device.acks[v.crop_id] == ["stored"] for v in valid)
    reasons = Counter(r.reason for r in seen[: len(cases)])
    assert set(reasons) <= {
        "malformed",
        "unknown_kind",
        "schema_version",
        "invalid_image",
        "topic_mismatch",
        "oversize",
    }
    assert count(sqlite_db, m.DeadLetter) == len(cases)
    assert count(sqlite_db, m.Crop) == len(valid)


@pytest.mark.broker
@pytest.mark.postgres
def test_a_worker_killed_mid_ingest_loses_and_doubles_nothing(
    mosquitto: Any, s3_server: Any, postgres_db: str, tmp_path: Path, devices: list[DeviceSim]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    bucket = "killtest"
    metrics_port = free_port()
    config = tmp_path / "cloud.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {"host": broker.host, "port": broker.port},
                "database": {"url": postgres_db},
                "storage": s3_server.storage_settings(bucket=bucket),
                "cloud": {
                    "ingest_client_id": "ingest-kill",
                    "json_logs": True,
                    "ingest_metrics_port": metrics_port,
                },
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "worker.log").open("ab")

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "shelfloop.cli", "cloud", "ingest", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    db = Database(postgres_db)  # migrate before the worker starts, so it has a schema to write to
    proc = start_worker()
    try:
        device = DeviceSim(broker.host, broker.port, STORE, DEV, resend_after_s=3.0)
        devices.append(device)
        device.wait_connected()
        # Wait for the worker's session to exist (first ack), so the broker queues for it while it is down.
        probe = make_crop(STORE, DEV)
        device.send(probe)
        assert device.wait_all_acked(60), (tmp_path / "worker.log").read_text()[-3000:]
        crops = [make_crop(STORE, DEV) for _ in range(150)]
        for crop in crops:
            device.send(crop)
        deadline = time.monotonic() + 30
        while len(device.acks) < 30 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        acked_at_kill = len(device.acks)
        print(f"acked at kill: {acked_at_kill}")
        assert 1 < acked_at_kill < len(crops) + 1, "the kill should land mid-ingest"
        time.sleep(1.0)
        proc = start_worker()
        assert device.wait_all_acked(90), f"{device.pending()} crops never acked"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'shelfloop_ingest_messages_total{kind="crop",status="stored"}' in metrics
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
    expected = {probe.crop_id, *(x.crop_id for x in crops)}
    assert set(device.acks) == expected
    assert all(statuses[0] in ("stored", "duplicate") for statuses in device.acks.values())
    with db.session() as s:
        rows = s.execute(sa.select(m.Crop.crop_id, m.Crop.object_key)).all()
        tasks = s.scalar(sa.select(sa.func.count()).select_from(m.AnnotationTask))
    assert {r.crop_id for r in rows} == expected and len(rows) == len(expected)
    assert tasks == len(expected)
    store = make_object_store(StorageSettings(**s3_server.storage_settings(bucket=bucket)))
    keys = {o.object_name for o in store.client.list_objects(bucket, prefix="crops/", recursive=True)}
    assert keys == {r.object_key for r in rows}
    db.dispose()


class _Buggy(Ingestor):
    """Ingest with a bug that one particular crop triggers (a real one cannot be provoked on purpose),
    either before its object is stored (``prepare``, and `handle` with it) or in the batch's transaction."""

    poison: bytes = b""
    stage: str = "prepare"

    def handle(self, topic: str, payload: bytes, *, record_dead_letter: bool = True) -> Any:
        if self.stage == "prepare" and payload == self.poison:
            raise RuntimeError("bug triggered by this crop")
        return super().handle(topic, payload, record_dead_letter=record_dead_letter)

    def prepare(self, topic: str, payload: bytes) -> Any:
        if self.stage == "prepare" and payload == self.poison:
            raise RuntimeError("bug triggered by this crop")
        return super().prepare(topic, payload)

    def record_crops(self, crops: Any) -> Any:
        if self.stage == "record" and any(c.encode(x.msg) == self.poison for x in crops):
            raise RuntimeError("bug triggered by this crop")  # and by the batch it is in
        return super().record_crops(crops)


@pytest.mark.broker
@pytest.mark.parametrize("stage", ["prepare", "record"])
def test_a_message_that_keeps_crashing_ingest_is_parked_not_retried_forever(
    mosquitto: Any, sqlite_db: Database, tmp_path: Path, devices: list[DeviceSim], stage: str
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    ingestor = _Buggy(sqlite_db, LocalObjectStore(tmp_path / "o"))
    poison = make_crop(STORE, DEV)
    ingestor.poison, ingestor.stage = c.encode(poison), stage
    worker = IngestWorker(
        ingestor, host=broker.host, port=broker.port, client_id="ingest-buggy", max_failures=2
    )
    with RunningWorker(worker):
        device = DeviceSim(broker.host, broker.port, STORE, DEV, resend_after_s=30)
        devices.append(device)
        device.wait_connected()
        fine = [make_crop(STORE, DEV) for _ in range(4)]
        for crop in (fine[0], poison, *fine[1:]):  # crops batched with the poison are stored all the same
            device.send(crop)
        assert device.wait_all_acked(20, resend=False)
    assert (
        device.acks[poison.crop_id] == ["rejected"] and device.ack_reasons[poison.crop_id] == "ingest_error"
    )
    assert all(device.acks[x.crop_id] == ["stored"] for x in fine)
    with sqlite_db.session() as s:
        dl = s.scalars(sa.select(m.DeadLetter)).one()
        assert dl.reason == "ingest_error" and "bug triggered" in dl.detail and dl.payload == ingestor.poison


class _FlakyStore(LocalObjectStore):
    """Fails the first put of every other object, as an S3 endpoint that drops connections would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        self.failures = 0

    def put_content_addressed(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        with self.lock:
            fail = key not in self.seen and len(self.seen) % 2 == 0
            self.seen.add(key)
            self.failures += fail
        if fail:
            raise ConnectionError("S3 endpoint dropped the connection")
        super().put_content_addressed(key, data, content_type)


class _CheckedWorker(IngestWorker):
    """Checks, as each crop ack is handed to the client, that its object and its committed row exist."""

    violations: list[str]

    def _publish_ack(self, topic: str, ack: Any) -> None:
        if isinstance(ack, c.CropAck) and ack.status != "rejected":
            if ack.object_key is None or not self.ingestor.store.exists(ack.object_key):
                self.violations.append(f"{ack.crop_id}: no object")
            with self.ingestor.db.session() as s:  # a new transaction sees committed rows only
                if s.scalar(sa.select(m.Crop.id).where(m.Crop.crop_id == ack.crop_id)) is None:
                    self.violations.append(f"{ack.crop_id}: no committed row")
        super()._publish_ack(topic, ack)


@pytest.mark.broker
def test_batched_acks_follow_the_object_and_the_committed_row_even_when_puts_fail(
    mosquitto: Any, sqlite_db: Database, tmp_path: Path, devices: list[DeviceSim]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    store = _FlakyStore(tmp_path / "o")
    worker = _CheckedWorker(Ingestor(sqlite_db, store), host=broker.host, port=broker.port, client_id="chk")
    worker.violations = []
    batches: list[int] = []
    record = worker.ingestor.record_crops
    worker.ingestor.record_crops = lambda crops: (batches.append(len(crops)), record(crops))[1]  # type: ignore[method-assign]
    with RunningWorker(worker):
        device = DeviceSim(broker.host, broker.port, STORE, DEV)
        devices.append(device)
        device.wait_connected()
        crops = [make_crop(STORE, DEV) for _ in range(60)]
        for crop in crops:
            device.send(crop)
        device.send(crops[0])  # a resend while the first may still be in flight
        assert device.wait_all_acked(60, resend=False)
    assert worker.violations == [] and store.failures > 0
    assert all(device.acks[x.crop_id][0] == "stored" for x in crops)
    assert count(sqlite_db, m.Crop) == 60 and count(sqlite_db, m.AnnotationTask) == 60
    assert sum(batches) >= 60 and max(batches) <= worker.batch_size
    print(f"{len(batches)} transactions for 61 uplinks, largest batch {max(batches)}")


@pytest.mark.postgres
def test_dead_letters_with_nul_in_their_text_are_storable_on_postgres(
    postgres_db: str, tmp_path: Path
) -> None:
    db = Database(postgres_db)
    try:
        ingestor = Ingestor(db, LocalObjectStore(tmp_path / "o"))
        dl = ingestor.record_dead_letter(
            "shelfloop/v1/s/d/up/crop", b"\x00" * 10, "malformed", "bad \x00 key"
        )
        with db.session() as s:
            assert s.get(m.DeadLetter, dl).detail == "bad \\x00 key"
    finally:
        db.dispose()


@pytest.mark.broker
@pytest.mark.postgres
def test_two_workers_share_the_uplinks_and_store_each_once(
    mosquitto: Any, s3_server: Any, postgres_db: str, devices: list[DeviceSim]
) -> None:
    broker = mosquitto(extra_config=BROKER_CONFIG)
    db = Database(postgres_db)
    store = make_object_store(StorageSettings(**s3_server.storage_settings(bucket="shared-group")))
    counts: Counter[str] = Counter()
    workers = [_worker(broker, db, store, client_id=f"ingest-{i}") for i in range(2)]
    for i, w in enumerate(workers):
        w.on_result = lambda _r, i=i: counts.update([f"w{i}"])
    try:
        with RunningWorker(workers[0]), RunningWorker(workers[1]):
            device = DeviceSim(broker.host, broker.port, STORE, DEV)
            devices.append(device)
            device.wait_connected()
            crops = [make_crop(STORE, DEV) for _ in range(40)]
            for crop in crops:
                device.send(crop)
            assert device.wait_all_acked(30)
        assert counts["w0"] > 0 and counts["w1"] > 0 and counts["w0"] + counts["w1"] == 40
        assert all(device.acks[x.crop_id] == ["stored"] for x in crops)
        assert count(db, m.Crop) == 40 and count(db, m.AnnotationTask) == 40
    finally:
        db.dispose()
