"""Uncertainty routing: reasons, priorities, quotas, de-duplication and the crop message it builds."""

from __future__ import annotations

import numpy as np

from edge_agent.routing import RoutedCrop, RoutingPolicy, UncertaintyRouter, build_crop
from models.detections import Detections
from shelfloop import contract as c


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dets(
    n: int = 1,
    *,
    conf: float = 0.9,
    prob: float = 0.95,
    margin: float = 0.5,
    novelty: float = 0.05,
    boxes: list[list[float]] | None = None,
    embedding: np.ndarray | None = None,
) -> Detections:
    xyxy = np.array(boxes or [[10 + 100 * i, 10, 90 + 100 * i, 150] for i in range(n)], np.float32)
    n = len(xyxy)
    if embedding is None:
        rng = np.random.default_rng(0)
        embedding = rng.normal(size=(n, 8)).astype(np.float32)
        embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    return Detections(
        xyxy=xyxy,
        confidence=np.full(n, conf, np.float32),
        sku_id=np.array(["sku-a"] * n, dtype=object),
        sku_probability=np.full(n, prob, np.float32),
        margin=np.full(n, margin, np.float32),
        novelty=np.full(n, novelty, np.float32),
        candidates=tuple((("sku-a", prob), ("sku-b", max(0.0, prob - margin))) for _ in range(n)),
        embedding=embedding,
    )


def test_confident_detections_are_not_routed() -> None:
    router = UncertaintyRouter()
    assert router.route("cam-0", "shelf", dets(3)) == []


def test_each_signal_gives_its_reason() -> None:
    router = UncertaintyRouter(RoutingPolicy())
    assert router.reasons(dets(conf=0.3), 0) == ["low_detector_confidence"]
    assert router.reasons(dets(margin=0.02), 0) == ["low_margin"]
    assert router.reasons(dets(prob=0.4), 0) == ["low_probability"]
    assert router.reasons(dets(novelty=0.6), 0) == ["novelty"]
    assert router.reasons(dets(), 0, track_agreement=0.4) == ["track_disagreement"]
    assert router.reasons(dets(), 0, track_agreement=0.9) == []


def test_checkout_outranks_shelf_and_novelty_outranks_low_margin() -> None:
    router = UncertaintyRouter()
    shelf_margin = router.priority("shelf", ["low_margin"])
    shelf_novel = router.priority("shelf", ["novelty"])
    shelf_everything = router.priority("shelf", list(c.UNCERTAINTY_REASONS))
    checkout_margin = router.priority("checkout", ["low_margin"])
    assert shelf_margin < shelf_novel <= shelf_everything < checkout_margin
    assert router.priority("checkout", ["novelty"]) > checkout_margin
    assert shelf_margin >= 0 and router.priority("checkout", list(c.UNCERTAINTY_REASONS)) <= 100


def test_quotas_per_minute_hour_and_day() -> None:
    clock = FakeClock()
    router = UncertaintyRouter(
        RoutingPolicy(per_minute=2, per_hour=3, per_day=4, dedup_window_s=0), clock=clock
    )
    frame = dets(5, margin=0.01)
    assert len(router.route("cam-0", "shelf", frame)) == 2  # minute quota
    clock.now += 61
    assert len(router.route("cam-0", "shelf", frame)) == 1  # hour quota
    clock.now += 3600
    assert len(router.route("cam-0", "shelf", frame)) == 1  # day quota: 4 in total
    clock.now += 3600
    assert router.route("cam-0", "shelf", frame) == []
    clock.now += 86_400
    assert len(router.route("cam-0", "shelf", frame)) == 2
    assert router.over_quota == 5 * 5 - 6


def test_quota_goes_to_the_highest_priority_first() -> None:
    router = UncertaintyRouter(RoutingPolicy(per_minute=1))
    frame = dets(2, margin=0.01)
    frame.novelty[1] = 0.9
    chosen = router.route("cam-0", "shelf", frame)
    assert [r.index for r in chosen] == [1] and "novelty" in chosen[0].reasons


def test_near_identical_crops_are_sent_once_and_counted() -> None:
    clock = FakeClock()
    router = UncertaintyRouter(RoutingPolicy(dedup_window_s=600), clock=clock)
    frame = dets(1, margin=0.01)
    assert len(router.route("cam-0", "shelf", frame)) == 1
    for _ in range(20):  # the static camera sees the same pack all day
        clock.now += 5
        jitter = dets(1, margin=0.01, boxes=[[12, 11, 91, 149]], embedding=frame.embedding * 1.0)
        assert router.route("cam-0", "shelf", jitter) == []
    assert router.deduplicated == 20 and router.routed == 1
    assert len(router.route("cam-1", "shelf", frame)) == 1  # another camera is another place
    moved = dets(1, margin=0.01, boxes=[[400, 10, 480, 150]], embedding=frame.embedding)
    assert len(router.route("cam-0", "shelf", moved)) == 1  # another place on the same shelf
    other = dets(1, margin=0.01, embedding=-frame.embedding)
    assert len(router.route("cam-0", "shelf", other)) == 1  # a different-looking product there
    clock.now += 601
    assert len(router.route("cam-0", "shelf", frame)) == 1  # window over: once more


def test_build_crop_makes_a_valid_contract_message() -> None:
    frame = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    d = dets(1, margin=0.01, boxes=[[600, 400, 700, 500]])  # runs off the frame: clipped
    d.tracker_id[0] = 7
    crop = build_crop(
        frame,
        d,
        RoutedCrop(0, ("low_margin",), 10),
        store_id="store-1",
        device_id="dev-1",
        camera_id="cam-0",
        source="checkout",
        model_version="m1",
        gallery_version="g1",
    )
    decoded = c.decode(c.encode(crop), expect=c.UncertainCrop)
    assert decoded.box.x2 <= 640 and decoded.box.y2 <= 480 and decoded.track_id == 7
    assert [x.sku_id for x in decoded.candidates] == ["sku-a", "sku-b"]
    assert c.jpeg_dimensions(decoded.jpeg)[0] > 0


def test_a_tracked_item_is_sent_once_however_many_frames_show_it() -> None:
    router = UncertaintyRouter()
    for k in range(5):
        frame = dets(1, novelty=0.9, embedding=np.eye(8, dtype=np.float32)[[k]])
        frame.tracker_id[0] = 3
        chosen = router.route("till", "checkout", frame)
        assert len(chosen) == (1 if k == 0 else 0)
    assert router.deduplicated == 4
