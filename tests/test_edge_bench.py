"""`shelfloop bench edge` on small signed test models: the figures exist and are sane (not timed here)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from test_edge_run import signed_models, write_frames
from typer.testing import CliRunner

from edge_agent.agent import Pipeline
from edge_agent.bench import run
from models.loader import default_trusted_keys, load_gallery, load_model_bundle
from planograms.compliance import synthetic_bay
from planograms.schema import Planogram
from shelfloop import contract as c
from shelfloop.cli import app


def test_the_bench_reports_both_pipelines_and_the_overhead(tmp_path: Path) -> None:
    model, gallery, pub = signed_models(tmp_path / "models")
    keys = default_trusted_keys([pub])
    mb = load_model_bundle(model, keys)
    pipeline = Pipeline(mb.detector, mb.recognizer(load_gallery(gallery, keys)), "m-1", "g-1")
    frames = sorted(write_frames(tmp_path / "frames", 4).glob("*.jpg"))
    r = run(pipeline, frames, frames, repeats=2, compare_ultralytics=False)
    for role in ("shelf", "checkout"):
        assert r[role]["frames"] == 8 and r[role]["frames_per_s"] > 0
        assert {"decode", "pre", "infer", "post", "recognise", "route"} <= set(r[role]["stages"])
        assert 0.0 <= r[role]["overhead_fraction"] < 1.0
    assert "track" in r["checkout"]["stages"]
    assert 0.0 <= r["overhead_fraction"] < 1.0 and r["speedup_vs_ultralytics"] is None
    assert mb.embedder.backend.__class__.__name__ != "_TimedBackend"  # the wrapper is removed again


def test_bench_edge_command_writes_the_json(tmp_path: Path) -> None:
    model, gallery, pub = signed_models(tmp_path / "models")
    world = tmp_path / "world"
    bay, _ = synthetic_bay(n_facings=12, rows=2)
    plan = Planogram(
        planogram_id="p", version="1", store_format="s", effective_from=c.utc_now().date(), bays=[bay]
    )
    (world / "shelf").mkdir(parents=True)
    (world / "planograms.json").write_bytes(msgspec.json.encode(plan))
    shelf = write_frames(world / "shelf" / "images" / "test", 2)
    write_frames(world / "checkout" / "images" / "test", 2)
    gt = {"images": [{"image_id": p.stem, "bay_id": bay.bay_id} for p in shelf.glob("*.jpg")]}
    (world / "shelf" / "compliance_gt.json").write_text(json.dumps(gt))
    out = tmp_path / "bench.json"
    args = ["bench", "edge", "--bundle", str(model), "--gallery", str(gallery), "--trusted-key", str(pub)]
    args += ["--world", str(world), "--frames", "2", "--repeats", "1", "--no-ultralytics", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert {"overhead_fraction", "speedup_vs_ultralytics", "shelf", "checkout"} <= set(figures)
    assert "compliance" in figures["shelf"]["stages"]
    assert "overhead_fraction" in result.output
