"""The `shelfloop` command: one group per component.

Each group imports its component only when one of its commands runs, so `shelfloop --help` is fast and
an edge-only install never loads cloud or training code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from shelfloop import __version__

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
    help="Evaluation of recognition, detection and planogram compliance against ground truth. "
    "No evaluation commands are shipped yet.",
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
    out: Annotated[Path, typer.Option(help="Where the demo writes its synthetic store.")] = Path("var/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the synthetic store.")] = 7,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete a previous demo store first.")] = False,
) -> None:
    """Run the ShelfLoop demo on embedded defaults.

    Today it builds a synthetic store (catalogue with look-alike families, planograms, shelf and checkout
    photos with faults), sends uncertain crops through the wire contract, and prints what happened and where
    to look. The loop through the broker, the cloud and annotation grows here as it is built."""
    from shelfloop.demo import run_demo

    sys.exit(run_demo(out, seed=seed, fresh=fresh))


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
