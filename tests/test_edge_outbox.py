"""The durable outbox: crops and checkout items stay until the cloud acks them, bounds hold (and the crop
bounds never touch checkout items), drops are counted, I/O errors never corrupt the store.

`make_item` and `item_ack` are shared with the other checkout-item tests (uplink, agent, cloud ingest).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from cloud_api.devsim import make_crop
from edge_agent.outbox import Outbox, OutboxLimits
from shelfloop import contract as c

STORE, DEV = "store-1", "dev-1"


class FakeClock:
    """Deterministic time so age bounds and back-off are testable without sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_item(store_id: str = STORE, device_id: str = DEV, **fields: Any) -> c.CheckoutItem:
    """A valid resolved `CheckoutItem` with a fresh event id; ``fields`` override any value."""
    now = c.utc_now()
    values: dict[str, Any] = {
        "event_id": c.new_id(),
        "store_id": store_id,
        "device_id": device_id,
        "camera_id": "till-1",
        "basket_id": "basket-1",
        "track_id": 1,
        "status": "resolved",
        "sku_id": "sku-a",
        "probability": 0.9,
        "candidates": [c.SkuCandidate(sku_id="sku-a", score=0.9)],
        "votes": 5,
        "first_seen": now - timedelta(seconds=2),
        "last_seen": now,
        "reason": None,
    }
    values.update(fields)
    return c.CheckoutItem(**values)


def item_ack(event_id: str, status: c.AckStatus = "stored") -> c.CheckoutAck:
    return c.CheckoutAck(
        event_id=event_id,
        status=status,
        reason="bad" if status == "rejected" else None,
        acked_at=c.utc_now(),
    )


def ack(crop_id: str, status: c.AckStatus = "stored") -> c.CropAck:
    return c.CropAck(
        crop_id=crop_id,
        status=status,
        reason="bad" if status == "rejected" else None,
        object_key="k" if status == "stored" else None,
        acked_at=c.utc_now(),
    )


def test_a_crop_stays_until_its_ack_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    crop = make_crop(STORE, DEV, priority=70)
    with Outbox(path) as box:
        assert box.put(crop).accepted
        box.mark_sent(crop.crop_id, retry_after_s=5)
    with Outbox(path) as box:
        assert box.contains(crop.crop_id) and box.attempts(crop.crop_id) == 1
        assert box.stats().depth == 1
        assert box.ack(ack(crop.crop_id))
        assert not box.ack(ack(crop.crop_id, "duplicate"))  # repeated ack: harmless
        assert box.stats().depth == 0 and box.stats().bytes == 0
    with Outbox(path) as box:
        counters = box.counters()
        assert counters["acked_stored"] == 1 and counters["acked_unknown"] == 1 and counters["accepted"] == 1


def test_due_orders_by_priority_then_age_and_respects_retry_time(tmp_path: Path) -> None:
    clock = FakeClock()
    with Outbox(tmp_path / "o.db", clock=clock) as box:
        low = make_crop(STORE, DEV, priority=10)
        high = make_crop(STORE, DEV, priority=90)
        high2 = make_crop(STORE, DEV, priority=90)
        for crop in (low, high, high2):
            box.put(crop)
            clock.now += 1
        assert [d.crop_id for d in box.due(10)] == [high.crop_id, high2.crop_id, low.crop_id]
        box.mark_sent(high.crop_id, retry_after_s=30)
        assert [d.crop_id for d in box.due(10)] == [high2.crop_id, low.crop_id]
        assert [d.crop_id for d in box.due(10, exclude={high2.crop_id})] == [low.crop_id]
        clock.now += 31
        assert box.due(1)[0].crop_id == high.crop_id
        box.mark_sent(high.crop_id, retry_after_s=1000)
        box.make_all_due()
        assert box.due(1)[0].crop_id == high.crop_id
        assert box.due(1)[0].payload == c.encode(high)  # the exact bytes every time: stable crop_id


def test_count_cap_drops_lowest_priority_then_oldest_and_counts(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "o.db"
    with Outbox(path, OutboxLimits(max_count=3), clock=clock) as box:
        old_low = make_crop(STORE, DEV, priority=10)
        new_low = make_crop(STORE, DEV, priority=10)
        mid = make_crop(STORE, DEV, priority=50)
        for crop in (old_low, new_low, mid):
            assert box.put(crop).accepted
            clock.now += 1
        result = box.put(make_crop(STORE, DEV, priority=80))
        assert result.accepted and result.dropped == (old_low.crop_id,)
        result = box.put(make_crop(STORE, DEV, priority=50))
        assert result.accepted and result.dropped == (new_low.crop_id,)
        # A newcomer that ranks below everything stored is the one refused.
        lowest = make_crop(STORE, DEV, priority=5)
        result = box.put(lowest)
        assert not result.accepted and result.reason == "full" and not box.contains(lowest.crop_id)
        assert box.stats().depth == 3 and box.stats().dropped == 3
    with Outbox(path, OutboxLimits(max_count=3)) as box:
        assert box.counters()["dropped_capacity"] == 3  # persisted across restarts


def test_byte_cap_drops_enough_crops_to_fit(tmp_path: Path) -> None:
    crops = [make_crop(STORE, DEV, priority=20) for _ in range(4)]
    size = len(c.encode(crops[0]))
    with Outbox(tmp_path / "o.db", OutboxLimits(max_bytes=int(size * 3.5))) as box:
        for crop in crops[:3]:
            assert box.put(crop).accepted
        result = box.put(crops[3])
        assert result.accepted and result.dropped == (crops[0].crop_id,)
        assert box.stats().bytes <= size * 3.5


def test_age_cap_expires_old_crops_and_counts_them(tmp_path: Path) -> None:
    clock = FakeClock()
    with Outbox(tmp_path / "o.db", OutboxLimits(max_age_s=60), clock=clock) as box:
        old = make_crop(STORE, DEV)
        box.put(old)
        clock.now += 61
        fresh = make_crop(STORE, DEV)
        assert box.put(fresh).accepted
        assert box.crop_ids() == [fresh.crop_id]
        assert box.counters()["dropped_expired"] == 1


def test_same_crop_twice_is_stored_once(tmp_path: Path) -> None:
    crop = make_crop(STORE, DEV)
    with Outbox(tmp_path / "o.db") as box:
        assert box.put(crop).accepted
        assert box.put(crop).reason == "duplicate"
        assert box.stats().depth == 1


def test_a_full_disk_refuses_the_crop_reports_a_fault_and_keeps_the_store_intact(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        kept = make_crop(STORE, DEV)
        assert box.put(kept).accepted
        pages = box._conn.execute("PRAGMA page_count").fetchone()[0]
        box._conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # what SQLITE_FULL looks like
        result = box.put(make_crop(STORE, DEV, jpeg=_big_jpeg()))
        assert not result.accepted and result.reason == "io_error"
        assert box.integrity_ok() and box.crop_ids() == [kept.crop_id]
        assert box.stats().depth == 1
        assert box.counters()["dropped_io_error"] == 1
        assert any("write failed" in f for f in box.take_faults())
        box._conn.execute("PRAGMA max_page_count = 1073741823")  # space is back: business as usual
        assert box.put(make_crop(STORE, DEV)).accepted


def test_a_corrupt_database_file_is_set_aside_with_a_fault(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with Outbox(path) as box:
        assert any("unreadable" in f for f in box.take_faults())
        assert box.put(make_crop(STORE, DEV)).accepted
    assert len(list(tmp_path.glob("o.db.corrupt-*"))) == 1


def _big_jpeg() -> bytes:
    from cloud_api.devsim import random_jpeg

    return random_jpeg(200, 200, quality=95)


# ---------------------------------------------------------------------------------------------------------
# Checkout items


def test_a_checkout_item_stays_until_its_own_ack_and_survives_reopening(tmp_path: Path) -> None:
    path, clock = tmp_path / "outbox.db", FakeClock()
    item = make_item()
    with Outbox(path, clock=clock) as box:
        assert box.put_item(item).accepted
        assert box.put_item(item).reason == "duplicate"
        box.mark_item_sent(item.event_id, retry_after_s=5)
    with Outbox(path, clock=clock) as box:  # as after a SIGKILL: it was on disk before any send
        assert box.items() == [item] and box.item_ids() == [item.event_id]
        assert box.due_items(10) == []  # sent, not acked, its retry not yet due ...
        box.make_all_due()  # ... until the uplink (re)connects
        assert [d.event_id for d in box.due_items(10)] == [item.event_id]
        stats = box.stats()
        assert (stats.depth, stats.items, stats.crops) == (1, 1, 0) and stats.bytes > 0
        assert not box.ack(ack(item.event_id))  # a crop ack never deletes an item, even with the same id
        assert box.item_ids() == [item.event_id]
        assert box.ack_item(item_ack(item.event_id))
        assert not box.ack_item(item_ack(item.event_id, "duplicate"))  # repeated ack: harmless
        assert box.stats().depth == 0 and box.stats().bytes == 0
    with Outbox(path) as box:
        counters = box.counters()
        assert counters["items_accepted"] == 1 and counters["items_acked_stored"] == 1
        assert counters["items_acked_unknown"] == 1 and counters["accepted"] == 0


def test_checkout_items_go_oldest_first_with_back_off_and_all_due_after_a_reconnect(tmp_path: Path) -> None:
    clock = FakeClock()
    with Outbox(tmp_path / "o.db", clock=clock) as box:
        items = [make_item(track_id=k) for k in range(3)]
        for item in items:
            box.put_item(item)
            clock.now += 1
        assert [d.event_id for d in box.due_items(10)] == [i.event_id for i in items]
        box.mark_item_sent(items[0].event_id, retry_after_s=30)
        assert [d.event_id for d in box.due_items(10)] == [items[1].event_id, items[2].event_id]
        assert [d.event_id for d in box.due_items(10, exclude={items[1].event_id})] == [items[2].event_id]
        clock.now += 31
        (first, *_) = box.due_items(1)
        assert first.event_id == items[0].event_id and first.attempts == 1
        assert first.payload == c.encode(items[0])  # the exact bytes every time: stable event_id
        for item in items:
            box.mark_item_sent(item.event_id, retry_after_s=1000)
        assert box.due_items(10) == []
        box.make_all_due()
        assert len(box.due_items(10)) == 3


def test_the_crop_drop_policy_never_touches_checkout_items(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", OutboxLimits(max_count=2, max_age_s=60)) as box:
        items = [make_item() for _ in range(5)]
        for item in items:
            assert box.put_item(item).accepted
        for priority in (10, 20, 30, 40):  # pushes crops out; the items stay
            assert box.put(make_crop(STORE, DEV, priority=priority)).accepted
        box.limits = OutboxLimits(max_count=2, max_age_s=0)  # and every crop is now too old
        assert box.expire() == 2
        assert box.item_ids() == [i.event_id for i in items]
        stats = box.stats()
        assert (stats.items, stats.crops) == (5, 0)
        assert box.counters()["items_dropped_capacity"] == 0


def test_checkout_items_have_their_own_bound_and_its_drops_reach_the_heartbeat_count(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, OutboxLimits(max_items=3)) as box:
        items = [make_item() for _ in range(5)]
        results = [box.put_item(item) for item in items]
        assert all(r.accepted for r in results)
        assert results[3].dropped == (items[0].event_id,) and results[4].dropped == (items[1].event_id,)
        assert box.item_ids() == [i.event_id for i in items[2:]]
        assert box.stats().dropped == 2 and box.stats().items == 3
    with Outbox(path, OutboxLimits(max_items=3)) as box:
        assert box.counters()["items_dropped_capacity"] == 2 and box.stats().dropped == 2


def test_a_full_disk_refuses_a_checkout_item_with_a_fault_and_a_count(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        kept = make_item()
        assert box.put_item(kept).accepted
        pages = box._conn.execute("PRAGMA page_count").fetchone()[0]
        box._conn.execute(f"PRAGMA max_page_count = {pages}")  # what SQLITE_FULL looks like
        results = []
        while len(results) < 50 and not any(r.reason == "io_error" for r in results):  # fill the last page
            results.append(box.put_item(make_item(status="unresolved", sku_id=None, reason="x" * 500)))
        assert results[-1].reason == "io_error" and results[-1].dropped
        assert box.integrity_ok() and kept.event_id in box.item_ids()
        assert box.stats().items == len(box.item_ids()) == len(results)  # the refused one is not counted in
        assert box.counters()["items_dropped_io_error"] == 1 and box.stats().dropped == 1
        assert any("checkout item" in f for f in box.take_faults())
        box._conn.execute("PRAGMA max_page_count = 1073741823")  # space is back: business as usual
        assert box.put_item(make_item()).accepted
