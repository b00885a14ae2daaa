"""The synthetic world loads in the training tools themselves: Ultralytics (YOLO labels) and
torchvision (crops as an ImageFolder). Needs the `train` extra; skipped without it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.train


def _offline_ultralytics(tmp_path: Path):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path / "yolo-config"))
    return pytest.importorskip("ultralytics", reason="the train extra (ultralytics) is not installed")


def test_yolo_labels_load_in_ultralytics(small_world, tmp_path):
    _offline_ultralytics(tmp_path)
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(small_world / "detection.yaml"), autodownload=False)
    assert data["nc"] == 1 and data["names"][0] == "product"
    coco_boxes = 0
    for scene in ("shelf", "checkout"):
        coco_boxes += len(
            json.loads((small_world / scene / "annotations" / "train.json").read_text())["annotations"]
        )
    ds = YOLODataset(img_path=data["train"], imgsz=320, augment=False, data=data, task="detect")
    n_boxes = sum(len(lbl["bboxes"]) for lbl in ds.labels)
    assert len(ds.labels) == len(list((small_world / "shelf" / "images" / "train").glob("*.jpg"))) + len(
        list((small_world / "checkout" / "images" / "train").glob("*.jpg"))
    )
    assert n_boxes == coco_boxes > 0
    sample = ds[0]
    assert sample["img"].shape[0] == 3 and len(sample["bboxes"]) == len(sample["cls"])


def test_crops_load_as_a_torchvision_imagefolder(small_world):
    datasets = pytest.importorskip(
        "torchvision.datasets", reason="the train extra (torchvision) is not installed"
    )
    folder = datasets.ImageFolder(str(small_world / "crops" / "train"))
    files = list((small_world / "crops" / "train").rglob("*.jpg"))
    assert len(folder) == len(files) > 0
    skus = {s["sku_id"] for s in json.loads((small_world / "catalogue.json").read_text())["skus"]}
    assert set(folder.class_to_idx) <= skus
    image, label = folder[0]
    assert image.size[0] > 0 and folder.classes[label] in skus


def test_detector_fine_tune_exports_a_dynamic_input_the_edge_runs(small_world, tmp_path):
    """`retrain detector --init --lr0 --dynamic`: continues the shipped weights and exports free height and
    width, which the edge then pads only to the stride."""
    _offline_ultralytics(tmp_path)
    import cv2

    from models.backends import create_backend
    from models.detector import ProductDetector
    from retrain.detector import DetectorRecipe, train_detector

    baseline = Path(__file__).resolve().parents[1] / "retrain" / "baseline" / "detector.pt"
    recipe = DetectorRecipe(
        data=str(small_world / "detection.yaml"),
        epochs=1,
        imgsz=256,
        batch=8,
        init=str(baseline),
        lr0=1e-5,
        dynamic=True,
    )
    report = train_detector(recipe, tmp_path / "det")
    assert report["dynamic_input"] and report["input"] == [1, 3, 256, 256]
    backend = create_backend("onnxruntime", tmp_path / "det" / "detector.onnx")
    assert not all(isinstance(d, int) for d in backend.inputs[0].shape[2:])  # height and width are free
    detector = ProductDetector(backend, max_size=(256, 256))
    shelf = cv2.imread(str(next((small_world / "shelf" / "images" / "test").glob("*.jpg"))))
    blob, _ = detector.preprocess(shelf)
    assert blob.shape[2] == 256 and blob.shape[3] % 32 == 0 and blob.shape[3] < 256  # portrait: no square pad
    # It started from the trained weights, not from scratch: one epoch at a tiny rate still finds products.
    assert report["ultralytics_metrics"]["test"]["map50"] > 0.5
    assert len(detector(shelf)) > 0
