"""`shelfloop demo`: the whole loop on one machine, on embedded defaults.

A synthetic store; a private Mosquitto on loopback; the cloud (SQLite, a local object store, an ingest
worker on the shared subscription); an edge agent running the shipped models on the store's shelf and
checkout cameras, routing uncertain crops through its durable outbox; crops arriving in the annotation
queue and compliance snapshots in the merchandiser reports. Everything it writes stays under `--out`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer
import yaml

from shelfloop.sim.generate import WorldSpec, generate

STORE_ID, DEVICE_ID = "demo-store", "demo-edge-1"
ADMIN, ADMIN_PASSWORD = "admin", "shelfloop-demo"


def _world(out: Path, seed: int, fresh: bool) -> Path:
    world = out / "world"
    if fresh and out.exists():
        shutil.rmtree(out)
    if (world / "world.json").is_file():
        typer.echo(f"[1/5] reusing the synthetic store in {world} (--fresh to rebuild)")
        return world
    if world.exists():
        shutil.rmtree(world)  # a half-written world from an interrupted run
    typer.echo(f"[1/5] generating a synthetic store in {world} (seed {seed}) ...")

    def progress(done: int, total: int) -> None:
        if done % 25 == 0 or done == total:
            typer.echo(f"      rendered {done}/{total} images")

    generate(world, WorldSpec(seed=seed, shelf_images=60, checkout_images=40), progress=progress)
    return world


def _cameras(world: Path, out: Path) -> list[dict]:
    """One shelf camera per bay (the held-out photos of that bay) and one checkout camera."""
    gt = json.loads((world / "shelf" / "compliance_gt.json").read_text())
    cams_dir = out / "cameras"
    if cams_dir.exists():
        shutil.rmtree(cams_dir)
    by_bay: dict[str, list[Path]] = {}
    for item in gt["images"]:
        if item["split"] in ("val", "test"):
            by_bay.setdefault(item["bay_id"], []).append(world / item["file_name"])
    cameras = []
    for bay_id, files in sorted(by_bay.items()):
        d = cams_dir / bay_id
        d.mkdir(parents=True)
        for f in files:
            (d / f.name).symlink_to(f.resolve())
        cameras.append(
            {
                "camera_id": f"cam-{bay_id}",
                "source": str(d),
                "role": "shelf",
                "bay_id": bay_id,
                "interval_s": 0.001,
            }
        )
    d = cams_dir / "checkout"
    d.mkdir(parents=True)
    for f in sorted((world / "checkout" / "images" / "test").glob("*.jpg")):
        (d / f.name).symlink_to(f.resolve())
    cameras.append({"camera_id": "till-1", "source": str(d), "role": "checkout"})
    return cameras


def run_demo(out: Path, seed: int = 202, fresh: bool = False, serve: bool = False, port: int = 8000) -> int:
    from cloud_api import catalogue as cat
    from cloud_api import models as m
    from cloud_api.ingest import IngestWorker
    from cloud_api.reports.directory import put_planogram, write_directory
    from edge_agent.agent import Pipeline, build_agent
    from models.evaluate import build_gallery, image_folder
    from models.loader import load_gallery, load_model_bundle
    from planograms import schema
    from shelfloop.broker import private_mosquitto
    from shelfloop.settings import Settings

    t0 = time.perf_counter()
    out = Path(out).resolve()
    world = _world(out, seed, fresh)
    summary = json.loads((world / "world.json").read_text())
    c = summary["counts"]
    typer.echo(
        f"      {c['skus']} SKUs in {c['families']} look-alike families, {c['bays']} bays, "
        f"{c['shelf_images']} shelf + {c['checkout_images']} checkout photos"
    )

    typer.echo("[2/5] loading the shipped models (signature and file hashes verified)")
    mb = load_model_bundle()
    skus = {s["sku_id"] for s in json.loads((world / "catalogue.json").read_text())["skus"]}
    gallery = load_gallery(embedder=mb.embedder)
    if not skus <= set(gallery.skus):  # another seed: a new catalogue needs reference images, not weights
        cal = {k: v for k, v in mb.calibration.items() if k != "fitted_on"}
        refs = image_folder(world / "catalogue" / "packshots") + image_folder(world / "crops" / "train")
        gallery = build_gallery(mb.embedder, refs, f"demo-{seed}", **cal)
        typer.echo(
            f"      built gallery {gallery.version} from {len(refs)} reference images of this catalogue"
        )
    typer.echo(
        f"      model {mb.version}, gallery {gallery.version} ({len(gallery.skus)} SKUs), "
        f"detector on {mb.detector.backend.device}"
    )

    cameras = _cameras(world, out)
    plan_path = world / "planograms.json"
    plan = schema.load(plan_path)
    for stale in ("cloud.db", "cloud.db-wal", "cloud.db-shm", "objects", "edge", "broker"):
        p = out / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    typer.echo(
        "[3/5] starting a private Mosquitto and the cloud (SQLite + local object store + ingest worker)"
    )
    with private_mosquitto(out / "broker") as mqtt_port:
        cfg = {
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
            "database": {"url": f"sqlite:///{out / 'cloud.db'}"},
            "storage": {"backend": "local", "local_dir": str(out / "objects")},
            "cloud": {
                "api_host": "127.0.0.1",
                "api_port": port,
                "bootstrap_admin": ADMIN,
                "bootstrap_admin_password": ADMIN_PASSWORD,
            },
            "edge": {
                "store_id": STORE_ID,
                "device_id": DEVICE_ID,
                "data_dir": str(out / "edge"),
                "planogram": str(plan_path),
                "catalogue": str(world / "catalogue.json"),
                "cameras": cameras,
                # a demo compresses a store's day into a minute: a larger quota than a device's default
                "routing": {"per_minute": 150, "per_hour": 1000},
            },
        }
        settings = Settings(**cfg)
        worker = IngestWorker.from_settings(settings)
        worker.start()
        ing = worker.ingestor
        with ing.db.session() as s:
            cat.import_json(s, json.loads((world / "catalogue.json").read_text()), actor="demo")
            if s.get(m.Store, STORE_ID) is None:
                s.add(m.Store(store_id=STORE_ID, name="Demo Supermarket"))
        write_directory(ing.store, {STORE_ID: {"name": "Demo Supermarket", "region": "Demo"}})
        put_planogram(ing.store, plan, f"{plan.planogram_id}:{plan.version}")

        typer.echo(f"[4/5] edge agent {DEVICE_ID}: {len(cameras) - 1} shelf cameras + 1 checkout camera")
        pipeline = Pipeline(mb.detector, mb.recognizer(gallery), mb.version, gallery.version)
        agent, outbox, uplink = build_agent(settings, pipeline=pipeline)
        uplink.start()
        last = time.perf_counter()
        while not agent.exhausted:
            agent.step()
            if time.perf_counter() - last > 2:
                last = time.perf_counter()
                st = uplink.stats()
                typer.echo(
                    f"      {agent.frames} frames, {agent.router.routed} uncertain crops routed, "
                    f"{st.acks} acked by the cloud, outbox {outbox.stats().depth}"
                )
        agent.flush()
        agent.send_heartbeat()
        drained = uplink.wait_drained(60)
        st, ob = uplink.stats(), outbox.stats()
        uplink.stop(drain_timeout_s=2)
        time.sleep(0.5)
        worker.stop()
        with ing.db.session() as s:

            def count(model) -> int:
                return s.query(model).count()

            stored = {
                "crops": count(m.Crop),
                "tasks": count(m.AnnotationTask),
                "snapshots": count(m.ComplianceSnapshotRow),
                "checkout_items": count(m.CheckoutItemRow),
                "dead_letters": count(m.DeadLetter),
            }
        outbox.close()
        for cam in agent.cameras:
            cam.source.close()

    cloud_yaml = out / "cloud.yaml"
    cloud_yaml.write_text(
        yaml.safe_dump(
            {k: v for k, v in cfg.items() if k in ("database", "storage", "cloud")}, sort_keys=False
        )
    )
    typer.echo("[5/5] what happened")
    typer.echo(
        f"      edge: {agent.frames} frames; {agent.router.routed} uncertain crops routed to annotation, "
        f"{agent.router.deduplicated} near-duplicates not sent, {agent.router.over_quota} over quota; "
        f"{st.published} publishes ({st.resent} resends), {st.acks} acks; outbox "
        f"{'drained' if drained else f'still holds {ob.depth}'}"
    )
    typer.echo(
        f"      cloud: {stored['crops']} crops stored, {stored['tasks']} annotation tasks queued, "
        f"{stored['snapshots']} compliance snapshots, {stored['checkout_items']} checkout items, "
        f"{stored['dead_letters']} dead letters"
    )
    typer.echo(f"\ndone in {time.perf_counter() - t0:.0f}s. Where to look:")
    base = f"http://127.0.0.1:{port}"
    typer.echo(f"  shelfloop cloud serve --config {cloud_yaml}   then open {base}/app/stores/{STORE_ID}")
    typer.echo(f"    (sign in as {ADMIN} / {ADMIN_PASSWORD}; the annotation queue is at {base}/docs)")
    typer.echo(f"  {world}/README.md   the synthetic store's files")
    typer.echo(f"  {out}/cloud.db, {out}/objects   the cloud's data")
    if serve:
        import uvicorn

        from cloud_api.main import create_app

        typer.echo(f"\nserving the reports at {base}/app/stores/{STORE_ID} (Ctrl-C to stop)")
        uvicorn.run(
            create_app(Settings(**{k: v for k, v in cfg.items() if k != "edge"})),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    ok = drained and stored["crops"] > 0 and stored["snapshots"] > 0 and stored["dead_letters"] == 0
    return 0 if ok else 1
