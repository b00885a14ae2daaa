"""The agent loop: sources that fail, the shelf and checkout pipelines, telemetry and a bounded soak run."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.agent import AgentCamera, EdgeAgent, Pipeline
from edge_agent.outbox import Outbox
from edge_agent.routing import RoutingPolicy, UncertaintyRouter
from edge_agent.sources import Frame, ImageFolderSource, SourceStats, VideoSource, open_source
from edge_agent.telemetry import ResourceMonitor
from edge_agent.tracking import IouTracker, TrackerConfig
from models.detections import Detections
from planograms.catalogue import CatalogueView
from planograms.compliance import synthetic_bay
from planograms.schema import Planogram
from shelfloop import contract as c

STORE, DEV = "store-1", "dev-1"


# ---------------------------------------------------------------------------------------------------------
# Fakes: models that return what the test says, a source that yields frames from memory


class FakeDetector:
    """Returns the boxes of the current scene; ``fail_on`` raises on chosen calls (a broken model)."""

    def __init__(self, scenes: list[np.ndarray], fail_on: set[int] | None = None) -> None:
        self.scenes, self.calls, self.fail_on = scenes, 0, fail_on or set()

    def __call__(self, image: np.ndarray) -> Detections:
        i = self.calls
        self.calls += 1
        if i in self.fail_on:
            raise RuntimeError("model exploded")
        boxes = self.scenes[min(i, len(self.scenes) - 1)]
        return Detections(boxes.astype(np.float32), np.full(len(boxes), 0.9, np.float32))


class FakeRecognizer:
    """Labels boxes by a function of (call, box index) -> (sku or None, probability, novelty)."""

    def __init__(self, label: Any) -> None:
        self.label, self.calls = label, 0

    def __call__(self, image: np.ndarray, det: Detections) -> Detections:
        n = len(det)
        labels = [self.label(self.calls, i) for i in range(n)]
        self.calls += 1
        rng = np.random.default_rng(self.calls)
        emb = rng.normal(size=(n, 8)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return Detections(
            det.xyxy,
            det.confidence,
            sku_id=np.array([lbl[0] for lbl in labels], dtype=object),
            sku_probability=np.array([lbl[1] for lbl in labels], np.float32),
            margin=np.array([0.5 if lbl[0] else 0.0 for lbl in labels], np.float32),
            novelty=np.array([lbl[2] for lbl in labels], np.float32),
            candidates=tuple(((lbl[0] or "sku-z", lbl[1]),) for lbl in labels),
            embedding=emb,
        )


class MemorySource:
    """Frames from memory; ``None`` entries are moments when the camera had nothing."""

    def __init__(self, camera_id: str, images: list[np.ndarray | None]) -> None:
        self.camera_id, self.images, self.stats, self._i = camera_id, images, SourceStats(), 0

    @property
    def exhausted(self) -> bool:
        return self._i >= len(self.images)

    def read(self) -> Frame | None:
        if self.exhausted:
            return None
        image = self.images[self._i]
        self._i += 1
        if image is None:
            return None
        self.stats.frames += 1
        return Frame(self.camera_id, self._i, image, c.utc_now() + timedelta(seconds=self._i), 0.1)

    def take_faults(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


def make_agent(outbox: Outbox, cameras: list[AgentCamera], pipeline: Pipeline, **kw: Any) -> EdgeAgent:
    published: list[Any] = []
    agent = EdgeAgent(
        store_id=STORE,
        device_id=DEV,
        cameras=cameras,
        pipeline=pipeline,
        outbox=outbox,
        router=kw.pop("router", UncertaintyRouter(RoutingPolicy(per_minute=1000, per_hour=10_000))),
        publish=lambda msg: published.append(msg) or True,
        **kw,
    )
    agent.published = published  # type: ignore[attr-defined]
    return agent


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_an_image_folder_skips_corrupt_frames_and_reports_them(tmp_path: Path) -> None:
    good = np.full((48, 64, 3), 120, np.uint8)
    for name in ("a.jpg", "c.png", "e.jpg"):
        cv2.imwrite(str(tmp_path / name), good)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 definitely not a picture")
    (tmp_path / "d.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:40])  # truncated upload
    source = open_source("cam-0", str(tmp_path))
    assert isinstance(source, ImageFolderSource)
    frames = [f for f in iter(source.read, None)]
    assert [f.image.shape for f in frames] == [(48, 64, 3)] * 3
    assert source.stats.corrupt == 2 and source.exhausted
    assert len(source.take_faults()) == 2


def test_a_live_camera_that_disappears_is_reopened_with_back_off() -> None:
    now = [0.0]
    frame = np.zeros((32, 32, 3), np.uint8)

    class FakeCap:
        def __init__(self, frames: int) -> None:
            self.left = frames

        def isOpened(self) -> bool:  # OpenCV's name
            return True

        def read(self) -> tuple[bool, np.ndarray | None]:
            self.left -= 1
            return (True, frame) if self.left >= 0 else (False, None)

        def grab(self) -> bool:
            self.left -= 1
            return self.left >= 0

        def release(self) -> None:
            pass

    plan: list[FakeCap | None] = [None, FakeCap(2), None, None, FakeCap(1)]
    source = VideoSource(
        "cam-1",
        "rtsp://user:secret@10.0.0.9/stream",
        live=True,
        opener=lambda _: plan.pop(0) if plan else None,
        clock=lambda: now[0],
    )
    got = 0
    for _ in range(200):
        got += source.read() is not None
        now[0] += 0.25
    assert got == 3 and not plan  # every scheduled reopen happened
    assert source.stats.reconnects >= 2 and source.stats.open_failures >= 3
    faults = source.take_faults()
    assert any("stream lost" in f for f in faults) and not any("secret" in f for f in faults)
    assert not source.exhausted  # a live camera is never "done"
    plan.append(FakeCap(3))
    now[0] += 60
    assert source.read() is not None  # reopened
    source.skip()  # a shelf camera between due frames: one buffered frame dropped undecoded
    assert source.read() is not None
    assert source.read() is None  # the fake stream had 3 frames: read, grabbed, read


def test_a_video_file_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip("OpenCV has no MJPG writer here")
    for i in range(5):
        writer.write(np.full((48, 64, 3), i * 40, np.uint8))
    writer.release()
    source = open_source("cam-2", str(path))
    frames = [f for f in iter(source.read, None)]
    assert len(frames) == 5 and source.exhausted
    missing = open_source("cam-3", str(tmp_path / "nope.avi"))
    assert missing.read() is None and missing.exhausted and missing.take_faults()


# ---------------------------------------------------------------------------------------------------------
# Shelf


def test_the_shelf_pipeline_sends_a_compliance_snapshot_for_its_bay(outbox: Outbox) -> None:
    bay, obs = synthetic_bay(n_facings=30, rows=3, seed=2)
    plan = Planogram(
        planogram_id="p1", version="v7", store_format="small", effective_from=c.utc_now().date(), bays=[bay]
    )
    w, h = obs.image_size
    image = np.full((int(h), int(w), 3), 200, np.uint8)
    skus = list(obs.sku_id)
    pipeline = Pipeline(
        FakeDetector([obs.xyxy]),
        FakeRecognizer(lambda _call, i: (skus[i], 0.95 if i else 0.3, 0.05)),  # box 0 uncertain
        "model-1",
        "gallery-1",
    )
    cam = AgentCamera("shelf-cam", "shelf", MemorySource("shelf-cam", [image, image]), bay.bay_id, 60.0)
    agent = make_agent(
        outbox, [cam], pipeline, planogram=plan, catalogue=CatalogueView(bay_skus(bay), {}, {})
    )
    assert agent.step() == 1
    assert agent.step() == 0  # the next frame is not due for 60 s
    (snapshot,) = [m for m in agent.published if isinstance(m, c.ComplianceSnapshot)]
    decoded = c.decode(c.encode(snapshot), expect=c.ComplianceSnapshot)
    assert decoded.bay_id == bay.bay_id and decoded.planogram_version == f"{plan.planogram_id}:v7"
    assert len(decoded.slots) == sum(len(r.slots) for r in bay.rows)
    assert decoded.compliance_pct > 80 and decoded.image_jpeg is not None
    assert outbox.stats().depth == 1  # the low-probability facing went to annotation
    (crop_id,) = outbox.crop_ids()
    crop = c.decode(outbox.due(1)[0].payload, expect=c.UncertainCrop)
    assert crop.crop_id == crop_id and crop.source == "shelf" and crop.bay_id == bay.bay_id


def bay_skus(bay: Any) -> list[str]:
    return [s.sku_id for r in bay.rows for s in r.slots]


# ---------------------------------------------------------------------------------------------------------
# Checkout


def test_checkout_bills_agreeing_tracks_and_leaves_unknowns_unresolved(outbox: Outbox) -> None:
    item_a = np.array([[10, 10, 60, 80]], np.float32)
    item_b = np.array([[200, 20, 260, 90]], np.float32)
    both = np.concatenate([item_a, item_b])
    none = np.zeros((0, 4), np.float32)
    scenes = [both] * 6 + [none] * 20

    def label(call: int, i: int) -> tuple[str | None, float, float]:
        return ("sku-cola", 0.9, 0.05) if i == 0 else (None, 0.2, 0.8)  # b: nothing we sell

    image = np.full((120, 320, 3), 90, np.uint8)
    cam = AgentCamera(
        "till-1",
        "checkout",
        MemorySource("till-1", [image] * len(scenes)),
        tracker=IouTracker(TrackerConfig(max_lost_frames=3)),
    )
    agent = make_agent(outbox, [cam], Pipeline(FakeDetector(scenes), FakeRecognizer(label), "m", "g"))
    while not agent.exhausted:
        agent.step()
    items = outbox.items()  # durable: the uplink sends them from here and deletes them on the cloud's ack
    assert len(items) == 2 and items == agent.checkout_items
    assert not any(isinstance(m, c.CheckoutItem) for m in agent.published)  # never sent best-effort
    resolved = [i for i in items if i.status == "resolved"]
    unresolved = [i for i in items if i.status == "unresolved"]
    assert [i.sku_id for i in resolved] == ["sku-cola"] and resolved[0].votes == 6
    assert unresolved[0].sku_id is None and unresolved[0].reason  # never billed as a guess
    assert len({i.basket_id for i in items}) == 1
    for item in items:
        c.encode(item)
    crops = [c.decode(d.payload, expect=c.UncertainCrop) for d in outbox.due(100)]
    assert crops and all(cr.source == "checkout" and cr.priority >= 50 for cr in crops)
    assert all("novelty" in cr.reasons for cr in crops)
    assert len(crops) == 1 and agent.router.deduplicated == 5  # one crop per item, not one per frame


def test_a_track_whose_frames_disagree_is_unresolved() -> None:
    tracker = IouTracker(TrackerConfig(min_votes=2, max_lost_frames=0))
    box = np.array([[0, 0, 50, 50]], np.float32)
    now = c.utc_now()
    for k, sku in enumerate(["sku-a", "sku-b", "sku-a", "sku-b"]):
        det = Detections(
            box,
            np.array([0.9], np.float32),
            sku_id=np.array([sku], dtype=object),
            sku_probability=np.array([0.9], np.float32),
            candidates=(((sku, 0.9),),),
        )
        det, finished = tracker.update(det, now + timedelta(seconds=k))
        assert det.tracker_id[0] == 1 and not finished
    (vote,) = tracker.flush()
    assert vote.status == "unresolved" and "disagree" in (vote.reason or "")


# ---------------------------------------------------------------------------------------------------------
# Robustness and telemetry


def test_a_failing_model_is_a_fault_and_the_loop_goes_on(outbox: Outbox) -> None:
    image = np.full((64, 64, 3), 50, np.uint8)
    scenes = [np.array([[5, 5, 30, 30]], np.float32)] * 6
    cam = AgentCamera("till-2", "checkout", MemorySource("till-2", [image] * 6), tracker=IouTracker())
    agent = make_agent(
        outbox,
        [cam],
        Pipeline(FakeDetector(scenes, fail_on={1, 3}), FakeRecognizer(lambda *_: ("s", 0.9, 0.0)), "m", "g"),
    )
    while not agent.exhausted:
        agent.step()
    assert agent.frames == 6 and agent.errors == 2
    beat = agent.heartbeat()
    assert sum("model exploded" in f for f in beat.faults) == 2


def test_the_heartbeat_reports_rates_stages_versions_outbox_and_resources(outbox: Outbox) -> None:
    image = np.full((64, 64, 3), 50, np.uint8)
    scenes = [np.array([[5, 5, 30, 30]], np.float32)]
    cam = AgentCamera("till-3", "checkout", MemorySource("till-3", [image] * 10), tracker=IouTracker())
    agent = make_agent(
        outbox,
        [cam],
        Pipeline(FakeDetector(scenes), FakeRecognizer(lambda *_: (None, 0.1, 0.9)), "m-3", "g-4"),
    )
    while not agent.exhausted:
        agent.step()
    beat = c.decode(c.encode(agent.send_heartbeat()), expect=c.Heartbeat)
    assert {"decode", "infer", "recognise", "track", "route"} <= set(beat.stage_latency)
    assert beat.stage_latency["infer"].count == 10 and beat.frames_per_s > 0
    assert (beat.model_version, beat.gallery_version) == ("m-3", "g-4")
    assert beat.outbox_depth == outbox.stats().depth >= 1
    assert beat.memory_mb and beat.memory_mb > 10 and beat.cpu_percent is not None
    assert any(isinstance(m, c.Heartbeat) for m in agent.published)


def test_run_stops_on_the_stop_event_and_flushes_open_items(outbox: Outbox) -> None:
    image = np.full((64, 64, 3), 50, np.uint8)
    scenes = [np.array([[5, 5, 30, 30]], np.float32)]

    class Endless(MemorySource):
        @property
        def exhausted(self) -> bool:
            return False

        def read(self) -> Frame | None:
            self.images.append(image)
            return super().read()

    cam = AgentCamera("till-4", "checkout", Endless("till-4", []), tracker=IouTracker())
    agent = make_agent(
        outbox, [cam], Pipeline(FakeDetector(scenes), FakeRecognizer(lambda *_: ("s", 0.9, 0.0)), "m", "g")
    )
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    agent.run(stop, heartbeat_s=0.2)
    timer.join()
    items = outbox.items()
    assert len(items) == 1 and items[0].status == "resolved"  # the item still on the counter was reported
    assert sum(isinstance(m, c.Heartbeat) for m in agent.published) >= 2


def test_a_bounded_soak_run_does_not_grow_memory_or_open_files(outbox: Outbox) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(8)]
    scenes = [np.array([[5 + k % 7, 5, 40 + k % 7, 60], [70, 10, 120, 80]], np.float32) for k in range(13)]

    class Looping(MemorySource):
        @property
        def exhausted(self) -> bool:
            return False

        def read(self) -> Frame | None:
            self.stats.frames += 1
            i = self.stats.frames
            return Frame(self.camera_id, i, images[i % len(images)], c.utc_now(), 0.1)

    def label(call: int, i: int) -> tuple[str | None, float, float]:
        return ("sku-a", 0.9, 0.0) if (call // 40) % 2 else (None, 0.2, 0.9)

    class Scenes(FakeDetector):
        def __call__(self, image: np.ndarray) -> Detections:
            self.calls += 1
            boxes = scenes[self.calls % len(scenes)] if (self.calls // 25) % 2 else scenes[0][:0]
            return Detections(boxes, np.full(len(boxes), 0.9, np.float32))

    router = UncertaintyRouter(RoutingPolicy(per_minute=50, per_hour=100, per_day=100))
    till = AgentCamera(
        "till-5", "checkout", Looping("till-5", []), tracker=IouTracker(TrackerConfig(max_lost_frames=2))
    )
    agent = make_agent(outbox, [till], Pipeline(Scenes([]), FakeRecognizer(label), "m", "g"), router=router)
    monitor = ResourceMonitor()

    def run(frames: int) -> None:
        for _ in range(frames):
            agent.step()
        agent.heartbeat()
        agent.published.clear()  # type: ignore[attr-defined]
        gc.collect()

    run(800)  # warm-up: caches, first allocations, the outbox file
    rss0, fds0 = monitor.memory_mb(), monitor.open_files()
    run(3000)
    rss1, fds1 = monitor.memory_mb(), monitor.open_files()
    assert agent.frames == 3800 and agent.errors == 0
    assert fds1 == fds0
    assert rss0 is not None and rss1 is not None and rss1 - rss0 < 15, (rss0, rss1)
    assert outbox.stats().crops <= 100  # the day quota bounds what one camera can send


def test_checkout_items_are_on_disk_before_any_send_and_wait_there_in_order(tmp_path: Path) -> None:
    image = np.full((64, 64, 3), 50, np.uint8)
    item = np.array([[5, 5, 30, 30]], np.float32)
    none = np.zeros((0, 4), np.float32)
    scenes = ([item] * 3 + [none] * 3) * 3
    published: list[Any] = []
    kicks: list[int] = []

    def publish(msg: Any) -> bool:
        published.append(msg)
        return False  # the broker is down the whole time

    cam = AgentCamera(
        "till-6",
        "checkout",
        MemorySource("till-6", [image] * len(scenes)),
        tracker=IouTracker(TrackerConfig(max_lost_frames=1)),
    )
    outbox = Outbox(tmp_path / "outbox.db")
    agent = EdgeAgent(
        store_id=STORE,
        device_id=DEV,
        cameras=[cam],
        pipeline=Pipeline(FakeDetector(scenes), FakeRecognizer(lambda *_: ("s", 0.9, 0.0)), "m", "g"),
        outbox=outbox,
        router=UncertaintyRouter(),  # confident, agreeing frames: no crops, only the items
        publish=publish,
        on_crop=lambda: kicks.append(outbox.stats().items),
    )
    while not agent.exhausted:
        agent.step()
    assert len(agent.checkout_items) == 3
    assert kicks == [1, 2, 3]  # the uplink is woken only once the item is on disk
    assert not any(isinstance(m, c.CheckoutItem) for m in published)
    beat = agent.heartbeat()
    assert beat.outbox_depth == 3 and beat.outbox_dropped == 0
    outbox.close()  # what a SIGKILL leaves: the database file
    with Outbox(tmp_path / "outbox.db") as reopened:
        assert reopened.items() == agent.checkout_items  # in order, each one waiting for the cloud's ack
        assert [d.event_id for d in reopened.due_items(10)] == [i.event_id for i in agent.checkout_items]


def test_outbox_drops_are_reported_in_the_heartbeat(tmp_path: Path) -> None:
    from edge_agent.outbox import OutboxLimits

    image = np.full((64, 64, 3), 50, np.uint8)
    scenes = [np.array([[5, 5, 30, 30], [35, 5, 60, 30]], np.float32)]
    with Outbox(tmp_path / "small.db", OutboxLimits(max_count=2)) as box:
        cam = AgentCamera("cam-s", "shelf", MemorySource("cam-s", [image] * 3), "bay-1", interval_s=0.0)
        agent = make_agent(
            box, [cam], Pipeline(FakeDetector(scenes), FakeRecognizer(lambda *_: (None, 0.1, 0.9)), "m", "g")
        )
        agent.router.policy = RoutingPolicy(per_minute=100, dedup_window_s=0)
        while not agent.exhausted:
            agent.step()
        beat = agent.heartbeat()
        assert beat.outbox_depth == 2 and beat.outbox_dropped == 4  # 6 accepted in turn, cap 2
