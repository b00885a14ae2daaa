"""Generate a whole synthetic retail world on disk, in standard formats any tool can read.

Deterministic per seed: every image draws from its own generator seeded by (seed, scene, index), so the
output does not depend on the number of worker processes. Layout: docs/synthetic-world.md.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from planograms.schema import Planogram, dumps, validate
from shelfloop.sim import effects
from shelfloop.sim.catalogue import Catalogue, Sku, make_catalogue
from shelfloop.sim.checkout import render_checkout
from shelfloop.sim.packshot import font_paths, render_packshot
from shelfloop.sim.shelf import CHILLED, realise_bay, render_shelf

SIM_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MIN_VISIBLE = 0.25  # a product less visible than this at the photo edge is not labelled
MIN_CROP_SIDE = 16


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    skus: int = 60
    novel: int = 10
    bays: int = 8
    shelf_images: int = 120
    checkout_images: int = 80
    fault_rate: float = 0.12
    unplanned_rate: float = 0.25
    unknown_rate: float = 0.15
    variant_rate: float = 0.2
    jpeg_quality: tuple[int, int] = (72, 93)


def split_of(index: int) -> str:
    """70/15/15 by index, interleaved so every bay and condition appears in every split."""
    r = index % 20
    return "train" if r < 14 else "val" if r < 17 else "test"


@dataclass
class World:
    spec: WorldSpec
    catalogue: Catalogue
    planogram: Planogram


def build_world(spec: WorldSpec) -> World:
    from shelfloop.sim.shelf import plan_store

    catalogue = make_catalogue(
        np.random.default_rng([spec.seed, 0]), spec.skus, spec.novel, len(font_paths()), spec.variant_rate
    )
    planogram = plan_store(np.random.default_rng([spec.seed, 3]), catalogue, spec.bays, spec.seed)
    validate(planogram, [s.sku_id for s in catalogue.skus])
    return World(spec, catalogue, planogram)


# ---------------------------------------------------------------------------------------------------------
# Per-image work (runs in worker processes)

_WORLD: World | None = None


def _init_worker(spec: WorldSpec) -> None:
    global _WORLD
    cv2.setNumThreads(1)
    _WORLD = build_world(spec)


def _crop(img: np.ndarray, box, rng: np.random.Generator, quality: int = 90) -> bytes | None:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    if min(bw, bh) < MIN_CROP_SIDE:
        return None
    pad = rng.uniform(-0.02, 0.06, 4) * np.array([bw, bh, bw, bh])
    h, w = img.shape[:2]
    a = max(0, int(x1 - pad[0])), max(0, int(y1 - pad[1]))
    b = min(w, int(x2 + pad[2])), min(h, int(y2 + pad[3]))
    if b[0] - a[0] < MIN_CROP_SIDE or b[1] - a[1] < MIN_CROP_SIDE:
        return None
    return effects.encode_jpeg(np.ascontiguousarray(img[a[1] : b[1], a[0] : b[0]]), quality)


def _variant_id(sku: Sku, kind: str) -> str:
    return sku.sku_id if kind == "standard" else f"{sku.sku_id}.{kind}"


def _shelf_task(index: int) -> dict:
    world = _WORLD
    assert world is not None
    spec = world.spec
    rng = np.random.default_rng([spec.seed, 1, index])
    bay = world.planogram.bays[index % len(world.planogram.bays)]
    real = realise_bay(rng, bay, world.catalogue, spec.fault_rate, spec.unplanned_rate)
    chilled = bay.fixture == "cooler"
    neighbours = [s for s in world.catalogue.skus if (s.category in CHILLED) == chilled]
    out = render_shelf(rng, real, world.catalogue, neighbours)
    img = out["image"]
    h, w = img.shape[:2]
    image_id = f"shelf-{index:05d}"
    anns, crops = [], []
    slot_boxes: dict[tuple[int, int], list] = {}
    slot_occluded: set[tuple[int, int]] = set()
    unplanned = []
    for k, (facing, box, occ) in enumerate(zip(out["facings"], out["boxes"], out["occlusion"], strict=True)):
        full = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
        cb = np.clip(box, [0, 0, 0, 0], [w, h, w, h])
        visible = float((cb[2] - cb[0]) * (cb[3] - cb[1]) / full)
        if visible < MIN_VISIBLE:
            continue
        cbox = [round(float(v), 1) for v in cb]
        ann = {
            "box": cbox,
            "sku_id": facing.sku.sku_id if facing.sku.in_catalogue else None,
            "product_id": facing.sku.sku_id,
            "variant_id": _variant_id(facing.sku, facing.variant),
            "in_catalogue": facing.sku.in_catalogue,
            "in_bay": facing.in_bay,
            "truncated": visible < 0.98,
            "occluded": round(float(occ), 3),
        }
        anns.append(ann)
        if facing.in_bay and facing.slot is not None:
            slot_boxes.setdefault(facing.slot, []).append(cbox)
            if occ > 0.3:
                slot_occluded.add(facing.slot)
        elif facing.in_bay and facing.unplanned:
            unplanned.append(
                {
                    "label": facing.unplanned,
                    "sku_id": ann["sku_id"],
                    "product_id": facing.sku.sku_id,
                    "box": cbox,
                }
            )
        if visible >= 0.5 and occ < 0.6:
            data = _crop(img, cb, rng)
            if data is not None:
                crops.append((facing.sku.in_catalogue, facing.sku.sku_id, f"{image_id}_{k:03d}.jpg", data))
    slots = []
    for row in bay.rows:
        for slot in row.slots:
            key = (row.shelf_row, slot.slot_index)
            gaps = out["gap_boxes"].get(key)
            slots.append(
                {
                    "shelf_row": row.shelf_row,
                    "slot_index": slot.slot_index,
                    "sku_id": slot.sku_id,
                    "facings_planned": slot.facings,
                    "facings_found": real.facings_found[key],
                    "label": real.labels[key],
                    "occluded": key in slot_occluded,
                    "boxes": slot_boxes.get(key, []),
                    "gap_boxes": [] if gaps is None else [[round(float(v), 1) for v in g] for g in gaps],
                }
            )
    compliance = {
        "image_id": image_id,
        "bay_id": bay.bay_id,
        "lighting": out["lighting"],
        "slots": slots,
        "unplanned": unplanned,
        "shelf_lines": [[round(float(v), 1) for v in ln] for ln in out["shelf_lines"]],
    }
    meta = {"lighting": out["lighting"], "bay_id": bay.bay_id, "fixture": bay.fixture}
    return _result("shelf", index, image_id, img, rng, spec, anns, crops, meta, compliance)


def _checkout_task(index: int) -> dict:
    world = _WORLD
    assert world is not None
    spec = world.spec
    rng = np.random.default_rng([spec.seed, 2, index])
    out = render_checkout(rng, world.catalogue, spec.unknown_rate)
    img = out["image"]
    image_id = f"checkout-{index:05d}"
    anns, crops = [], []
    for k, item in enumerate(out["items"]):
        x1, y1, x2, y2 = item.box
        if x2 - x1 < 4 or y2 - y1 < 4:
            continue
        cbox = [round(float(v), 1) for v in item.box]
        anns.append(
            {
                "box": cbox,
                "sku_id": item.sku.sku_id if item.in_catalogue else None,
                "product_id": item.sku.sku_id,
                "variant_id": _variant_id(item.sku, item.variant),
                "in_catalogue": item.in_catalogue,
                "view": item.view,
                "truncated": False,
                "occluded": round(item.occlusion, 3),
            }
        )
        if item.occlusion < 0.6:
            data = _crop(img, item.box, rng)
            if data is not None:
                crops.append((item.in_catalogue, item.sku.sku_id, f"{image_id}_{k:03d}.jpg", data))
    return _result(
        "checkout", index, image_id, img, rng, spec, anns, crops, {"lighting": out["lighting"]}, None
    )


def _result(scene, index, image_id, img, rng, spec: WorldSpec, anns, crops, meta, compliance) -> dict:
    """What a worker sends back: the encoded photo and everything the writer files beside it."""
    h, w = img.shape[:2]
    quality = int(rng.integers(*spec.jpeg_quality))
    return {
        "scene": scene,
        "index": index,
        "image_id": image_id,
        "width": w,
        "height": h,
        "jpeg": effects.encode_jpeg(img, quality),
        "annotations": anns,
        "crops": crops,
        "meta": meta,
        "compliance": compliance,
    }


def _run(task: tuple[str, int]) -> dict:
    scene, index = task
    return _shelf_task(index) if scene == "shelf" else _checkout_task(index)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _yolo_line(box, w: int, h: int) -> str:
    x1, y1, x2, y2 = box
    return f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


def _packshot_jpeg(sku: Sku, kind: str, view: str) -> bytes:
    img = render_packshot(sku, kind, view)
    img.thumbnail((256, 256), Image.Resampling.LANCZOS)
    bg = Image.new("RGB", img.size, (255, 255, 255))
    bg.paste(img, (0, 0), img)
    return effects.encode_jpeg(np.asarray(bg), 92)


def generate(
    out: Path, spec: WorldSpec, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Write the world to `out` (which must be empty or absent). Returns the summary in world.json."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(spec)
    cat = world.catalogue

    _write_json(out / "catalogue.json", {"catalogue_version": "1", "skus": [s.to_json() for s in cat.skus]})
    _write_json(
        out / "novel_products.json",
        {
            "note": "out-of-catalogue products: ground truth only",
            "products": [s.to_json() for s in cat.novel],
        },
    )
    (out / "planograms.json").write_bytes(dumps(world.planogram) + b"\n")
    for s in cat.skus:
        for v in s.variants:
            p = out / "catalogue" / "packshots" / s.sku_id / f"{v.variant_id}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_packshot_jpeg(s, v.kind, "front"))
        (out / "catalogue" / "packshots" / s.sku_id / f"{s.sku_id}.back.jpg").write_bytes(
            _packshot_jpeg(s, "standard", "back")
        )

    tasks = [("shelf", i) for i in range(spec.shelf_images)] + [
        ("checkout", i) for i in range(spec.checkout_images)
    ]
    coco: dict[tuple[str, str], dict] = {}
    compliance: list[dict] = []
    counts = {"shelf_images": 0, "checkout_images": 0, "boxes": 0, "crops": 0, "novel_crops": 0}
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1:
        _init_worker(spec)
        results = map(_run, tasks)
        pool = None
    else:
        # forkserver, not fork: a caller that has run torch (a training job, a test session) holds OpenMP
        # thread pools that a forked child can deadlock on
        ctx = multiprocessing.get_context("forkserver")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,))
        results = pool.map(_run, tasks, chunksize=2)
    try:
        for done, res in enumerate(results, 1):
            split = split_of(res["index"])
            scene = res["scene"]
            img_rel = Path(scene) / "images" / split / f"{res['image_id']}.jpg"
            (out / img_rel).parent.mkdir(parents=True, exist_ok=True)
            (out / img_rel).write_bytes(res["jpeg"])
            lbl = out / scene / "labels" / split / f"{res['image_id']}.txt"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            lbl.write_text(
                "".join(_yolo_line(a["box"], res["width"], res["height"]) + "\n" for a in res["annotations"])
            )
            c = coco.setdefault(
                (scene, split),
                {"images": [], "annotations": [], "categories": [{"id": 1, "name": "product"}]},
            )
            image_num = len(c["images"]) + 1
            c["images"].append(
                {
                    "id": image_num,
                    "file_name": str(img_rel),
                    "width": res["width"],
                    "height": res["height"],
                    "image_id": res["image_id"],
                    **res["meta"],
                }
            )
            for a in res["annotations"]:
                x1, y1, x2, y2 = a["box"]
                c["annotations"].append(
                    {
                        "id": len(c["annotations"]) + 1,
                        "image_id": image_num,
                        "category_id": 1,
                        "bbox": [x1, y1, round(x2 - x1, 1), round(y2 - y1, 1)],
                        "area": round((x2 - x1) * (y2 - y1), 1),
                        "iscrowd": 0,
                        **{k: v for k, v in a.items() if k != "box"},
                    }
                )
            for in_cat, pid, name, data in res["crops"]:
                p = out / ("crops" if in_cat else "novel") / split / pid / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                counts["crops" if in_cat else "novel_crops"] += 1
            if res["compliance"] is not None:
                compliance.append({**res["compliance"], "split": split, "file_name": str(img_rel)})
            counts[f"{scene}_images"] += 1
            counts["boxes"] += len(res["annotations"])
            if progress:
                progress(done, len(tasks))
    finally:
        if pool is not None:
            pool.shutdown()
    for (scene, split), c in sorted(coco.items()):
        _write_json(out / scene / "annotations" / f"{split}.json", c)
    _write_json(
        out / "shelf" / "compliance_gt.json",
        {
            "planogram_id": world.planogram.planogram_id,
            "planogram_version": world.planogram.version,
            "labels": [
                "correct",
                "misplaced_same_row",
                "wrong_shelf",
                "out_of_stock",
                "facing_count_mismatch",
            ],
            "unplanned_labels": ["extra_unplanned", "unknown_product"],
            "images": compliance,
        },
    )
    for name, scenes in (
        ("detection", ("shelf", "checkout")),
        ("shelf", ("shelf",)),
        ("checkout", ("checkout",)),
    ):
        lines = [f"path: {out.resolve()}"]
        for split in SPLITS:
            dirs = [f"{s}/images/{split}" for s in scenes if (out / s / "images" / split).is_dir()]
            if dirs:
                lines.append(f"{split}: [{', '.join(dirs)}]")
        lines += ["names:", "  0: product", ""]
        (out / f"{name}.yaml").write_text("\n".join(lines))
    summary = {
        "generator": "shelfloop.sim",
        "format_version": SIM_FORMAT_VERSION,
        "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()},
        "counts": {
            **counts,
            "skus": len(cat.skus),
            "families": len(cat.families()),
            "packaging_variants": sum(len(s.variants) - 1 for s in cat.skus),
            "novel_products": len(cat.novel),
            "bays": len(world.planogram.bays),
            "planned_slots": sum(len(r.slots) for b in world.planogram.bays for r in b.rows),
        },
        "compliance_labels": _label_counts(compliance),
        "fonts": [Path(p).name for p in font_paths()] or ["pillow-default"],
        "layout": "README.md",
    }
    _write_json(out / "world.json", summary)
    shutil.copyfile(Path(__file__).with_name("WORLD_README.md"), out / "README.md")
    return summary


def _label_counts(compliance: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for img in compliance:
        for s in img["slots"]:
            counts[s["label"]] = counts.get(s["label"], 0) + 1
        for u in img["unplanned"]:
            counts[u["label"]] = counts.get(u["label"], 0) + 1
    return dict(sorted(counts.items()))
