"""The `shelfloop` command as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shelfloop.cli import app

runner = CliRunner()
GROUPS = ["sim", "edge", "cloud", "retrain", "eval", "bench", "demo", "config"]


def test_console_script_lists_every_group():
    exe = Path(sys.executable).with_name("shelfloop")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "shelfloop.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for group in GROUPS:
        assert f" {group} " in out


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_help(group):
    result = runner.invoke(app, [group, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_generate_describe_and_check_dataset(tmp_path):
    out = tmp_path / "w"
    result = runner.invoke(
        app,
        [
            "sim",
            "generate",
            "--out",
            str(out),
            "--seed",
            "3",
            "--skus",
            "12",
            "--shelf-images",
            "3",
            "--checkout-images",
            "2",
            "--bays",
            "2",
            "--workers",
            "1",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "12 SKUs" in result.output
    described = runner.invoke(app, ["sim", "describe", str(out)])
    assert described.exit_code == 0 and "look-alike families" in described.output
    ok = runner.invoke(app, ["retrain", "check-dataset", str(out / "detection.yaml")])
    assert ok.exit_code == 0 and "dataset OK" in ok.output
    # A corrupted label and a corrupted image are both caught.
    label = next((out / "shelf" / "labels" / "train").glob("*.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 1.7 0.2\n")
    image = next((out / "checkout" / "images" / "train").glob("*.jpg"))
    image.write_bytes(b"\xff\xd8\xff garbage")
    bad = runner.invoke(app, ["retrain", "check-dataset", str(out / "detection.yaml")])
    assert bad.exit_code == 1
    assert "outside the image" in bad.output or "width/height" in bad.output
    assert "does not decode" in bad.output


def test_generate_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("keep")
    result = runner.invoke(app, ["sim", "generate", "--out", str(tmp_path), "--shelf-images", "1"])
    assert result.exit_code == 2
    assert "not empty" in result.output


def test_edge_topics_and_cloud_acl():
    topics = runner.invoke(app, ["edge", "topics", "--store", "s1", "--device", "d1"])
    assert topics.exit_code == 0
    assert "publish   shelfloop/v1/s1/d1/up/crop" in topics.output
    acl = runner.invoke(app, ["cloud", "acl", "--store", "s1", "--device", "d1"])
    assert acl.exit_code == 0 and "user d1" in acl.output
    bad = runner.invoke(app, ["edge", "topics", "--store", "s1", "--device", "d/1"])
    assert bad.exit_code == 2


def test_config_check_names_the_bad_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mqtt:\n  port: abc\n")
    result = runner.invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 2
    assert "mqtt.port" in result.output
    cfg.write_text("mqtt:\n  port: 1884\n  password: s3cret\n")
    assert runner.invoke(app, ["config", "check", str(cfg)]).exit_code == 0
    shown = runner.invoke(app, ["config", "show", "--config", str(cfg)])
    assert "port: 1884" in shown.output and "s3cret" not in shown.output


def test_bench_contract_reports_ratios_against_its_baseline(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "contract", "--n", "50", "--crop-kb", "20", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["contract"]["bytes"] < figures["json_base64"]["bytes"]
    assert figures["size_ratio"] > 0 and figures["encode_speedup"] > 0 and figures["decode_speedup"] > 0


@pytest.mark.broker
def test_demo_runs_the_loop_on_embedded_defaults(tmp_path, monkeypatch):
    """The README's main command: crops reach the annotation queue and snapshots the reports."""
    import re

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    stored = re.search(
        r"cloud: (\d+) crops stored, (\d+) annotation tasks queued, (\d+) compliance snapshots, "
        r"(\d+) checkout items, (\d+) dead letters",
        result.output,
    )
    assert stored, result.output
    crops, tasks, snapshots, items, dead = map(int, stored.groups())
    assert crops > 0 and tasks == crops and snapshots > 0 and items > 0 and dead == 0
    assert "outbox drained" in result.output
    assert "/app/stores/demo-store" in result.output
    assert (tmp_path / "demo" / "cloud.yaml").is_file()
    again = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert again.exit_code == 0 and "reusing" in again.output
    shutil.rmtree(tmp_path / "demo")


def _grocery_like(root: Path, kiwi: bool = False, new_in_val: bool = True) -> None:
    """A Grocery Store layout (classes.csv, train.txt, val.txt) of drawn patterns: Cantaloupe has a first
    train photo (big green circles) unlike its later ones and its val photos (small blue circles), which sit
    nearer Lemon's small yellow circles than that first photo, and it nearer them than Kiwi's lines (mean
    cosine 0.68 / 0.39 / 0.14 with recognizer 1.3.0, 0.32 / 0.22 / 0.01 with 1.4.0). `kiwi` adds Kiwi as a
    second class; `new_in_val=False` leaves Cantaloupe out of val."""
    import cv2
    import numpy as np

    def pattern(kind: str, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        img = np.zeros((160, 120, 3), np.uint8)
        if kind == "stripes":
            for y in range(0, 160, 16):
                img[y : y + 6] = (40, 200, 230)
        elif kind in ("circles", "lemons", "melons"):  # small blue, small yellow, big green
            colour, radius, step = {
                "circles": ((200, 60, 20), 14, 40),
                "lemons": ((20, 200, 230), 14, 40),
                "melons": ((40, 180, 40), 24, 60),
            }[kind]
            for y in range(step // 2, 160, step):
                for x in range(step // 2, 120, step):
                    cv2.circle(img, (x, y), radius, colour, -1)
        else:
            img[:] = (40, 90, 110)
            for x in range(0, 120, 10):
                cv2.line(img, (x, 0), (x, 159), (255, 255, 255), 2)
        noise = rng.integers(-6, 7, img.shape)
        return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)

    base = root / "dataset"
    classes = {
        "Banana": ["stripes"] * 4,
        "Cantaloupe": ["melons", "circles", "circles", "circles"],
        "Lemon": ["lemons"] * 4,
    }
    val = {"Banana": ["stripes"], "Cantaloupe": ["circles", "circles"], "Lemon": ["lemons"]}
    if not new_in_val:
        val["Cantaloupe"] = []
    if kiwi:
        classes["Kiwi"], val["Kiwi"] = ["lines"] * 4, ["lines"]
    rows = ["Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int)"]
    for cid, name in enumerate(classes):
        rows.append(f"{name},{cid},{name},{cid}")
        for split, kinds in (("train", classes[name]), ("val", val[name])):
            for i, kind in enumerate(kinds):
                rel = f"{split}/Fruit/{name}/{name}_{i:03d}.jpg"
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(
                    str(base / rel), pattern(kind, seed=cid * 100 + i + (50 if split == "val" else 0))
                )
                with (base / f"{split}.txt").open("a") as f:
                    f.write(f"{rel}, {cid}, {cid}\n")
    (base / "classes.csv").write_text("\n".join(rows) + "\n")


def _eval_grocery(tmp_path: Path, *options: str, **layout: bool) -> tuple[str, dict]:
    """`eval grocery` with one reference per new SKU on a `_grocery_like` data set: its output and JSON.
    Cantaloupe (and Kiwi) are named as the new SKUs, so the figures do not hang on which classes the shipped
    bundle happened to be kept from."""
    _grocery_like(tmp_path / "gs", **layout)
    out = tmp_path / "grocery.json"
    new = ["--new-sku-classes", "gs:Cantaloupe"]
    if layout.get("kiwi"):
        new += ["--new-sku-classes", "gs:Kiwi"]
    args = ["eval", "grocery", "--root", str(tmp_path / "gs"), "--new-sku-refs", "1", *new, *options]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_eval_grocery_separates_few_references_from_the_features(tmp_path):
    _, r = _eval_grocery(tmp_path)
    assert r["new_sku_classes"] and "gs:Cantaloupe" in r["new_sku_classes"]
    assert r["gallery_references"] == 4 + 1 + 4  # Cantaloupe's first photo only
    assert r["new_sku_queries"] == 2
    # Its val photos look like its later train photos: every reference finds them, the first one alone not.
    assert r["new_sku_top1_all_references"] == 1.0
    assert r["new_sku_top1"] < r["new_sku_top1_all_references"]


def test_eval_grocery_flags_a_new_sku_the_bundle_was_trained_on_and_refuses_an_unknown_one(tmp_path):
    _grocery_like(tmp_path / "gs")
    args = ["eval", "grocery", "--root", str(tmp_path / "gs"), "--new-sku-refs", "1"]
    out = tmp_path / "grocery.json"
    # Every shipped recognizer trained on the Grocery photos saw Banana: scored, but not called a new SKU.
    result = runner.invoke(app, [*args, "--new-sku-classes", "gs:Banana", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "was trained on gs:Banana" in result.output
    r = json.loads(out.read_text())
    assert r["new_sku_classes"] == r["new_sku_classes_trained_on"] == ["gs:Banana"]
    assert r["gallery_references"] == 1 + 4 + 4  # Banana's first photo only
    typo = runner.invoke(app, [*args, "--new-sku-classes", "gs:Cantalope"])
    assert typo.exit_code != 0 and "gs:Cantalope" in typo.output and "not a class" in typo.output


def test_eval_grocery_shows_what_confusion_with_trained_skus_costs_the_new_ones(tmp_path):
    output, r = _eval_grocery(tmp_path, "--draws", "4", kiwi=True)
    assert "2 new-SKU classes" in output  # the two named
    # Cantaloupe's val photos go to a trained SKU when every SKU competes, to Cantaloupe among the new ones.
    assert r["per_class"]["gs:Cantaloupe"]["correct"] == 0 and r["per_class"]["gs:Kiwi"]["correct"] == 1
    assert r["new_sku_top1"] == 1 / 3 and r["new_sku_top1_among_new"] == 1.0
    among, every_sku = r["draws"]["new_sku_top1_among_new"], r["draws"]["new_sku_top1"]
    assert among["min"] >= every_sku["min"] and among["mean"] >= every_sku["mean"]


def test_eval_grocery_draws_show_how_the_new_sku_figure_moves_with_the_references(tmp_path):
    output, r = _eval_grocery(tmp_path, "--draws", "8")
    drawn = r["draws"]["new_sku_top1"]
    assert r["draws"]["n"] == 8 and "new_sku_top1 over 8 draws" in output
    # Cantaloupe's first photo (checks) finds none of its val photos (circles); a draw of a circle photo does.
    assert r["new_sku_top1"] == drawn["min"] == 0.0
    assert drawn["max"] == 1.0 and 0.0 < drawn["mean"] < 1.0
    assert r["draws"]["top1"]["min"] <= r["draws"]["top1"]["mean"] <= r["draws"]["top1"]["max"]


def test_eval_grocery_draws_say_n_a_where_no_val_photo_is_of_a_new_sku(tmp_path):
    """References are drawn for the new SKUs, but no query is theirs: n/a, not a crash or a made-up 0."""
    output, r = _eval_grocery(tmp_path, "--draws", "3", new_in_val=False)
    assert r["new_sku_queries"] == 0 and r["new_sku_top1"] is None
    assert r["draws"]["new_sku_top1"] is None and r["draws"]["new_sku_top1_among_new"] is None
    assert r["draws"]["top1"]["min"] == r["draws"]["top1"]["max"] == r["top1"]  # no new-SKU query moves
    assert "new_sku_top1 over 3 draws" in output and "n/a" in output


def test_eval_grocery_scores_by_blend_and_refuses_a_scoring_it_does_not_know(tmp_path):
    output, r = _eval_grocery(tmp_path, "--scoring", "blend", kiwi=True)
    assert r["scoring"] == "blend" and r["queries"] == 5 and r["gallery_skus"] == 4
    assert "new_sku_top1" in output
    refused = runner.invoke(app, ["eval", "grocery", "--root", str(tmp_path / "gs"), "--scoring", "vote"])
    assert refused.exit_code == 2
    assert "--scoring 'vote'" in refused.output and "nearest, blend" in refused.output


def test_retrain_gallery_signs_blend_weights_that_the_loader_verifies(tmp_path):
    from models.bundle import generate_signing_key, trusted_key_of
    from models.errors import BundleError
    from models.loader import load_gallery

    _grocery_like(tmp_path / "gs")
    key = tmp_path / "key.pem"
    generate_signing_key(key)
    out = tmp_path / "gallery"
    args = ["retrain", "gallery", "--bundle", "models/baseline/model", "--references"]
    args += [str(tmp_path / "gs" / "dataset" / "train" / "Fruit"), "--out", str(out), "--version", "t-1"]
    made = runner.invoke(app, [*args, "--signing-key", str(key), "--scoring", "blend"])
    assert made.exit_code == 0, made.output
    gallery = load_gallery(out, trusted_key_of(key))
    assert gallery.scoring == "blend" and gallery.sku_weights.shape == (3, 256)
    weights = out / "sku_weights.npy"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated after signing
    with pytest.raises(BundleError, match=r"sku_weights\.npy"):
        load_gallery(out, trusted_key_of(key))


def test_retrain_metrics_records_figures_and_re_signs_only_an_intact_bundle(tmp_path):
    from models.bundle import generate_signing_key, sign_bundle, trusted_key_of, verify_bundle

    key = tmp_path / "key.pem"
    generate_signing_key(key)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "detector.onnx").write_bytes(b"weights")
    sign_bundle(bundle, {"name": "b", "kind": "model", "version": "1", "metrics": {}}, key)
    report = tmp_path / "detection.json"
    report.write_text(json.dumps({"map50": 0.98, "map50_95": 0.79, "images": 15, "per_image": [1, 2]}))
    ok = runner.invoke(
        app,
        [
            "retrain",
            "metrics",
            "--bundle",
            str(bundle),
            "--add",
            f"detection={report}",
            "--signing-key",
            str(key),
        ],
    )
    assert ok.exit_code == 0, ok.output
    manifest = verify_bundle(bundle, trusted_key_of(key)).manifest  # signed again, still verifies
    assert manifest["metrics"] == {
        "detection": {"map50": 0.98, "map50_95": 0.79, "images": 15, "source": "detection.json"}
    }
    bad = runner.invoke(
        app, ["retrain", "metrics", "--bundle", str(bundle), "--add", "detection", "--signing-key", str(key)]
    )
    assert bad.exit_code == 2 and "NAME=FILE" in bad.output
    (bundle / "detector.onnx").write_bytes(b"tampered")
    before = (bundle / "manifest.json").read_bytes()
    refused = runner.invoke(
        app,
        ["retrain", "metrics", "--bundle", str(bundle), "--add", f"d2={report}", "--signing-key", str(key)],
    )
    assert refused.exit_code == 2 and "cannot add metrics" in refused.output
    assert (bundle / "manifest.json").read_bytes() == before  # a tampered bundle is never signed anew


def test_eval_compliance_scores_one_world_with_the_models(small_world, tmp_path):
    out = tmp_path / "one.json"
    args = ["eval", "compliance", "--dataset", str(small_world), "--split", "test", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["dataset"] == str(small_world) and "worlds" not in figures
    assert figures["slots"] > 0 and 0.5 < figures["macro_f1"] <= 1.0
    assert f"macro-F1 {figures['macro_f1']:.4f}" in result.output


def test_eval_compliance_pools_several_worlds(small_world, tmp_path):
    out = tmp_path / "both.json"
    args = ["eval", "compliance", "--dataset", str(small_world), "--dataset", str(small_world)]
    result = runner.invoke(app, [*args, "--split", "all", "--ground-truth-detections", "--json", str(out)])
    assert result.exit_code == 0, result.output
    pooled = json.loads(out.read_text())
    first, second = pooled["worlds"]
    assert first["macro_f1"] == second["macro_f1"] == pytest.approx(pooled["macro_f1"])
    assert pooled["slots"] == 2 * first["slots"]
    assert pooled["out_of_stock_support"] == 2 * first["per_label"]["out_of_stock"]["support"] > 0
    assert "2 worlds: mean macro-F1" in result.output


def test_pooled_compliance_weighs_worlds_equally_and_slots_for_out_of_stock():
    from shelfloop.cli import _pooled_compliance

    def world(f1: float, oos_recall: float, oos_slots: int) -> dict:
        per_label = {"out_of_stock": {"recall": oos_recall, "support": oos_slots}}
        return {"macro_f1": f1, "per_label": per_label, "images": 2, "slots": 10}

    pooled = _pooled_compliance([world(0.9, 1.0, 3), world(0.8, 0.5, 2)])
    assert pooled["macro_f1"] == pytest.approx(0.85)
    assert pooled["out_of_stock_recall"] == pytest.approx(4 / 5)  # 3 of 3 and 1 of 2, not (1.0 + 0.5) / 2
    assert pooled["out_of_stock_support"] == 5 and pooled["images"] == 4 and pooled["slots"] == 20
