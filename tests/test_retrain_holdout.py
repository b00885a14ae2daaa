"""The new-SKU test's held-out Grocery classes stay held out across training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrain.datasets import Sample
from retrain.recognizer import holdout_classes

VAL = [Sample(Path(f"{c}/{k}.jpg"), f"gs:class-{c:02d}") for c in range(40) for k in range(2)]


def test_the_holdout_does_not_depend_on_anything_but_the_classes() -> None:
    held = holdout_classes(VAL, 10)
    assert len(held) == 10 and held == holdout_classes(list(reversed(VAL)), 10)


def test_a_continuation_keeps_out_what_its_starting_weights_never_saw(tmp_path: Path) -> None:
    start = tmp_path / "rec-v1"
    start.mkdir()
    earlier = ["gs:class-03", "gs:class-17", "gs:not-in-val-any-more"]
    report = {"recipe": {"data": {"holdout_classes": earlier}}}
    (start / "recognizer_report.json").write_text(json.dumps(report))
    held = holdout_classes(VAL, 10, init=start / "recognizer.pt")
    assert set(earlier) <= set(held) and set(holdout_classes(VAL, 10)) <= set(held)


def test_a_continuation_without_its_report_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="new-SKU test"):
        holdout_classes(VAL, 10, init=tmp_path / "recognizer.pt")


def _tiny_grocery_store(root: Path) -> None:
    """Three classes in the data set's own layout: three train and one val photo each."""
    import cv2
    import numpy as np

    names = ["Red-Thing", "Green-Thing", "Blue-Thing"]
    rows = ["Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int)"]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for c, name in enumerate(names):
        rows.append(f"{name},{c},{name},{c}")
        colour = np.zeros(3)
        colour[c] = 200
        for split, n in (("train", 3), ("val", 1)):
            for k in range(n):
                rel = f"{split}/{name}/{k}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                img = np.clip(np.random.default_rng(k).normal(0, 20, (80, 60, 3)) + colour, 0, 255)
                cv2.imwrite(str(root / rel), img.astype(np.uint8))
                splits[split].append(f"{rel}, {c}, {c}")
    (root / "classes.csv").write_text("\n".join(rows) + "\n")
    for split, lines in splits.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_a_release_model_can_be_trained_on_the_classes_its_start_was_kept_from(tmp_path: Path) -> None:
    """--train-init-holdout: a continuation on every photo, recorded so eval grocery no longer calls any
    class new; by default the start's held-out classes stay out."""
    pytest.importorskip("torch", reason="the train extra is not installed")
    from typer.testing import CliRunner

    from shelfloop.cli import app

    _tiny_grocery_store(tmp_path / "gs")
    common = ["--grocery", str(tmp_path / "gs"), "--epochs", "1", "--size", "64", "--batch", "4"]
    common += ["--device", "cpu", "--precision", "fp32", "--threads", "1"]

    def train(out: str, *extra: str) -> dict:
        args = ["retrain", "recognizer", "--out", str(tmp_path / out), *common, *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "recognizer_report.json").read_text())

    start = train("start", "--holdout", "1")
    (held,) = start["recipe"]["data"]["holdout_classes"]
    assert start["classes"] == 2
    init = ["--init", str(tmp_path / "start" / "recognizer.pt"), "--holdout", "0"]
    kept = train("kept", *init)
    assert kept["recipe"]["data"]["holdout_classes"] == [held] and kept["classes"] == 2
    release = train("release", *init, "--train-init-holdout")
    assert release["recipe"]["data"]["holdout_classes"] == [] and release["classes"] == 3
    # A held-out test continued from weights that saw the held-out class is refused, not run void.
    args = ["retrain", "recognizer", "--out", str(tmp_path / "void"), *common, "--holdout", "1"]
    args += ["--init", str(tmp_path / "release" / "recognizer.pt")]
    for extra in ([], ["--train-init-holdout"]):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code != 0 and f"trained on {held}" in result.output, (extra, result.output)
    assert not (tmp_path / "void").exists()
    train("every-class", "--init", str(tmp_path / "release" / "recognizer.pt"), "--holdout", "0")
