"""Train the class-agnostic product detector with Ultralytics and export it to ONNX.

Training only (Ultralytics is AGPL-3.0 and lives in the `train` extra); the edge runs the exported ONNX
with its own pre- and post-processing. Runs fully offline: the architecture comes from a YAML, weights
start random, no hub is contacted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def offline_ultralytics(config_dir: Path) -> None:
    """Environment that keeps Ultralytics off the network and its settings inside our own folder."""
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    # `import ultralytics` would otherwise pin OMP to one thread.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


@dataclass(frozen=True)
class DetectorRecipe:
    data: str
    epochs: int = 50
    imgsz: int = 512
    batch: int = 16
    model: str = "yolo11n.yaml"
    seed: int = 0
    patience: int = 100
    init: str | None = None  # a detector.pt to continue from, else random weights
    lr0: float | None = None  # AdamW learning rate; None lets Ultralytics choose (from-scratch runs)
    dynamic: bool = False  # export with free height and width (the edge then pads only to the stride)


def train_detector(recipe: DetectorRecipe, out: Path) -> dict:
    """Train, validate on the test split, export ONNX. Returns (and writes) the training report."""
    out = Path(out).resolve()
    offline_ultralytics(out / ".ultralytics")
    import torch
    from ultralytics import YOLO, settings

    settings.update({"sync": False})
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    model = YOLO(recipe.init or recipe.model)
    tuning = {"optimizer": "AdamW", "lr0": recipe.lr0, "warmup_epochs": 0} if recipe.lr0 else {}
    model.train(
        data=recipe.data,
        epochs=recipe.epochs,
        imgsz=recipe.imgsz,
        batch=recipe.batch,
        device="cpu",
        pretrained=bool(recipe.init),
        amp=False,
        plots=False,
        workers=0,
        project=str(out),
        name="run",
        exist_ok=True,
        seed=recipe.seed,
        deterministic=True,
        cache="ram",
        patience=recipe.patience,
        single_cls=True,
        fliplr=0.5,
        mosaic=1.0,
        close_mosaic=max(1, recipe.epochs // 5),
        verbose=False,
        **tuning,
    )
    train_s = time.time() - t0
    best = out / "run" / "weights" / "best.pt"
    shutil.copyfile(best, out / "detector.pt")
    trained = YOLO(str(out / "detector.pt"))
    metrics = {}
    for split in ("val", "test"):
        r = trained.val(
            data=recipe.data,
            split=split,
            imgsz=recipe.imgsz,
            batch=8,
            device="cpu",
            plots=False,
            verbose=False,
            project=str(out),
            name=f"val-{split}",
            exist_ok=True,
        )
        metrics[split] = {"map50": float(r.box.map50), "map50_95": float(r.box.map)}
    onnx_path = Path(
        trained.export(format="onnx", imgsz=recipe.imgsz, opset=17, simplify=True, dynamic=recipe.dynamic)
    )
    shutil.move(str(onnx_path), out / "detector.onnx")
    report = {
        "recipe": asdict(recipe),
        "train_seconds": round(train_s, 1),
        "ultralytics_metrics": metrics,
        "onnx": "detector.onnx",
        # For a dynamic export: the largest input, the size frames are fitted into before stride padding.
        "input": [1, 3, recipe.imgsz, recipe.imgsz],
        "dynamic_input": recipe.dynamic,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
