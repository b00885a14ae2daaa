"""`shelfloop bench edge`: frames/s and per-stage latency of the shelf and checkout pipelines as the agent
runs them, and how much of each frame is spent outside the models' forward passes.

Why these figures: published Jetson measurements show Python pre/post-processing tripling the latency of
nano detectors; our target is that everything but the forward pass takes at most 25 % of frame time.
``overhead_fraction`` = (frame time - detector and recognizer forward time) / frame time, measured on the
real agent code (decode, letterbox, NMS, crops, gallery search, tracking, routing, compliance, outbox).

The baseline, Ultralytics ``predict`` on the same ONNX and frames, is passed in by the caller
(`retrain.bench.ultralytics_detector_latency`, run in a separate interpreter) so no edge module carries
Ultralytics (AGPL-3.0) or torch code; without it the comparison is reported as skipped, never guessed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.agent import AgentCamera, EdgeAgent, Pipeline
from edge_agent.outbox import Outbox
from edge_agent.routing import RoutingPolicy, UncertaintyRouter
from edge_agent.sources import Frame, SourceStats
from edge_agent.tracking import IouTracker
from planograms.schema import Planogram
from shelfloop import contract

__all__ = ["run"]

# Runs in its own interpreter: Ultralytics' predict (letterbox, ONNX Runtime, NMS) on the same ONNX file.


class _TimedBackend:
    """Wraps a backend to add up the time spent in its forward pass (the recognizer's share)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.ms = 0.0

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._backend.infer(*args, **kwargs)
        finally:
            self.ms += (time.perf_counter() - start) * 1000

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class _Replay:
    """A source that is never read by the loop: the bench hands frames to the pipelines itself."""

    def __init__(self, camera_id: str) -> None:
        self.camera_id, self.stats, self.exhausted = camera_id, SourceStats(), True

    def read(self) -> None:
        return None

    def take_faults(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def _pct(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, np.float64)
    if not len(arr):
        return {"p50_ms": 0.0, "p95_ms": 0.0}
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p95_ms": round(float(np.percentile(arr, 95)), 3),
    }


def _detector_only(pipeline: Pipeline, paths: Sequence[Path], repeats: int) -> list[float]:
    """End-to-end detector time (letterbox, forward, decode, NMS) per frame, nothing else in between."""
    images = [cv2.imread(str(p)) for p in paths]
    for image in images[:3]:
        pipeline.detector(image)
    ms = []
    for _ in range(repeats):
        for image in images:
            t = time.perf_counter()
            pipeline.detector(image)
            ms.append((time.perf_counter() - t) * 1e3)
    return ms


def _bench_role(
    role: contract.Source,
    pipeline: Pipeline,
    jpegs: Sequence[bytes],
    repeats: int,
    *,
    planogram: Planogram | None,
    bay_ids: Sequence[str | None],
    work: Path,
) -> dict[str, Any]:
    timed = _TimedBackend(pipeline.recognizer.embedder.backend) if pipeline.recognizer is not None else None
    if timed is not None:
        pipeline.recognizer.embedder.backend = timed
    outbox = Outbox(work / f"{role}-outbox.db")
    router = UncertaintyRouter(RoutingPolicy(per_minute=10**6, per_hour=10**6, per_day=10**6))
    cam = AgentCamera(
        f"bench-{role}", role, _Replay(f"bench-{role}"), tracker=IouTracker() if role == "checkout" else None
    )  # type: ignore[arg-type]
    agent = EdgeAgent(
        store_id="bench",
        device_id="bench",
        cameras=[cam],
        pipeline=pipeline,
        outbox=outbox,
        router=router,
        planogram=planogram,
    )
    frame_ms: list[float] = []
    forward_ms: list[float] = []
    detector_ms: list[float] = []
    try:
        for rep in range(repeats + 1):  # the first pass warms caches and is not counted
            if rep == 1:
                agent.timer.reset()
            for i, data in enumerate(jpegs):
                cam.bay_id = bay_ids[i] if role == "shelf" else None
                rec_before = timed.ms if timed is not None else 0.0
                start = time.perf_counter()
                t0 = time.perf_counter()
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                agent.timer.add("decode", (time.perf_counter() - t0) * 1000)
                frame = Frame(cam.camera_id, i, image, contract.utc_now(), 0.0)
                if role == "shelf":
                    agent.process_shelf(cam, frame)
                else:
                    agent.process_checkout(cam, frame)
                total = (time.perf_counter() - start) * 1000
                if rep:
                    timer = agent.timer
                    infer = timer.last("infer")
                    frame_ms.append(total)
                    forward_ms.append(infer + ((timed.ms - rec_before) if timed is not None else 0.0))
                    detector_ms.append(timer.last("pre") + infer + timer.last("post"))
        stages = {}
        for name in agent.timer.stages():
            p50, p95, n = agent.timer.percentiles(name)
            stages[name] = {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "count": n}
    finally:
        outbox.close()
        if timed is not None:
            pipeline.recognizer.embedder.backend = timed._backend
    total_ms, fwd_ms = float(np.sum(frame_ms)), float(np.sum(forward_ms))
    return {
        "frames": len(frame_ms),
        "frames_per_s": round(1000.0 * len(frame_ms) / total_ms, 2) if total_ms else 0.0,
        "frame": _pct(frame_ms),
        "forward": _pct(forward_ms),
        "detector_end_to_end": _pct(detector_ms),
        "stages": stages,
        "overhead_fraction": round((total_ms - fwd_ms) / total_ms, 4) if total_ms else None,
        "_totals": (total_ms, fwd_ms, detector_ms),
    }


def _no_baseline(*_args: Any) -> dict[str, Any]:
    return {"skipped": "no Ultralytics baseline given (it lives in retrain/, the train extra)"}


def run(
    pipeline: Pipeline,
    shelf_images: Sequence[Path],
    checkout_images: Sequence[Path],
    *,
    repeats: int = 3,
    planogram: Planogram | None = None,
    shelf_bays: Sequence[str | None] | None = None,
    detector_onnx: Path | None = None,
    compare_ultralytics: bool = True,
    baseline: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Figures for both pipelines and the overall overhead; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        work = Path(tmp)
        out: dict[str, Any] = {
            "model_version": pipeline.model_version,
            "gallery_version": pipeline.gallery_version,
        }
        totals = [0.0, 0.0]
        detector_all: list[float] = []
        for role, paths in (("shelf", shelf_images), ("checkout", checkout_images)):
            if not paths:
                continue
            jpegs = [Path(p).read_bytes() for p in paths]
            bays = list(shelf_bays or [None] * len(paths))
            result = _bench_role(
                role,  # type: ignore[arg-type]
                pipeline,
                jpegs,
                repeats,
                planogram=planogram if role == "shelf" else None,
                bay_ids=bays,
                work=work,
            )
            total_ms, fwd_ms, det_ms = result.pop("_totals")
            totals[0] += total_ms
            totals[1] += fwd_ms
            detector_all += det_ms
            out[role] = result
        out["overhead_fraction"] = round((totals[0] - totals[1]) / totals[0], 4) if totals[0] else None
        out["edge_detector_in_pipeline"] = _pct(detector_all)
        # The same loop Ultralytics gets: the detector alone on decoded frames, so caches and threads are
        # not shared with the recognizer between calls and the comparison is like for like.
        out["edge_detector"] = _pct(_detector_only(pipeline, [*shelf_images, *checkout_images], repeats))
        out["speedup_vs_ultralytics"] = None
        if compare_ultralytics and detector_onnx is not None:
            size = int(getattr(pipeline.detector, "input_size", (640, 640))[0])
            ultra = (baseline or _no_baseline)(
                detector_onnx, [*shelf_images, *checkout_images], size, repeats, work
            )
            out["ultralytics"] = ultra
            if "detector" in ultra and out["edge_detector"]["p50_ms"] > 0:
                out["speedup_vs_ultralytics"] = round(
                    ultra["detector"]["p50_ms"] / out["edge_detector"]["p50_ms"], 2
                )
        elif compare_ultralytics:
            out["ultralytics"] = {"skipped": "no detector ONNX file given"}
        return out
