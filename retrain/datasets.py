"""Labelled image lists from the data sets the recognizer learns from: ImageFolders and Grocery Store."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from models.evaluate import image_folder as _image_folder


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str


def image_folder(root: Path, prefix: str = "") -> list[Sample]:
    """`root/<label>/*.jpg` (the layout of a synthetic world's crops/<split>/)."""
    return [Sample(path, prefix + label) for path, label in _image_folder(Path(root))]


def grocery_store(root: Path, split: str) -> list[Sample]:
    """Klasson et al.'s Grocery Store data set: `dataset/{split}.txt` rows `path, fine_id, coarse_id`.

    Labels are the fine class names (81 classes), prefixed `gs:` so they never collide with SKU ids.
    """
    root = Path(root)
    base = root / "dataset" if (root / "dataset").is_dir() else root
    names = {}
    with (base / "classes.csv").open() as f:
        for row in csv.DictReader(f):
            names[int(row["Class ID (int)"])] = row["Class Name (str)"]
    samples = []
    for line in (base / f"{split}.txt").read_text().splitlines():
        if line.strip():
            rel, fine, _ = (x.strip() for x in line.split(","))
            samples.append(Sample(base / rel, "gs:" + names[int(fine)]))
    return samples


def per_label(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.label, []).append(s)
    return out
