"""The synthetic world: determinism, standard formats, ground truth that agrees with itself, and the
hardness the issue asks for (look-alikes, variants, lighting, occlusion, unknowns)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import pytest

from planograms.schema import load as load_planogram
from shelfloop.sim.checks import check_yolo_dataset
from shelfloop.sim.generate import WorldSpec, generate, split_of

SLOT_LABELS = {"correct", "misplaced_same_row", "wrong_shelf", "out_of_stock", "facing_count_mismatch"}


def _digest(root: Path) -> dict[str, str]:
    # The Ultralytics YAMLs carry the absolute output path, which differs by design.
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".yaml"
    }


def test_same_seed_gives_identical_files_whatever_the_worker_count(small_world, small_spec, tmp_path):
    again = tmp_path / "again"
    generate(again, small_spec, workers=1)
    a, b = _digest(small_world), _digest(again)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert differing == []
    assert any(k.startswith("shelf/labels/") for k in a)


def test_another_seed_gives_another_world(small_world, small_spec, tmp_path):
    other = tmp_path / "other"
    spec = WorldSpec(
        **{**small_spec.__dict__, "seed": small_spec.seed + 1, "shelf_images": 3, "checkout_images": 0}
    )
    generate(other, spec, workers=1)
    assert (other / "catalogue.json").read_bytes() != (small_world / "catalogue.json").read_bytes()


def test_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        generate(tmp_path, WorldSpec(shelf_images=1, checkout_images=0), workers=1)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_yolo_labels_are_valid_and_match_coco(small_world):
    report = check_yolo_dataset(small_world / "detection.yaml")
    assert report.problems == []
    assert set(report.images) == {"train", "val", "test"}
    for scene in ("shelf", "checkout"):
        for split in ("train", "val", "test"):
            coco = json.loads((small_world / scene / "annotations" / f"{split}.json").read_text())
            per_image: dict[int, int] = {}
            for a in coco["annotations"]:
                per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
            for img in coco["images"]:
                file = small_world / img["file_name"]
                decoded = cv2.imread(str(file))
                assert decoded is not None and decoded.shape[:2] == (img["height"], img["width"])
                label = small_world / scene / "labels" / split / (Path(img["file_name"]).stem + ".txt")
                assert len(label.read_text().splitlines()) == per_image.get(img["id"], 0)


def test_crops_form_an_imagefolder_of_canonical_skus(small_world):
    catalogue = json.loads((small_world / "catalogue.json").read_text())
    sku_ids = {s["sku_id"] for s in catalogue["skus"]}
    novel_ids = {
        p["sku_id"] for p in json.loads((small_world / "novel_products.json").read_text())["products"]
    }
    assert not sku_ids & novel_ids
    for split in ("train", "val", "test"):
        classes = {p.name for p in (small_world / "crops" / split).iterdir()}
        assert classes and classes <= sku_ids
        for cls_dir in (small_world / "crops" / split).iterdir():
            for f in cls_dir.glob("*.jpg"):
                assert cv2.imread(str(f)) is not None
    assert {p.name for p in (small_world / "novel").glob("*/*")} <= novel_ids


def test_catalogue_is_made_of_look_alike_families_with_packaging_variants(small_world):
    skus = json.loads((small_world / "catalogue.json").read_text())["skus"]
    families: dict[str, list[dict]] = {}
    for s in skus:
        families.setdefault(s["family"], []).append(s)
        assert len(s["gtin"]) == 13 and s["gtin"].isdigit()
    assert all(len(members) >= 2 for members in families.values())
    for members in families.values():
        assert len({m["brand"] for m in members}) == 1
        assert len({(m["flavour"], m["size"]) for m in members}) == len(members)
    variants = [v for s in skus for v in s["variants"] if v["kind"] != "standard"]
    assert variants, "some SKUs must carry promo/seasonal/redesign packaging"
    for s in skus:
        for v in s["variants"]:
            assert (
                small_world / "catalogue" / "packshots" / s["sku_id"] / f"{v['variant_id']}.jpg"
            ).is_file()


def test_variant_facings_are_labelled_with_their_canonical_sku(small_world):
    seen = 0
    for split in ("train", "val", "test"):
        for scene in ("shelf", "checkout"):
            coco = json.loads((small_world / scene / "annotations" / f"{split}.json").read_text())
            for a in coco["annotations"]:
                if a["in_catalogue"] and a["variant_id"] != a["sku_id"]:
                    assert a["variant_id"].startswith(a["sku_id"] + ".")
                    seen += 1
    assert seen > 0


def test_planogram_validates_against_the_catalogue(small_world):
    sku_ids = [s["sku_id"] for s in json.loads((small_world / "catalogue.json").read_text())["skus"]]
    plan = load_planogram(small_world / "planograms.json", sku_ids)
    assert plan.bays and all(b.rows and any(r.slots for r in b.rows) for b in plan.bays)
    for bay in plan.bays:
        ids = [s.sku_id for r in bay.rows for s in r.slots]
        assert len(ids) == len(set(ids)), "a SKU is planned once per bay"


def test_compliance_ground_truth_is_consistent(small_world):
    plan = json.loads((small_world / "planograms.json").read_text())
    bays = {b["bay_id"]: b for b in plan["bays"]}
    gt = json.loads((small_world / "shelf" / "compliance_gt.json").read_text())
    labels_seen: set[str] = set()
    for img in gt["images"]:
        bay = bays[img["bay_id"]]
        planned = {(r["shelf_row"], s["slot_index"]) for r in bay["rows"] for s in r["slots"]}
        assert {(s["shelf_row"], s["slot_index"]) for s in img["slots"]} == planned
        for s in img["slots"]:
            assert s["label"] in SLOT_LABELS
            labels_seen.add(s["label"])
            if s["label"] == "out_of_stock":
                assert s["facings_found"] == 0 and s["boxes"] == [] and s["gap_boxes"]
            elif s["label"] == "correct":
                assert s["facings_found"] == s["facings_planned"]
                assert len(s["boxes"]) <= s["facings_planned"]
            elif s["label"] == "facing_count_mismatch":
                assert s["facings_found"] != s["facings_planned"]
        for u in img["unplanned"]:
            labels_seen.add(u["label"])
            assert (u["sku_id"] is None) == (u["label"] == "unknown_product")
        assert img["split"] == split_of(int(img["image_id"].split("-")[1]))
    assert {"correct", "out_of_stock", "misplaced_same_row", "wrong_shelf"} <= labels_seen


def test_conditions_cover_store_lighting_and_checkout_hardness(small_world):
    lightings, views, occluded, unknown = set(), set(), 0, 0
    for split in ("train", "val", "test"):
        shelf = json.loads((small_world / "shelf" / "annotations" / f"{split}.json").read_text())
        lightings |= {i["lighting"] for i in shelf["images"]}
        checkout = json.loads((small_world / "checkout" / "annotations" / f"{split}.json").read_text())
        lightings |= {i["lighting"] for i in checkout["images"]}
        for a in checkout["annotations"]:
            views.add(a["view"])
            occluded += a["occluded"] > 0.05
            unknown += not a["in_catalogue"]
        assert any(a["truncated"] for a in shelf["annotations"]) or split != "train"
    assert len(lightings) >= 4 and "dim_fridge" in lightings
    assert views == {"front", "back"}
    assert occluded > 0 and unknown > 0
