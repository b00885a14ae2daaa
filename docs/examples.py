"""Re-make the example pictures in docs/img from a generated world.

shelfloop sim generate --out /tmp/world --seed 7 --shelf-images 60 --checkout-images 40
python docs/examples.py /tmp/world
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2

COLOURS = {  # BGR, the colour code the compliance reports use
    "correct": (80, 200, 60),
    "misplaced_same_row": (0, 150, 255),
    "wrong_shelf": (200, 60, 160),
    "out_of_stock": (40, 40, 230),
    "facing_count_mismatch": (0, 220, 230),
    "extra_unplanned": (230, 150, 30),
    "unknown_product": (230, 60, 230),
}


def _save(img, path: Path, max_side: int = 640) -> None:
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 82])


def main(world: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gt = {
        g["image_id"]: g for g in json.loads((world / "shelf" / "compliance_gt.json").read_text())["images"]
    }
    coco = json.loads((world / "shelf" / "annotations" / "train.json").read_text())
    fixture = {i["image_id"]: i["fixture"] for i in coco["images"]}
    gondola = next(i for i, g in gt.items() if fixture.get(i) == "gondola" and len(g["unplanned"]) >= 1)
    cooler = next(i for i in gt if fixture.get(i) == "cooler")
    for name, image_id in (("shelf-gondola", gondola), ("shelf-cooler", cooler)):
        _save(cv2.imread(str(world / gt[image_id]["file_name"])), out / f"{name}.jpg")
    g = gt[gondola]
    img = cv2.imread(str(world / g["file_name"]))
    for slot in g["slots"]:
        for box in slot["boxes"] + slot["gap_boxes"]:
            x1, y1, x2, y2 = (int(v) for v in box)
            cv2.rectangle(img, (x1, y1), (x2, y2), COLOURS[slot["label"]], 3)
    for u in g["unplanned"]:
        x1, y1, x2, y2 = (int(v) for v in u["box"])
        cv2.rectangle(img, (x1, y1), (x2, y2), COLOURS[u["label"]], 3)
    _save(img, out / "shelf-gondola-ground-truth.jpg")
    checkout = sorted((world / "checkout" / "images" / "train").glob("*.jpg"))[1]
    _save(cv2.imread(str(checkout)), out / "checkout.jpg")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).with_name("img"))
