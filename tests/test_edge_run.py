"""`shelfloop edge run` end to end: signed models built here, a real Mosquitto, the real cloud ingest worker;
SIGTERM ends it cleanly with everything accepted delivered or kept."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from cloud_api import models as m
from cloud_api.db import Database
from cloud_api.ingest import Ingestor, IngestWorker
from cloud_api.storage import LocalObjectStore
from edge_agent.outbox import Outbox
from models.backends import create_backend
from models.bundle import generate_signing_key, sign_bundle
from models.gallery import Gallery
from models.recognizer import SkuEmbedder

onnx = pytest.importorskip("onnx", reason="onnx builds the small test graphs")
from onnx import TensorProto, helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORE, DEV = "store-1", "dev-1"
COLOURS = {"red-can": (0, 0, 230), "green-box": (0, 200, 0), "blue-bottle": (220, 0, 0)}


def _save(model: Any, path: Path) -> Path:
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def detector_onnx(path: Path) -> Path:
    """A YOLO-layout head [1, 5, anchors] with two fixed boxes in its 64x64 input."""
    anchors = np.zeros((1, 5, 2), np.float32)
    anchors[0, :, 0] = [16, 32, 20, 40, 0.9]
    anchors[0, :, 1] = [46, 32, 20, 40, 0.8]
    const = helper.make_tensor("boxes", TensorProto.FLOAT, anchors.shape, anchors.ravel())
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 2])
    nodes = [
        helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["boxes", "z"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "fake-detector", [x], [y], initializer=[const, zero])
    return _save(helper.make_model(graph), path)


def embedder_onnx(path: Path) -> Path:
    """Embedding = per-channel mean (3-d): tells colours apart."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["embedding"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "fake-embedder", [x], [y])
    return _save(helper.make_model(graph), path)


def signed_models(root: Path, version: str = "m-1", gallery_version: str = "g-1") -> tuple[Path, Path, Path]:
    """A signed model bundle and gallery, and the public key that verifies them."""
    key = root / "keys" / "test.pem"
    if not key.exists():
        generate_signing_key(key)
    bundle = root / f"model-{version}"
    bundle.mkdir(parents=True)
    detector_onnx(bundle / "detector.onnx")
    embedder_onnx(bundle / "recognizer.onnx")
    sign_bundle(
        bundle,
        {
            "name": "test-model",
            "kind": "model",
            "version": version,
            "detector": {"file": "detector.onnx", "conf_threshold": 0.25},
            "recognizer": {"file": "recognizer.onnx"},
        },
        key,
    )
    embedder = SkuEmbedder(create_backend("onnxruntime", bundle / "recognizer.onnx"))
    crops, labels = [], []
    for name, bgr in COLOURS.items():
        for shade in (0, 20):
            crops.append(np.full((40, 30, 3), np.clip(np.array(bgr) + shade, 0, 255), np.uint8))
            labels.append(name)
    gallery_dir = root / f"gallery-{gallery_version}"
    gallery = Gallery(embedder.embed(crops), labels, labels, embedder.fingerprint, gallery_version, 0.05, 0.3)
    manifest = gallery.save(gallery_dir)
    sign_bundle(gallery_dir, {**manifest, "name": "test-gallery"}, key)
    return bundle, gallery_dir, key.with_suffix(".pub")


def write_frames(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = np.full((120, 160, 3), 128, np.uint8)
        image[20:100, 10:70] = rng.integers(0, 255, 3)
        image[20:100, 90:150] = list(COLOURS.values())[i % 3]
        cv2.imwrite(str(folder / f"frame-{i:03d}.jpg"), image)
    return folder


@pytest.mark.broker
def test_edge_run_delivers_crops_and_heartbeats_and_stops_cleanly_on_sigterm(
    mosquitto: Any, tmp_path: Path
) -> None:
    broker = mosquitto(extra_config=("max_queued_messages 100000",))
    bundle, gallery, pub = signed_models(tmp_path / "models")
    frames = write_frames(tmp_path / "till", 12)
    shelf = write_frames(tmp_path / "shelf", 2)
    config = {
        "mqtt": {"host": broker.host, "port": broker.port},
        "edge": {
            "store_id": STORE,
            "device_id": DEV,
            "data_dir": str(tmp_path / "edge"),
            "model_bundle": str(bundle),
            "gallery": str(gallery),
            "trusted_keys": [str(pub)],
            "heartbeat_s": 0.5,
            "cameras": [
                {"camera_id": "till-1", "source": str(frames), "role": "checkout"},
                {"camera_id": "shelf-1", "source": str(shelf), "role": "shelf", "interval_s": 0.2},
            ],
            "routing": {"min_probability": 1.0, "per_minute": 1000, "per_hour": 1000},
            "uplink": {"ack_timeout_s": 1.0, "drain_on_stop_s": 10},
        },
    }
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(config))
    db = Database(f"sqlite:///{tmp_path / 'cloud.db'}")
    worker = IngestWorker(
        Ingestor(db, LocalObjectStore(tmp_path / "objects")),
        host=broker.host,
        port=broker.port,
        client_id="ing",
    )
    worker.start()
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "shelfloop"), "edge", "run", "--config", str(cfg)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert worker.wait_ready(15)
        deadline = time.monotonic() + 40
        crops = beats = 0
        while time.monotonic() < deadline and (crops == 0 or beats < 2):
            time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            with db.session() as s:
                crops = s.scalar(sa.select(sa.func.count()).select_from(m.Crop)) or 0
                beats = s.scalar(sa.select(sa.func.count()).select_from(m.HeartbeatRow)) or 0
        assert crops > 0 and beats >= 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        assert '"msg": "edge agent stopped' in out
        time.sleep(1.0)
        with Outbox(tmp_path / "edge" / "outbox.db") as box:
            left = set(box.crop_ids())
            counters = box.counters()
        with db.session() as s:
            stored = set(s.scalars(sa.select(m.Crop.crop_id)))
            items = s.scalar(sa.select(sa.func.count()).select_from(m.CheckoutItemRow)) or 0
        # Every accepted crop was acked (identical pixels are acked as duplicates) or is still kept.
        acked = counters["acked_stored"] + counters["acked_duplicate"]
        assert acked + len(left) == counters["accepted"] and counters["acked_rejected"] == 0
        assert counters["acked_stored"] == len(stored) and not (stored & left)
        assert items >= 1  # open checkout items were flushed at shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        worker.stop()
        db.dispose()
