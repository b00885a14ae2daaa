"""`shelfloop bench models`: the same weights and images through Ultralytics/PyTorch and the edge runtime.

Each side runs in its own process, so neither pays for the other's memory: the edge process never
imports torch, and its peak RSS is what a device would see. The two take turns, one pass over the images
each per round, in the order edge, PyTorch, PyTorch, edge, ...: on a shared box the speed drifts by tens
of percent within a minute, and timing one side after the other measured that drift as a speed-up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_EDGE = textwrap.dedent("""
    import json, sys, time
    import cv2, numpy as np
    from models.loader import load_model_bundle
    args = json.loads(sys.argv[1])
    mb = load_model_bundle(args["bundle"], backend=args["backend"], precision=args["precision"])
    imgs = [cv2.imread(p) for p in args["images"]]
    crops = [cv2.imread(p) for p in args["crops"]]
    for im in imgs[:3]:
        mb.detector(im)
    mb.embedder.embed(crops[: args["batch"]])
    print("ready", flush=True)
    for _ in sys.stdin:  # one round per line
        det = []
        for im in imgs:
            t = time.perf_counter(); mb.detector(im); det.append((time.perf_counter() - t) * 1e3)
        rec = []
        for i in range(0, len(crops), args["batch"]):
            t = time.perf_counter(); mb.embedder.embed(crops[i:i + args["batch"]])
            rec.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"det_ms": det, "rec_ms": rec}), flush=True)
    torch_loaded = "torch" in sys.modules
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"peak_rss_mb": int(hwm) / 1024, "torch_loaded": torch_loaded,
                      "provider": mb.detector.backend.device,
                      "recognizer_provider": mb.embedder.backend.device}), flush=True)
""")

_TORCH = textwrap.dedent("""
    import json, os, sys, time
    args = json.loads(sys.argv[1])
    os.environ.setdefault("YOLO_OFFLINE", "1"); os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ["YOLO_CONFIG_DIR"] = args["yolo_config"]
    import cv2, numpy as np, torch
    torch.set_num_threads(os.cpu_count())
    from ultralytics import YOLO
    from retrain.recognizer import build_model
    from models.recognizer import crop_batch
    yolo = YOLO(args["detector_pt"])
    ckpt = torch.load(args["recognizer_pt"], map_location="cpu", weights_only=False)
    rec = build_model(ckpt["recipe"]["embed_dim"], ckpt["recipe"]["frozen_blocks"])
    rec.load_state_dict(ckpt["state_dict"]); rec.eval()
    size = ckpt["recipe"]["size"]
    imgs = [cv2.imread(p) for p in args["images"]]
    crops = [cv2.imread(p) for p in args["crops"]]
    kw = dict(imgsz=args["imgsz"], conf=0.25, iou=0.7, device="cpu", verbose=False)
    for im in imgs[:3]:
        yolo.predict(im, **kw)
    with torch.no_grad():  # warm up as the edge side does, on one batch
        rec(torch.from_numpy(crop_batch(crops[:args["batch"]], size)))
    print("ready", flush=True)
    for _ in sys.stdin:  # one round per line
        det = []
        for im in imgs:
            t = time.perf_counter(); yolo.predict(im, **kw); det.append((time.perf_counter() - t) * 1e3)
        recs = []
        with torch.no_grad():
            for i in range(0, len(crops), args["batch"]):
                t = time.perf_counter()
                batch = crops[i:i + args["batch"]]
                rec(torch.from_numpy(crop_batch(batch, size)))
                recs.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"det_ms": det, "rec_ms": recs}), flush=True)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"peak_rss_mb": int(hwm) / 1024}), flush=True)
""")


SETTLE_S = 0.5
"""Pause before each side's pass: the other side's idle OpenMP and ONNX Runtime threads spin for a while
after their last run, and would otherwise take the cores from the side being timed."""


class _Side:
    """One side of the benchmark: a process that loads its models once, then times one pass per round."""

    def __init__(self, code: str, args: dict) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        # Stderr goes to a file, not a pipe: warnings can never fill it and block the process.
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
        )
        self._line("ready")  # loaded and warmed up

    def _line(self, start: str = "{") -> str:
        """The next line the protocol wrote; libraries may print their own lines before it."""
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(start):
                return line
        self.proc.wait(timeout=60)
        self.err.seek(0)
        raise RuntimeError(f"benchmark process failed:\n{self.err.read()[-3000:]}")

    def round(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def finish(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        out = json.loads(self._line())
        self.proc.wait(timeout=60)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {
        "median_ms": round(statistics.median(s), 2),
        "p95_ms": round(s[int(0.95 * (len(s) - 1))], 2),
        "n": len(s),
    }


def run(
    bundle: Path,
    detector_pt: Path,
    recognizer_pt: Path,
    images: list[Path],
    crops: list[Path],
    repeats: int = 3,
    batch: int = 16,
    work_dir: Path = Path("var/bench"),
    backend: str = "onnxruntime",
    precision: str | None = None,
) -> dict:
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    args = {
        "bundle": str(bundle),
        "backend": backend,
        "precision": precision,
        "images": [str(p) for p in images],
        "crops": [str(p) for p in crops],
        "repeats": repeats,
        "batch": batch,
        "detector_pt": str(detector_pt),
        "recognizer_pt": str(recognizer_pt),
        "imgsz": manifest["detector"]["input"][-1],
        "yolo_config": str(Path(work_dir).resolve() / "yolo"),
    }
    sides = {"edge": _Side(_EDGE, args)}
    try:
        sides["pytorch"] = _Side(_TORCH, args)
        rounds: list[dict[str, dict]] = []
        for r in range(repeats):
            order = ("edge", "pytorch") if r % 2 == 0 else ("pytorch", "edge")
            timed = {}
            for name in order:
                time.sleep(SETTLE_S)
                timed[name] = sides[name].round()
            rounds.append(timed)
        edge, torch_side = sides["edge"].finish(), sides["pytorch"].finish()
    finally:
        for side in sides.values():
            side.kill()
    out: dict[str, Any] = {
        "images": len(images),
        "crops": len(crops),
        "recognizer_batch": batch,
        "rounds": repeats,
        "provider": edge["provider"],
        "recognizer_provider": edge["recognizer_provider"],
    }
    for part in ("det", "rec"):
        e_ms = [ms for r in rounds for ms in r["edge"][f"{part}_ms"]]
        t_ms = [ms for r in rounds for ms in r["pytorch"][f"{part}_ms"]]
        e, t = _stats(e_ms), _stats(t_ms)
        name = "detector" if part == "det" else "recognizer"
        out[name] = {
            "edge": e,
            "ultralytics_pytorch": t,
            "speedup_median": round(t["median_ms"] / e["median_ms"], 2),
            "speedup_p95": round(t["p95_ms"] / e["p95_ms"], 2),
            # Each round's two sides ran back to back: how far the ratio moves with the box's speed.
            "speedup_per_round": [
                round(
                    statistics.median(r["pytorch"][f"{part}_ms"])
                    / statistics.median(r["edge"][f"{part}_ms"]),
                    2,
                )
                for r in rounds
            ],
        }
    out["memory"] = {
        "edge_peak_rss_mb": round(edge["peak_rss_mb"], 1),
        "pytorch_peak_rss_mb": round(torch_side["peak_rss_mb"], 1),
        "edge_imports_torch": edge["torch_loaded"],
    }
    return out


# The Ultralytics side of `shelfloop bench edge`: kept here so no edge module carries Ultralytics code.

_ULTRALYTICS_DETECTOR = textwrap.dedent(
    """
    import json, os, sys, time
    args = json.loads(sys.argv[1])
    os.environ.setdefault("YOLO_OFFLINE", "1"); os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ["YOLO_CONFIG_DIR"] = args["yolo_config"]
    import cv2
    from ultralytics import YOLO
    yolo = YOLO(args["onnx"], task="detect")
    imgs = [cv2.imread(p) for p in args["images"]]
    kw = dict(imgsz=args["imgsz"], conf=args["conf"], iou=args["iou"], device="cpu", verbose=False)
    for im in imgs[:3]:
        yolo.predict(im, **kw)
    ms = []
    for _ in range(args["repeats"]):
        for im in imgs:
            t = time.perf_counter(); yolo.predict(im, **kw); ms.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"det_ms": ms}))
    """
)


def ultralytics_detector_latency(
    onnx: Path, images: Sequence[Path], imgsz: int, repeats: int, work: Path
) -> dict[str, Any]:
    args = {
        "onnx": str(onnx),
        "images": [str(p) for p in images],
        "imgsz": imgsz,
        "conf": 0.25,
        "iou": 0.7,
        "repeats": repeats,
        "yolo_config": str(work / "yolo"),
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        r = subprocess.run(
            [sys.executable, "-c", _ULTRALYTICS_DETECTOR, json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"skipped": f"could not run: {exc}"}
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"Ultralytics baseline failed: {last[:300]}"}
    ms = json.loads(r.stdout.strip().splitlines()[-1])["det_ms"]
    arr = np.asarray(ms, np.float64)
    pct = {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p95_ms": round(float(np.percentile(arr, 95)), 3),
    }
    return {"detector": pct, "n": len(ms)}
