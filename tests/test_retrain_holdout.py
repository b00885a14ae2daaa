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
