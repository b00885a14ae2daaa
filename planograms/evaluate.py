"""Grade the compliance engine against a synthetic world's ground truth (shelf/compliance_gt.json).

The observation is built the way the device would build it, from the COCO boxes of the photo — every box,
the neighbouring bays' included; `in_bay` is never read, the engine has to exclude them itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import msgspec
import numpy as np

from planograms.catalogue import CatalogueView
from planograms.compliance import MISSING_UNVERIFIED, SLOT_STATUSES, ShelfObservation, check_bay
from planograms.metrics import label_scores
from planograms.schema import Planogram

GT_SLOT_LABELS = ("correct", "misplaced_same_row", "wrong_shelf", "out_of_stock", "facing_count_mismatch")


def observation_from_coco(
    anns: list[dict], width: int, height: int, shelf_lines: list | None = None
) -> ShelfObservation:
    """Every COCO box of a photo with its true SKU at probability 1 (the neighbouring bays' boxes too)."""
    boxes = [
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns
    ]
    n = len(boxes)
    return ShelfObservation(
        xyxy=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        confidence=np.ones(n),
        sku_id=[a.get("sku_id") for a in anns],
        sku_prob=np.ones(n),
        image_size=(width, height),
        shelf_lines=None if shelf_lines is None else np.array(shelf_lines, dtype=np.float64).reshape(-1, 4),
    )


def evaluate_on_world(
    world_dir: str | Path,
    split: str = "test",
    use_ground_truth_detections: bool = True,
    use_shelf_lines: bool = False,
    detections: Mapping[str, ShelfObservation] | None = None,
) -> dict:
    """Per-label precision / recall / F1 over the planned slots of every shelf photo of `split`
    ("train", "val", "test", or "all").

    With `use_ground_truth_detections` the observation is the photo's COCO boxes with their true SKU at
    probability 1 (this grades the engine alone); otherwise `detections` maps image_id -> observation from
    the models. `use_shelf_lines` hands the engine the true shelf edges instead of letting it find rows.
    `missing_unverified` never occurs in the truth; predictions of it are counted against the true label
    and listed under `missing_unverified` with whether each is fair (no facing of the slot is in the
    photo at all, so nothing could confirm or refute it).
    """
    root = Path(world_dir)
    gt = json.loads((root / "shelf" / "compliance_gt.json").read_text())
    plan = msgspec.json.decode((root / "planograms.json").read_bytes(), type=Planogram)
    cat = CatalogueView.load(root / "catalogue.json")
    known, variants, catalogue = cat.known_skus, cat.variants, cat.info
    splits = ("train", "val", "test") if split == "all" else (split,)
    images: dict[str, dict] = {}
    by_image: dict[str, list[dict]] = {}
    for sp in splits:
        path = root / "shelf" / "annotations" / f"{sp}.json"
        if not path.exists():
            continue
        coco = json.loads(path.read_text())
        local = {im["id"]: im["image_id"] for im in coco["images"]}
        images.update({im["image_id"]: im for im in coco["images"]})
        for a in coco["annotations"]:
            by_image.setdefault(local[a["image_id"]], []).append(a)

    pairs: list[tuple[str, str]] = []
    unverified: list[dict] = []
    errors: list[dict] = []
    partial = 0
    n_images = 0
    for item in gt["images"]:
        if item["split"] not in splits:
            continue
        im = images[item["image_id"]]
        if use_ground_truth_detections:
            obs = observation_from_coco(
                by_image.get(item["image_id"], []),
                im["width"],
                im["height"],
                item["shelf_lines"] if use_shelf_lines else None,
            )
        else:
            if detections is None or item["image_id"] not in detections:
                raise KeyError(f"no detections given for {item['image_id']}")
            obs = detections[item["image_id"]]
        bay = plan.bay(item["bay_id"])
        res = check_bay(
            obs, bay, known_skus=known, variants=variants, catalogue=catalogue, other_bays=plan.bays
        )
        n_images += 1
        partial += res.partial
        pred = {(s.shelf_row, s.slot_index): s for s in res.slots}
        for s in item["slots"]:
            p = pred[(s["shelf_row"], s["slot_index"])]
            pairs.append((s["label"], p.status))
            if p.status == MISSING_UNVERIFIED:
                # Fair when the truth has no box for the slot at all: its facings are outside the photo
                # (or fully hidden), so nothing in the photo could confirm or refute them.
                unverified.append(
                    {
                        "image_id": item["image_id"],
                        "shelf_row": s["shelf_row"],
                        "slot_index": s["slot_index"],
                        "true_label": s["label"],
                        "fair": s["label"] != "out_of_stock" and not s["boxes"],
                    }
                )
            elif p.status != s["label"]:
                errors.append(
                    {
                        "image_id": item["image_id"],
                        "shelf_row": s["shelf_row"],
                        "slot_index": s["slot_index"],
                        "true": s["label"],
                        "predicted": p.status,
                    }
                )
    scores = label_scores(
        pairs, labels=[*GT_SLOT_LABELS, *[s for s in SLOT_STATUSES if s not in GT_SLOT_LABELS]]
    )
    per_label = scores["per_label"]
    return {
        "macro_f1": scores["macro_f1"],
        "per_label": per_label,
        "images": n_images,
        "slots": len(pairs),
        "out_of_stock_recall": per_label.get("out_of_stock", {}).get("recall", 0.0),
        "partial_images": partial,
        "missing_unverified": {
            "count": len(unverified),
            "fair": sum(u["fair"] for u in unverified),
            "cases": unverified,
        },
        "errors": errors,
    }
