"""The recognizer recipe's frozen layers: what `--frozen-blocks` keeps at ImageNet weights and statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the train extra is not installed")
pytest.importorskip("efficientnet_lite_pytorch", reason="the train extra is not installed")


@pytest.mark.parametrize("frozen", [0, 3])
def test_frozen_blocks_keep_their_weights_and_batch_norm_statistics(frozen):
    from retrain.recognizer import build_model

    net = build_model(32, frozen)
    blocks = net.backbone._blocks
    net.train()
    for k, block in enumerate(blocks):
        trainable = any(p.requires_grad for p in block.parameters())
        assert trainable == (k >= frozen), f"block {k} with {frozen} frozen"
        assert block.training == (k >= frozen), f"block {k} batch norm with {frozen} frozen"
    assert not any(p.requires_grad for p in net.backbone._conv_stem.parameters())
    assert not net.backbone._bn0.training  # the stem is always ImageNet's
    assert all(p.requires_grad for p in net.proj.parameters())


def _tiny_catalogue(root):
    """Two SKUs of four 72x96 images each: enough for a few optimiser steps, in seconds."""
    import cv2
    import numpy as np

    from retrain.datasets import Sample

    rng = np.random.default_rng(0)
    samples = []
    for sku, colour in (("sku-red", (30, 30, 200)), ("sku-blue", (200, 60, 30))):
        (root / sku).mkdir(parents=True)
        for k in range(4):
            img = np.clip(rng.normal(0, 25, (96, 72, 3)) + colour, 0, 255).astype(np.uint8)
            path = root / sku / f"{k}.jpg"
            cv2.imwrite(str(path), img)
            samples.append(Sample(path, sku))
    return samples


def _train(samples, out, **kw):
    from retrain.recognizer import RecognizerRecipe, train_recognizer

    # fp32 unless a test asks: auto would follow this CPU's instructions
    base = {"epochs": 1, "size": 64, "batch": 4, "embed_dim": 16, "threads": 1, "precision": "fp32"}
    recipe = RecognizerRecipe(**(base | kw))
    return train_recognizer(recipe, samples, out, log=lambda _: None)


def _train_elsewhere(crops, out, **kw) -> dict:
    """`_train` in a fresh interpreter, as the CLI runs it: a loader's worker pool started inside the test
    process, after it has run OpenVINO, ONNX Runtime and forking loaders, now and then crashed it."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from retrain.datasets import image_folder; from test_retrain_recognizer import _train; "
        "_train(image_folder(Path(sys.argv[2])), Path(sys.argv[3]), **json.loads(sys.argv[4]))"
    )
    here = Path(__file__).parent
    args = [str(here), str(crops), str(out), json.dumps(kw)]
    subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=here.parent, timeout=600)
    return json.loads((out / "recognizer_report.json").read_text())


def test_worker_processes_draw_the_same_augmentations_as_the_trainer(tmp_path):
    """Each image's jitter follows (seed, epoch, index) alone, so --workers changes speed, not the model."""
    import torch

    _tiny_catalogue(tmp_path / "crops")
    inline = _train_elsewhere(tmp_path / "crops", tmp_path / "w0", device="cpu", workers=0)
    pooled = _train_elsewhere(tmp_path / "crops", tmp_path / "w2", device="cpu", workers=2)
    a = torch.load(tmp_path / "w0" / "recognizer.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "w2" / "recognizer.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
        # Trained channels-last on the CPU, saved in the standard layout whatever layout trained it.
        assert a[k].is_contiguous(), k
    assert inline["history"][0]["loss"] == pooled["history"][0]["loss"]
    assert inline["device"] == "cpu"
    assert inline["parity"]["min_cosine"] > 0.999  # the export still matches the trained graph
    other_seed = _train_elsewhere(tmp_path / "crops", tmp_path / "s1", device="cpu", seed=1)
    assert other_seed["history"][0]["loss"] != inline["history"][0]["loss"]


def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    import torch

    from retrain.recognizer import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("gpu0")


def test_precision_auto_is_bf16_where_it_runs_natively_and_bf16_needs_the_instructions(monkeypatch):
    from retrain import recognizer
    from retrain.recognizer import resolve_precision

    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setattr(recognizer, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="without native bf16"):
        resolve_precision("bf16", "cpu")
    assert resolve_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(recognizer, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_retrain_recognizer_refuses_a_precision_it_cannot_run_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from retrain import recognizer
    from shelfloop.cli import app

    _tiny_catalogue(tmp_path / "crops")
    monkeypatch.setattr(recognizer, "cpu_has_bf16", lambda: False)
    base = ["retrain", "recognizer", "--out", str(tmp_path / "out"), "--crops", str(tmp_path / "crops")]
    for precision, why in (("bf16", "without native bf16"), ("fp16", "auto, fp32 or bf16")):
        result = CliRunner().invoke(app, [*base, "--device", "cpu", "--precision", precision])
        assert result.exit_code != 0 and why in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_training_in_bf16_on_the_cpu_exports_an_fp32_model_that_matches(tmp_path):
    import onnx
    import torch

    from retrain.recognizer import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (AVX-512 bf16 or AMX)")
    samples = _tiny_catalogue(tmp_path / "crops")
    fp32 = _train(samples, tmp_path / "fp32", device="cpu", batch=8)
    bf16 = _train(samples, tmp_path / "bf16", device="cpu", batch=8, precision="bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["history"][0]["loss"] != fp32["history"][0]["loss"]  # autocast really ran in bf16
    weights = torch.load(tmp_path / "bf16" / "recognizer.pt", weights_only=False)["state_dict"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    graph = onnx.load(tmp_path / "bf16" / "recognizer.onnx").graph
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert bf16["parity"]["min_cosine"] > 0.999  # trained in bf16, exported and run in fp32


def test_training_on_a_cuda_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the GPU training path runs where one exists")
    crops = tmp_path / "crops"
    _tiny_catalogue(crops)
    report = _train_elsewhere(
        crops, tmp_path / "gpu", epochs=2, threads=0, device="cuda", workers=2, precision="auto"
    )
    assert report["device"] != "cpu"
    assert report["precision"] == "bf16"  # what auto picks on a GPU
    assert report["parity"]["min_cosine"] > 0.999  # trained in bf16 on the GPU, exported and run in fp32


class _PooledPixels:
    """Stands in for the ImageNet backbone: its 'features' are the pixels, so the teacher is known exactly."""

    def extract_features(self, x):
        return x


def test_similarity_distillation_is_zero_only_when_the_embedding_ranks_neighbours_like_the_teacher():
    import torch
    from torch.nn import functional as F

    from retrain.recognizer import _similarity_distillation

    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 4) * 255
    t = ((x - 127.0) / 128.0).mean((2, 3))
    like_teacher = F.normalize(t - t.mean(0, keepdim=True), dim=1)
    assert _similarity_distillation(_PooledPixels(), x, like_teacher, 0.1, False).item() < 1e-6
    other = F.normalize(torch.randn(8, 3), dim=1).requires_grad_()
    loss = _similarity_distillation(_PooledPixels(), x, other, 0.1, False)
    assert loss.item() > 0.01
    loss.backward()
    assert other.grad is not None and other.grad.abs().sum() > 0  # it pulls the embedding, not the teacher


def test_distillation_changes_training_and_is_recorded(tmp_path):
    import torch

    samples = _tiny_catalogue(tmp_path / "crops")
    plain = _train(samples, tmp_path / "plain", device="cpu", batch=8)  # one step: the same first batch
    kept = _train(samples, tmp_path / "kept", device="cpu", batch=8, distill=2.0)
    assert kept["recipe"]["distill"] == 2.0 and plain["recipe"]["distill"] == 0.0
    assert kept["history"][0]["loss"] > plain["history"][0]["loss"]  # same CosFace term, plus distillation
    a = torch.load(tmp_path / "plain" / "recognizer.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "kept" / "recognizer.pt", weights_only=False)["state_dict"]
    assert not torch.allclose(a["proj.weight"], b["proj.weight"])
    assert kept["parity"]["min_cosine"] > 0.999
