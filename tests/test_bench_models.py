"""`shelfloop bench models`: both sides really run, take turns, and the edge side never imports torch.
Needs the `train` extra (the PyTorch side is Ultralytics); skipped without it."""

from __future__ import annotations

import json

import pytest
from conftest import shipped_recognizer_in_int8
from typer.testing import CliRunner

from shelfloop.cli import app

pytestmark = pytest.mark.train


INT8_RECOGNIZER = shipped_recognizer_in_int8()


@pytest.mark.parametrize(
    ("backend", "device", "recognizer_device"),
    [
        ("onnxruntime", "CPUExecutionProvider", "CPUExecutionProvider"),
        (
            "openvino",
            "OpenVINO CPU fp32",
            "OpenVINO CPU fp32 with int8 convolutions" if INT8_RECOGNIZER else "OpenVINO CPU fp32",
        ),
    ],
)
def test_bench_models_interleaves_rounds_of_both_sides(
    small_world, tmp_path, monkeypatch, backend, device, recognizer_device
):
    pytest.importorskip("ultralytics", reason="the train extra (ultralytics) is not installed")
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is the optional `intel` extra")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "models",
        "--world",
        str(small_world),
        "--images",
        "2",
        "--repeats",
        "3",
        "--backend",
        backend,
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["rounds"] == 3 and r["images"] == 2
    assert r["provider"] == device and r["recognizer_provider"] == recognizer_device
    for part in ("detector", "recognizer"):
        assert r[part]["edge"]["n"] == r[part]["ultralytics_pytorch"]["n"]
        assert len(r[part]["speedup_per_round"]) == 3 and min(r[part]["speedup_per_round"]) > 0
    assert r["detector"]["edge"]["n"] == 2 * 3  # every frame in every round
    assert r["memory"]["edge_imports_torch"] is False
    assert 0 < r["memory"]["edge_peak_rss_mb"] < r["memory"]["pytorch_peak_rss_mb"]
    assert "rounds x" in result.output
