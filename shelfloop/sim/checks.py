"""Dataset checks that catch broken training data before hours of training are spent on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import yaml

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class DatasetReport:
    images: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    idx = len(parts) - 1 - parts[::-1].index("images")  # the same rule Ultralytics uses: last /images/
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def check_yolo_dataset(data_yaml: Path) -> DatasetReport:
    """Every image decodes; every label line is `class cx cy w h` with a known class and a box inside."""
    report = DatasetReport()
    try:
        spec = yaml.safe_load(Path(data_yaml).read_text())
    except (OSError, yaml.YAMLError) as exc:
        report.problems.append(f"{data_yaml}: unreadable ({exc})")
        return report
    root = Path(spec.get("path", Path(data_yaml).parent))
    names = spec.get("names") or {}
    n_classes = len(names)
    for split in ("train", "val", "test"):
        dirs = spec.get(split)
        if not dirs:
            continue
        n_img = n_box = 0
        for d in [dirs] if isinstance(dirs, str) else dirs:
            folder = root / d
            if not folder.is_dir():
                report.problems.append(f"{split}: missing image folder {folder}")
                continue
            for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                n_img += 1
                if cv2.imread(str(img), cv2.IMREAD_REDUCED_COLOR_2) is None:
                    report.problems.append(f"{img}: does not decode")
                lbl = _label_path(img)
                if not lbl.exists():
                    continue  # an image without objects is allowed
                for ln, line in enumerate(lbl.read_text().splitlines(), 1):
                    problem = _check_line(line, n_classes)
                    if problem:
                        report.problems.append(f"{lbl}:{ln}: {problem}")
                    else:
                        n_box += 1
        report.images[split], report.boxes[split] = n_img, n_box
    if not report.images:
        report.problems.append(f"{data_yaml}: names no train/val/test image folders")
    return report


def _check_line(line: str, n_classes: int) -> str | None:
    fields = line.split()
    if len(fields) != 5:
        return f"expected 5 fields, got {len(fields)}"
    try:
        cls = int(fields[0])
        cx, cy, w, h = (float(v) for v in fields[1:])
    except ValueError:
        return "not numbers"
    if not 0 <= cls < max(1, n_classes):
        return f"class {cls} not in names"
    if not (0 < w <= 1 and 0 < h <= 1):
        return "width/height must be in (0, 1]"
    if cx - w / 2 < -1e-3 or cx + w / 2 > 1 + 1e-3 or cy - h / 2 < -1e-3 or cy + h / 2 > 1 + 1e-3:
        return "box extends outside the image"
    return None


def dataset_images(dataset: Path, split: str = "test") -> list[Path]:
    """Images of a YOLO data set given as a data YAML, a folder holding detection.yaml, or a plain folder."""
    dataset = Path(dataset)
    if dataset.is_dir() and (dataset / "detection.yaml").is_file():
        dataset = dataset / "detection.yaml"
    if dataset.is_file():
        spec = yaml.safe_load(dataset.read_text())
        root = Path(spec.get("path", dataset.parent))
        dirs = spec.get(split) or []
        dirs = [dirs] if isinstance(dirs, str) else dirs
        return sorted(p for d in dirs for p in (root / d).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in dataset.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "images" in p.parts)
