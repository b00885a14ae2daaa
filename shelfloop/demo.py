"""`shelfloop demo`: the main job on embedded defaults, grown step by step into the full loop.

Now: build a synthetic store and push its product crops through the wire contract as a device would.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from shelfloop import contract
from shelfloop.sim.generate import WorldSpec, generate


def run_demo(out: Path, seed: int = 7, fresh: bool = False) -> int:
    world = out / "world"
    if fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    if not (world / "world.json").is_file():
        if world.exists():
            shutil.rmtree(world)  # a half-written world from an interrupted run
        typer.echo(f"[1/3] generating a synthetic store in {world} (seed {seed}) ...")
        spec = WorldSpec(seed=seed, shelf_images=60, checkout_images=40)

        def progress(done: int, total: int) -> None:
            if done % 20 == 0 or done == total:
                typer.echo(f"      rendered {done}/{total} images")

        generate(world, spec, progress=progress)
    else:
        typer.echo(f"[1/3] reusing the synthetic store in {world} (--fresh to rebuild)")
    summary = json.loads((world / "world.json").read_text())
    c = summary["counts"]
    cat = json.loads((world / "catalogue.json").read_text())
    fam: dict[str, list[str]] = {}
    for s in cat["skus"]:
        fam.setdefault(s["family"], []).append(s["sku_id"])
    biggest = max(fam.items(), key=lambda kv: len(kv[1]))

    typer.echo("[2/3] the store")
    typer.echo(
        f"      catalogue: {c['skus']} SKUs in {c['families']} look-alike families, "
        f"{c['packaging_variants']} packaging variants; {c['novel_products']} products not in it"
    )
    typer.echo(
        f"      e.g. family {biggest[0]}: {', '.join(biggest[1][:4])}{' ...' if len(biggest[1]) > 4 else ''}"
    )
    typer.echo(f"      planogram: {c['bays']} bays, {c['planned_slots']} planned slots")
    typer.echo(
        f"      photos: {c['shelf_images']} shelf, {c['checkout_images']} checkout, {c['boxes']} labelled "
        f"products, {c['crops']} SKU crops"
    )
    typer.echo(
        "      compliance faults in the shelf photos: "
        + ", ".join(f"{k} {v}" for k, v in summary["compliance_labels"].items() if k != "correct")
    )

    typer.echo("[3/3] test-split crops through the wire contract (no models yet: sent as audit samples)")
    sent = rejected = 0
    total_bytes = 0
    for path in sorted((world / "crops" / "test").rglob("*.jpg"))[:200]:
        jpeg = path.read_bytes()
        dims = contract.jpeg_dimensions(jpeg)
        msg = contract.UncertainCrop(
            crop_id=contract.new_crop_id(),
            store_id="demo-store",
            device_id="demo-edge-1",
            camera_id="cam-1",
            captured_at=datetime.now(UTC),
            source="shelf",
            model_version="none",
            gallery_version="none",
            detector_confidence=1.0,
            box=contract.BoundingBox(x1=0, y1=0, x2=dims[1], y2=dims[0]),
            frame_width=dims[1],
            frame_height=dims[0],
            candidates=[],
            reasons=["audit_sample"],
            priority=10,
            margin=None,
            novelty=None,
            jpeg=jpeg,
        )
        try:
            payload = contract.encode(msg)
            back = contract.decode(payload, expect=contract.UncertainCrop)
        except contract.ContractError as exc:
            rejected += 1
            typer.echo(f"      rejected {path.name}: {exc}")
            continue
        assert back == msg
        sent += 1
        total_bytes += len(payload)
    topic = contract.uplink_topic("demo-store", "demo-edge-1", contract.KIND_CROP)
    avg = total_bytes / max(1, sent) / 1024
    typer.echo(
        f"      {sent} crops encoded and decoded intact on {topic} (mean {avg:.1f} KiB each), "
        f"{rejected} rejected"
    )

    typer.echo(f"\ndone in {time.perf_counter() - t0:.1f}s. Where to look:")
    typer.echo(f"  {world}/README.md                  the layout of every file")
    typer.echo(f"  {world}/shelf/images/test/         shelf photos (YOLO labels beside, in shelf/labels/)")
    typer.echo(f"  {world}/shelf/compliance_gt.json   what is wrong on each shelf")
    typer.echo(f"  {world}/crops/train/               SKU crops as an ImageFolder")
    typer.echo(f"  shelfloop sim describe {world}")
    return 0 if rejected == 0 else 1
