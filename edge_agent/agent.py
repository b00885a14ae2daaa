"""The agent loop: cameras -> models -> (compliance | tracking) -> routing -> outbox, plus heartbeats.

Checkout items and uncertain crops go to the durable outbox (the uplink sends them and deletes them on
the cloud's ack); compliance snapshots and heartbeats are published directly, best-effort.

Why one loop over all cameras: a store device has a handful of cameras and two to six cores; one loop
keeps the models loaded once, the timings honest and shutdown simple. Every camera is read without
blocking; a shelf camera is processed at its interval, a checkout camera on every frame. Anything that
goes wrong with one frame (a model error, a contract violation) is a counted fault, and the loop goes on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.routing import RoutingPolicy, UncertaintyRouter, build_crop
from edge_agent.shelf import observation_from_detections
from edge_agent.sources import Frame, FrameSource, open_source
from edge_agent.telemetry import ResourceMonitor, StageTimer
from edge_agent.tracking import CheckoutVote, IouTracker, TrackerConfig
from models.detections import Detections
from planograms.catalogue import CatalogueView
from planograms.compliance import BayCompliance, check_bay
from planograms.schema import Planogram
from shelfloop import contract

__all__ = [
    "AGENT_VERSION",
    "AgentCamera",
    "EdgeAgent",
    "Pipeline",
    "build_agent",
    "load_pipeline",
    "release_manager",
    "run_agent",
]

log = logging.getLogger("shelfloop.edge.agent")

AGENT_VERSION: Final = "0.1.0"
Publish = Callable[[contract.Heartbeat | contract.ComplianceSnapshot], bool]
"""Best-effort telemetry publish (`Uplink.publish_message`); checkout items never go this way."""
_STATUS_COLOURS: Final = {
    "correct": (60, 180, 75),
    "out_of_stock": (0, 0, 230),
    "missing_unverified": (160, 160, 160),
}


@dataclass
class Pipeline:
    """The models in use; replaced as a whole on an update, so a frame never mixes two versions."""

    detector: Any  # models.detector.ProductDetector or anything with __call__(image) -> Detections
    recognizer: Any | None  # models.recognizer.SkuRecognizer or __call__(image, detections) -> Detections
    model_version: str
    gallery_version: str


@dataclass
class AgentCamera:
    """One camera as the loop sees it: its settings and source, plus per-camera state."""

    camera_id: str
    role: contract.Source
    source: FrameSource
    bay_id: str | None = None
    interval_s: float = 5.0
    next_due: float = 0.0
    tracker: IouTracker | None = None
    basket_id: str = field(default_factory=contract.new_id)
    idle_frames: int = 0


class EdgeAgent:
    """Runs the pipelines for every camera; `step` does one round, `run` loops until told to stop."""

    def __init__(
        self,
        *,
        store_id: str,
        device_id: str,
        cameras: Sequence[AgentCamera],
        pipeline: Pipeline,
        outbox: Outbox,
        router: UncertaintyRouter,
        publish: Publish | None = None,
        on_crop: Callable[[], None] | None = None,  # something new in the outbox: wake the uplink
        planogram: Planogram | None = None,
        catalogue: CatalogueView | None = None,
        snapshot_max_side: int = 640,
        fault_sources: Sequence[Callable[[], list[str]]] = (),
        uplink_stats: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store_id, self.device_id = store_id, device_id
        self.cameras = list(cameras)
        self.pipeline = pipeline
        self.outbox = outbox
        self.router = router
        self.publish = publish
        self.on_crop = on_crop
        self.planogram = planogram
        self.catalogue = catalogue
        self.snapshot_max_side = snapshot_max_side
        self.timer = StageTimer()
        self.resources = ResourceMonitor()
        self._fault_sources = list(fault_sources)
        self._uplink_stats = uplink_stats
        self._clock = clock
        self._faults: list[str] = []
        self._started = clock()
        self._window_start = clock()
        self._window_frames = 0
        self.frames = 0
        self.errors = 0
        self.snapshots: list[contract.ComplianceSnapshot] = []  # last few, for tests and the local API
        self.checkout_items: list[contract.CheckoutItem] = []
        self.recent_frames: deque[np.ndarray] = deque(maxlen=5)  # the canary set for release updates
        self._lock = threading.Lock()
        self._previous: Pipeline | None = None
        self._probation = 0
        self._probation_errors = 0
        self._max_probation_errors = 3
        self.on_rollback: Callable[[Pipeline, str], None] | None = None

    # -- loop -----------------------------------------------------------------------------------------

    def step(self) -> int:
        """Read each camera once and process what is due; returns the frames processed."""
        done = 0
        now = self._clock()
        for cam in self.cameras:
            if cam.role == "shelf" and now < cam.next_due:
                skip = getattr(cam.source, "skip", None)
                if skip is not None:
                    try:
                        skip()  # keep a live camera's buffer fresh between due frames
                    except Exception as exc:
                        self.fault(f"camera {cam.camera_id}: grab failed: {exc}")
                continue
            try:
                frame = self._read(cam)
            except Exception as exc:  # a broken driver must not take the other cameras down
                self.fault(f"camera {cam.camera_id}: read failed: {exc}")
                continue
            if frame is None:
                if cam.role == "checkout" and cam.tracker is not None:
                    cam.idle_frames += 1
                continue
            if cam.role == "shelf":
                cam.next_due = now + cam.interval_s
            try:
                if cam.role == "shelf":
                    self.process_shelf(cam, frame)
                else:
                    self.process_checkout(cam, frame)
            except Exception as exc:
                self.errors += 1
                log.exception("camera %s: frame %d failed", cam.camera_id, frame.index)
                self.fault(f"camera {cam.camera_id}: frame failed: {type(exc).__name__}: {exc}")
                self._probation_error(exc)
            else:
                if len(self.recent_frames) < self.recent_frames.maxlen or frame.index % 50 == 0:
                    self.recent_frames.append(frame.image)
            if self._probation:
                self._probation -= 1
                if not self._probation:
                    self._previous = None  # the new pipeline has proven itself
            done += 1
            self.frames += 1
            self._window_frames += 1
        return done

    def swap_pipeline(self, pipeline: Pipeline, probation_frames: int = 30) -> None:
        """Install new models between two frames; errors in the next frames bring the old ones back."""
        with self._lock:
            self._previous, self.pipeline = self.pipeline, pipeline
            self._probation, self._probation_errors = probation_frames, 0
        log.info(
            "pipeline swapped in: model %s, gallery %s", pipeline.model_version, pipeline.gallery_version
        )

    def _probation_error(self, exc: Exception) -> None:
        if not self._probation or self._previous is None:
            return
        self._probation_errors += 1
        if self._probation_errors < self._max_probation_errors:
            return
        failed, why = self.pipeline, f"{self._probation_errors} failed frames after the swap ({exc})"
        with self._lock:
            self.pipeline, self._previous, self._probation = self._previous, None, 0
        self.fault(f"rolled back model {failed.model_version} / gallery {failed.gallery_version}: {why}")
        if self.on_rollback is not None:
            self.on_rollback(failed, why)

    @property
    def exhausted(self) -> bool:
        return all(cam.source.exhausted for cam in self.cameras)

    def run(
        self,
        stop: threading.Event,
        *,
        heartbeat_s: float = 30.0,
        idle_sleep_s: float = 0.01,
        stop_when_exhausted: bool = False,
    ) -> None:
        """Loop until ``stop`` is set (SIGTERM), or every finite source is done if asked; heartbeats."""
        next_heartbeat = self._clock() + heartbeat_s
        while not stop.is_set():
            processed = self.step()
            if self._clock() >= next_heartbeat:
                self.send_heartbeat()
                next_heartbeat = self._clock() + heartbeat_s
            if stop_when_exhausted and self.exhausted:
                break
            if not processed:
                stop.wait(idle_sleep_s)
        self.flush()
        self.send_heartbeat()

    def flush(self) -> None:
        """Close open checkout tracks so every item on the counter is reported (at shutdown)."""
        for cam in self.cameras:
            if cam.tracker is not None:
                for vote in cam.tracker.flush():
                    self._emit_item(cam, vote)

    def _read(self, cam: AgentCamera) -> Frame | None:
        frame = cam.source.read()
        if frame is not None:
            self.timer.add("decode", frame.decode_ms)
        return frame

    # -- models ---------------------------------------------------------------------------------------

    def detect_and_recognise(
        self, image: np.ndarray, pipeline: Pipeline, *, timed: bool = True
    ) -> Detections:
        """Detector then recognizer, each stage timed (pre / infer / post when the detector exposes them)."""
        if not timed:  # a canary run on the update thread: keep the frame timings clean
            det = pipeline.detector(image)
            return pipeline.recognizer(image, det) if pipeline.recognizer is not None and len(det) else det
        det_model = pipeline.detector
        if all(hasattr(det_model, a) for a in ("preprocess", "backend", "postprocess")):
            with self.timer.time("pre"):
                blob, lb = det_model.preprocess(image)
            with self.timer.time("infer"):
                (output,) = det_model.backend.infer(blob)[:1]
            with self.timer.time("post"):
                det = det_model.postprocess(output, lb, image.shape)
        else:
            with self.timer.time("infer"):
                det = det_model(image)
        if pipeline.recognizer is not None and len(det):
            with self.timer.time("recognise"):
                det = pipeline.recognizer(image, det)
        return det

    def _route(
        self,
        cam: AgentCamera,
        frame: Frame,
        det: Detections,
        pipeline: Pipeline,
        agreement: Sequence[float | None] | None = None,
    ) -> None:
        with self.timer.time("route"):
            routed = self.router.route(cam.camera_id, cam.role, det, track_agreement=agreement)
            for r in routed:
                crop = build_crop(
                    frame.image,
                    det,
                    r,
                    store_id=self.store_id,
                    device_id=self.device_id,
                    camera_id=cam.camera_id,
                    source=cam.role,
                    model_version=pipeline.model_version,
                    gallery_version=pipeline.gallery_version,
                    captured_at=frame.captured_at,
                    bay_id=cam.bay_id,
                )
                self.outbox.put(crop)
        if routed and self.on_crop is not None:
            self.on_crop()

    # -- shelf ----------------------------------------------------------------------------------------

    def process_shelf(self, cam: AgentCamera, frame: Frame) -> contract.ComplianceSnapshot | None:
        pipeline = self.pipeline
        det = self.detect_and_recognise(frame.image, pipeline)
        self._route(cam, frame, det, pipeline)
        if self.planogram is None or cam.bay_id is None:
            return None
        with self.timer.time("compliance"):
            bay = self.planogram.bay(cam.bay_id)
            result = check_bay(
                observation_from_detections(det, frame.image.shape),
                bay,
                known_skus=self.catalogue.known_skus if self.catalogue else None,
                variants=self.catalogue.variants if self.catalogue else None,
                catalogue=self.catalogue.info if self.catalogue else None,
                other_bays=[b for b in self.planogram.bays if b.bay_id != bay.bay_id],
            )
            snapshot = self._snapshot(cam, frame, result, pipeline)
        self.snapshots = [*self.snapshots[-7:], snapshot]
        if self.publish is not None:
            self.publish(snapshot)
        return snapshot

    def _snapshot(
        self, cam: AgentCamera, frame: Frame, result: BayCompliance, pipeline: Pipeline
    ) -> contract.ComplianceSnapshot:
        h, w = frame.image.shape[:2]
        slots = [
            contract.SlotResult(
                shelf_row=s.shelf_row,
                slot_index=s.slot_index,
                planned_sku=s.planned_sku,
                status=s.status,  # type: ignore[arg-type]
                facings_planned=s.facings_planned,
                facings_found=s.facings_found,
                found_sku=s.found_sku,
                boxes=[b for b in (_bbox(box, w, h) for box in s.boxes) if b is not None],
            )
            for s in result.slots
        ]
        unplanned = []
        for u in result.unplanned:
            box = _bbox(u.box, w, h)
            if box is not None:
                unplanned.append(
                    contract.UnplannedDetection(
                        status=u.status,  # type: ignore[arg-type]
                        sku_id=u.sku_id if u.status == "extra_unplanned" else None,
                        box=box,
                        score=float(np.clip(u.score, 0, 1)),
                    )
                )
        m = result.metrics
        compliance = m.compliance if m.compliance is not None else (m.compliance_verified or 0.0)
        availability = m.on_shelf_availability if m.on_shelf_availability is not None else 0.0
        # planogram id and version together: several planograms share version numbers
        plan_version = f"{self.planogram.planogram_id}:{self.planogram.version}" if self.planogram else "none"
        return contract.ComplianceSnapshot(
            snapshot_id=contract.new_id(),
            store_id=self.store_id,
            device_id=self.device_id,
            camera_id=cam.camera_id,
            bay_id=result.bay_id,
            planogram_version=plan_version,
            captured_at=frame.captured_at,
            model_version=pipeline.model_version,
            gallery_version=pipeline.gallery_version,
            slots=slots,
            unplanned=unplanned,
            compliance_pct=float(np.clip(compliance * 100, 0, 100)),
            availability_pct=float(np.clip(availability * 100, 0, 100)),
            image_jpeg=self._annotated_jpeg(frame.image, slots, unplanned),
        )

    def _annotated_jpeg(
        self,
        image: np.ndarray,
        slots: list[contract.SlotResult],
        unplanned: list[contract.UnplannedDetection],
    ) -> bytes | None:
        """A small picture for the store manager: boxes coloured by slot status, unplanned in orange."""
        import cv2

        scale = min(1.0, self.snapshot_max_side / max(image.shape[:2]))
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        boxes = [(b, _STATUS_COLOURS.get(s.status, (0, 200, 255))) for s in slots for b in s.boxes]
        boxes += [(u.box, (0, 140, 255)) for u in unplanned]
        for box, colour in boxes:
            p1 = (int(box.x1 * scale), int(box.y1 * scale))
            p2 = (int(box.x2 * scale), int(box.y2 * scale))
            cv2.rectangle(small, p1, p2, colour, 2)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 70])
        return buf.tobytes() if ok and len(buf) <= contract.MAX_JPEG_BYTES else None

    # -- checkout -------------------------------------------------------------------------------------

    def process_checkout(self, cam: AgentCamera, frame: Frame) -> list[contract.CheckoutItem]:
        pipeline = self.pipeline
        det = self.detect_and_recognise(frame.image, pipeline)
        if cam.tracker is None:
            cam.tracker = IouTracker()
        with self.timer.time("track"):
            det, finished = cam.tracker.update(det, frame.captured_at)
            agreement = cam.tracker.agreement(det)
        self._route(cam, frame, det, pipeline, agreement)
        items = [self._emit_item(cam, vote) for vote in finished]
        if not cam.tracker.tracks and finished:
            cam.basket_id = contract.new_id()  # the counter is clear: the next item is another basket
        return items

    def _emit_item(self, cam: AgentCamera, vote: CheckoutVote) -> contract.CheckoutItem:
        track = vote.track
        candidates = [contract.SkuCandidate(sku_id=s, score=p) for s, p in vote.candidates]
        item = contract.CheckoutItem(
            event_id=contract.new_id(),
            store_id=self.store_id,
            device_id=self.device_id,
            camera_id=cam.camera_id,
            basket_id=cam.basket_id,
            track_id=track.track_id,
            status=vote.status,
            sku_id=vote.sku_id,
            probability=vote.probability,
            candidates=candidates,
            votes=track.frames,
            first_seen=track.first_seen,
            last_seen=track.last_seen,
            reason=vote.reason,
        )
        if vote.status == "unresolved":
            log.info("checkout %s: item %d unresolved (%s)", cam.camera_id, track.track_id, vote.reason)
        self.checkout_items = [*self.checkout_items[-63:], item]
        self._store_item(item)
        return item

    def _store_item(self, item: contract.CheckoutItem) -> None:
        """Write a checkout item to the durable outbox before anything is sent, then wake the uplink.

        The uplink publishes it and only the cloud's `CheckoutAck` deletes it, so a SIGKILL, a restart
        or a broker outage loses nothing; a refusal (disk error) is already a counted drop and a fault.
        """
        try:
            result = self.outbox.put_item(item)
        except contract.ContractError as exc:  # a bug, not an outage: report it, keep the loop (and flush)
            self.fault(f"checkout item {item.event_id} not stored: {exc}")
            return
        if result.accepted and self.on_crop is not None:
            self.on_crop()

    # -- telemetry ------------------------------------------------------------------------------------

    def fault(self, text: str) -> None:
        with self._lock:
            self._faults.append(text[:256])
            del self._faults[:-64]

    def heartbeat(self) -> contract.Heartbeat:
        """Device health since the last heartbeat; per-stage windows restart after each one."""
        now = self._clock()
        elapsed = max(1e-6, now - self._window_start)
        fps = self._window_frames / elapsed
        self._window_start, self._window_frames = now, 0
        faults: list[str] = []
        with self._lock:
            faults, self._faults = self._faults, []
        for cam in self.cameras:
            faults += cam.source.take_faults()
        faults += self.outbox.take_faults()
        for source in self._fault_sources:
            faults += source()
        stats = self.outbox.stats()
        uplink = self._uplink_stats() if self._uplink_stats is not None else None
        pipeline = self.pipeline
        beat = contract.Heartbeat(
            store_id=self.store_id,
            device_id=self.device_id,
            sent_at=contract.utc_now(),
            agent_version=AGENT_VERSION,
            uptime_s=max(0.0, now - self._started),
            frames_per_s=fps,
            stage_latency=self.timer.stats(),
            model_version=pipeline.model_version,
            gallery_version=pipeline.gallery_version,
            outbox_depth=stats.depth,
            outbox_bytes=stats.bytes,
            outbox_dropped=stats.dropped,
            crops_sent=uplink.published if uplink is not None else 0,
            crops_deduplicated=self.router.deduplicated,
            cpu_percent=self.resources.cpu_percent(),
            memory_mb=self.resources.memory_mb(),
            gpu_percent=self.resources.gpu_percent(),
            temperature_c=self.resources.temperature_c(),
            faults=[f[:256] for f in faults[-64:]],
        )
        self.timer.reset()
        return beat

    def send_heartbeat(self) -> contract.Heartbeat:
        """Publish a heartbeat best-effort: it is telemetry, the latest wins, so it is never stored."""
        beat = self.heartbeat()
        log.info(
            "heartbeat: %.1f frames/s, outbox %d (%d dropped), %d faults",
            beat.frames_per_s,
            beat.outbox_depth,
            beat.outbox_dropped,
            len(beat.faults),
        )
        if self.publish is not None:
            self.publish(beat)
        return beat


def _bbox(box: Sequence[float], w: int, h: int) -> contract.BoundingBox | None:
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), float(w)), min(max(x2, 0.0), float(w))
    y1, y2 = min(max(y1, 0.0), float(h)), min(max(y2, 0.0), float(h))
    if x2 <= x1 or y2 <= y1:
        return None
    return contract.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)


# --------------------------------------------------------------------------------------------------------
# Wiring from settings
# --------------------------------------------------------------------------------------------------------


def routing_policy(settings: Any) -> RoutingPolicy:
    r = settings.edge.routing
    return RoutingPolicy(
        detector_band=tuple(r.detector_band),
        min_margin=r.min_margin,
        min_probability=r.min_probability,
        novelty_threshold=r.novelty_threshold,
        min_track_agreement=r.min_track_agreement,
        audit_rate=r.audit_rate,
        per_minute=r.per_minute,
        per_hour=r.per_hour,
        per_day=r.per_day,
        dedup_similarity=r.dedup_similarity,
        dedup_iou=r.dedup_iou,
        dedup_window_s=r.dedup_window_s,
    )


def load_pipeline(settings: Any) -> Pipeline:
    """Verified model bundle and gallery from the settings (the shipped baseline by default)."""
    from edge_agent.updates import read_active
    from models.loader import (
        BASELINE_GALLERY,
        BASELINE_MODEL,
        default_trusted_keys,
        load_gallery,
        load_model_bundle,
    )

    edge = settings.edge
    keys = default_trusted_keys(list(edge.trusted_keys))
    active = read_active(Path(edge.data_dir))
    model_path = Path(active.model_path) if active.model_path else edge.model_bundle or BASELINE_MODEL
    gallery_path = Path(active.gallery_path) if active.gallery_path else edge.gallery or BASELINE_GALLERY
    try:
        bundle = load_model_bundle(model_path, keys, backend=edge.backend, precision=edge.precision)
        gallery = load_gallery(gallery_path, keys, embedder=bundle.embedder)
    except Exception:
        if not (active.model_path or active.gallery_path):
            raise
        log.exception("the last activated release does not load; falling back to the configured models")
        bundle = load_model_bundle(
            edge.model_bundle or BASELINE_MODEL, keys, backend=edge.backend, precision=edge.precision
        )
        gallery = load_gallery(edge.gallery or BASELINE_GALLERY, keys, embedder=bundle.embedder)
    return Pipeline(bundle.detector, bundle.recognizer(gallery), bundle.version, gallery.version)


def release_manager(settings: Any, agent: EdgeAgent) -> Any:
    """The update path wired to this agent: verified loads, canary on its recent frames, atomic swap."""
    from edge_agent.updates import ReleaseManager
    from models.loader import default_trusted_keys, load_gallery, load_model_bundle
    from models.recognizer import SkuRecognizer

    edge = settings.edge
    keys = default_trusted_keys(list(edge.trusted_keys))
    manager = ReleaseManager(
        data_dir=Path(edge.data_dir),
        current=lambda: agent.pipeline,
        swap=agent.swap_pipeline,
        load_model=lambda path: load_model_bundle(path, keys, backend=edge.backend, precision=edge.precision),
        load_gallery=lambda path, embedder: load_gallery(path, keys, embedder=embedder),
        make_pipeline=lambda bundle, gallery: Pipeline(
            bundle.detector, SkuRecognizer(bundle.embedder, gallery), bundle.version, gallery.version
        ),
        canary_frames=lambda: list(agent.recent_frames),
        run_pipeline=lambda pipeline, image: agent.detect_and_recognise(image, pipeline, timed=False),
        report=agent.fault,
        trusted_keys=keys,
    )
    agent.on_rollback = lambda failed, why: manager.rolled_back(
        failed.model_version, failed.gallery_version, why
    )
    return manager


def build_agent(
    settings: Any, *, pipeline: Pipeline | None = None, loop_sources: bool = False
) -> tuple[EdgeAgent, Outbox, Any]:
    """The agent, its outbox and its uplink (not started) from settings."""
    from edge_agent.uplink import Uplink, UplinkConfig
    from planograms import schema

    edge, mqtt = settings.edge, settings.mqtt
    data_dir = Path(edge.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    o = edge.outbox
    outbox = Outbox(data_dir / "outbox.db", OutboxLimits(o.max_bytes, o.max_count, o.max_age_s))
    u = edge.uplink
    uplink = Uplink(
        UplinkConfig(
            store_id=edge.store_id,
            device_id=edge.device_id,
            host=mqtt.host,
            port=mqtt.port,
            username=mqtt.username,
            password=mqtt.password.get_secret_value() if mqtt.password else None,
            tls=mqtt.tls,
            keepalive_s=mqtt.keepalive_s,
            session_expiry_s=u.session_expiry_s,
            max_inflight=u.max_inflight,
            ack_timeout_s=u.ack_timeout_s,
            max_backoff_s=u.max_backoff_s,
        ),
        outbox,
    )
    pipeline = pipeline or load_pipeline(settings)
    catalogue = CatalogueView.load(edge.catalogue) if edge.catalogue else None
    planogram = (
        schema.load(edge.planogram, catalogue.known_skus if catalogue else None) if edge.planogram else None
    )
    c = edge.checkout
    tracker_config = TrackerConfig(
        iou_threshold=c.iou_threshold,
        max_lost_frames=c.max_lost_frames,
        min_votes=c.min_votes,
        min_agreement=c.min_agreement,
        min_probability=c.min_probability,
    )
    cameras = [
        AgentCamera(
            camera_id=cam.camera_id,
            role=cam.role,
            source=open_source(cam.camera_id, cam.source, loop=loop_sources),
            bay_id=cam.bay_id,
            interval_s=cam.interval_s,
            tracker=IouTracker(tracker_config) if cam.role == "checkout" else None,
        )
        for cam in edge.cameras
    ]
    agent = EdgeAgent(
        store_id=edge.store_id,
        device_id=edge.device_id,
        cameras=cameras,
        pipeline=pipeline,
        outbox=outbox,
        router=UncertaintyRouter(routing_policy(settings)),
        publish=uplink.publish_message,
        on_crop=uplink.kick,
        planogram=planogram,
        catalogue=catalogue,
        snapshot_max_side=edge.snapshot_max_side,
        fault_sources=[uplink.take_faults],
        uplink_stats=uplink.stats,
    )
    return agent, outbox, uplink


def run_agent(settings: Any, *, pipeline: Pipeline | None = None, stop: threading.Event | None = None) -> int:
    """``shelfloop edge run``: until SIGTERM/SIGINT, then flush open items, drain briefly and exit 0."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    agent, outbox, uplink = build_agent(settings, pipeline=pipeline)
    updates = release_manager(settings, agent)
    uplink.on_release = updates.on_pointer
    updates.start()
    uplink.start()
    log.info("edge agent %s started: %d cameras", AGENT_VERSION, len(agent.cameras))
    try:
        agent.run(stop, heartbeat_s=settings.edge.heartbeat_s)
    finally:
        updates.stop()
        drained = uplink.stop(drain_timeout_s=settings.edge.uplink.drain_on_stop_s)
        kept = outbox.stats()
        for cam in agent.cameras:
            cam.source.close()
        outbox.close()
        log.info(
            "edge agent stopped (outbox %s, %d crops and %d checkout items kept for the next start)",
            "drained" if drained else "not drained",
            kept.crops,
            kept.items,
        )
    return 0
