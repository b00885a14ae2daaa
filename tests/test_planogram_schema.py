"""The planogram schema: validation that names bay / shelf / slot, JSON round trips, the space-planning
CSV import (good and bad rows), and picking the version in force on a date."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from planograms.csv_import import read_planogram_csv, to_csv
from planograms.schema import (
    Bay,
    Planogram,
    PlanogramError,
    ShelfRow,
    Slot,
    dumps,
    from_csv,
    in_force,
    load,
    validate,
    validate_bay,
)

DAY = dt.date(2026, 3, 1)


def make_plan(version: str = "1", effective_from: dt.date = DAY, planogram_id: str = "p-1") -> Planogram:
    rows = [
        ShelfRow(
            shelf_row=0,
            y_mm=300,
            height_mm=250,
            slots=[
                Slot(slot_index=0, sku_id="A", facings=2, x_mm=10, width_mm=140),
                Slot(slot_index=1, sku_id="B", facings=1, x_mm=150, width_mm=70),
            ],
        ),
        ShelfRow(
            shelf_row=1,
            y_mm=600,
            height_mm=250,
            slots=[Slot(slot_index=0, sku_id="C", facings=3, x_mm=10, width_mm=210)],
        ),
    ]
    bay = Bay(bay_id="bay-01", fixture="gondola", width_mm=400, height_mm=700, rows=rows)
    return Planogram(
        planogram_id=planogram_id,
        version=version,
        store_format="express",
        effective_from=effective_from,
        bays=[bay],
    )


# ---------------------------------------------------------------------------------------------------------
# Validation


def test_a_sound_planogram_validates_and_round_trips(tmp_path: Path):
    plan = make_plan()
    validate(plan, ["A", "B", "C"])
    path = tmp_path / "p.json"
    path.write_bytes(dumps(plan))
    assert load(path, ["A", "B", "C"]) == plan


def test_validation_names_every_fault_with_its_bay_shelf_and_slot():
    row = ShelfRow(
        shelf_row=2,
        y_mm=300,
        height_mm=250,
        slots=[
            Slot(slot_index=0, sku_id="A", facings=0, x_mm=10, width_mm=100),
            Slot(slot_index=0, sku_id="Z", facings=1, x_mm=90, width_mm=100),
            Slot(slot_index=2, sku_id="B", facings=1, x_mm=300, width_mm=150),
        ],
    )
    bay = Bay(bay_id="bay-07", fixture="cooler", width_mm=400, height_mm=700, rows=[row])
    with pytest.raises(PlanogramError) as err:
        validate_bay(bay, ["A", "B"])
    problems = err.value.problems
    assert "bay bay-07 shelf 2 slot 0: facings must be >= 1, got 0" in problems
    assert "bay bay-07 shelf 2 slot 0: unknown SKU 'Z'" in problems
    assert "bay bay-07 shelf 2 slot 0: slot index appears twice on the shelf" in problems
    assert any(p.startswith("bay bay-07 shelf 2 slot 0: overlaps the previous slot") for p in problems)
    assert any(p.startswith("bay bay-07 shelf 2 slot 2: extends past the bay width") for p in problems)


def test_load_reports_bad_json_and_bad_fields(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanogramError, match="not valid JSON"):
        load(bad)
    bad.write_text('{"planogram_id": "x"}')
    with pytest.raises(PlanogramError, match=r"bad\.json"):
        load(bad)


# ---------------------------------------------------------------------------------------------------------
# CSV import

GOOD = """bay_id,shelf,position,sku,facings,width_mm,x_mm
bay-01,0,0,A,2,140,10
bay-01,0,1,B,1,70,150
bay-01,1,0,C,3,210,10
bay-02,0,0,D,4,280,0
"""


def test_a_position_list_becomes_a_validated_planogram(tmp_path: Path):
    path = tmp_path / "export.csv"
    path.write_text(GOOD)
    plan = read_planogram_csv(path, planogram_id="p-9", effective_from=DAY, known_skus="ABCD")
    assert [b.bay_id for b in plan.bays] == ["bay-01", "bay-02"]
    b1 = plan.bay("bay-01")
    assert [[(s.sku_id, s.facings, s.x_mm, s.width_mm) for s in r.slots] for r in b1.rows] == [
        [("A", 2, 10.0, 140.0), ("B", 1, 150.0, 70.0)],
        [("C", 3, 10.0, 210.0)],
    ]
    assert b1.width_mm == 220.0 and [r.shelf_row for r in b1.rows] == [0, 1]
    assert b1.rows[0].y_mm < b1.rows[1].y_mm  # shelf 0 is the top one
    assert plan.effective_from == DAY and plan.planogram_id == "p-9"


def test_csv_without_x_upc_semicolons_unit_widths_and_shelves_counted_from_the_floor():
    text = (
        "Bay;Shelf;Position;UPC;HFacings;Unit_Width_mm\n"
        "B1;1;2;0002;1;60\nB1;1;1;0001;2;60\nB1;2;1;0003;1;80\n"
    )
    plan = from_csv(
        text.splitlines(),
        planogram_id="p",
        effective_from=DAY,
        upc_to_sku={"0001": "A", "0002": "B", "0003": "C"},
        shelves_from_bottom=True,
    )
    bay = plan.bay("B1")
    top, bottom = bay.rows
    assert [s.sku_id for s in top.slots] == ["C"]  # shelf 2 from the floor is the top shelf
    assert [(s.sku_id, s.x_mm, s.width_mm) for s in bottom.slots] == [("A", 0.0, 120.0), ("B", 120.0, 60.0)]


def test_round_trip_through_csv():
    plan = make_plan()
    back = read_planogram_csv(to_csv(plan), planogram_id="p-1", effective_from=DAY, store_format="express")
    assert back.bays[0].rows == plan.bays[0].rows
    assert back.bays[0].width_mm == plan.bays[0].width_mm


def test_every_bad_row_is_reported_with_its_line_and_slot():
    text = (
        "bay_id,shelf,position,sku,facings,width_mm,x_mm\n"
        "bay-01,0,0,A,two,140,10\n"  # line 2: facings not an integer
        "bay-01,0,1,B,1,-70,150\n"  # line 3: negative width
        "bay-01,x,2,C,1,70,230\n"  # line 4: shelf not an integer
        ",0,3,D,1,70,300\n"  # line 5: no bay
        "bay-01,1,0,,1,70,10\n"  # line 6: no product
    )
    with pytest.raises(PlanogramError) as err:
        read_planogram_csv(text, planogram_id="p", effective_from=DAY)
    problems = err.value.problems
    assert "line 2 (bay bay-01 shelf 0 slot 0): facings 'two' is not an integer" in problems
    assert "line 3 (bay bay-01 shelf 0 slot 1): width_mm must be > 0, got -70" in problems
    assert "line 4 (bay bay-01 shelf x slot 2): shelf 'x' is not an integer" in problems
    assert "line 5 (bay ? shelf 0 slot 3): bay_id is empty" in problems
    assert "line 6 (bay bay-01 shelf 1 slot 0): no sku or upc" in problems


def test_layout_faults_in_a_csv_name_bay_shelf_and_slot():
    text = (
        "bay_id,shelf,position,sku,facings,width_mm,x_mm\n"
        "bay-01,0,0,A,2,140,10\n"
        "bay-01,0,1,B,1,70,100\n"  # overlaps A
        "bay-01,0,1,C,1,70,300\n"  # position given twice
    )
    with pytest.raises(PlanogramError) as err:
        read_planogram_csv(text, planogram_id="p", effective_from=DAY)
    assert err.value.problems == ["bay bay-01 shelf 0 slot 1: position given twice (lines 3 and 4)"]
    with pytest.raises(PlanogramError, match="bay bay-01 shelf 0 slot 1: overlaps the previous slot"):
        read_planogram_csv(text.rsplit("\n", 2)[0] + "\n", planogram_id="p", effective_from=DAY)
    with pytest.raises(PlanogramError, match="unknown SKU 'B'"):
        read_planogram_csv(GOOD, planogram_id="p", effective_from=DAY, known_skus=["A", "C", "D"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "CSV is empty"),
        ("bay_id,shelf,position,sku,facings,width_mm\n", "no positions"),
        ("bay,shelf,sku,facings,width_mm\nb,0,A,1,60\n", "lacks column(s): position"),
        ("bay,shelf,position,upc,facings,width\nb,0,0,999,1,60\n", "UPC 999 is not in the catalogue"),
        ("bay,shelf,position,sku,facings,width,x\nb,0,0,A,1,60,\nb,0,1,B,1,60,70\n", "x_mm given for some"),
    ],
)
def test_malformed_csv_files(text, message):
    with pytest.raises(PlanogramError, match=re.escape(message)):
        read_planogram_csv(text.splitlines(), planogram_id="p", effective_from=DAY, upc_to_sku={"1": "A"})


# ---------------------------------------------------------------------------------------------------------
# Versions: a reset replaces a planogram from its effective date


def test_the_version_in_force_is_the_latest_that_has_started():
    v1 = make_plan("1", dt.date(2026, 1, 1))
    v2 = make_plan("2", dt.date(2026, 3, 1))
    v3 = make_plan("3", dt.date(2026, 6, 1))
    assert in_force([v3, v1, v2], dt.date(2026, 2, 28)).version == "1"
    assert in_force([v3, v1, v2], dt.date(2026, 3, 1)).version == "2"
    assert in_force([v3, v1, v2], dt.date(2027, 1, 1)).version == "3"


def test_no_version_or_an_ambiguous_one_is_an_error():
    v1 = make_plan("1", dt.date(2026, 1, 1))
    with pytest.raises(PlanogramError, match="no version in force on 2025-12-31"):
        in_force([v1], dt.date(2025, 12, 31))
    with pytest.raises(PlanogramError, match="versions 1, 1b all start on 2026-01-01"):
        in_force([v1, make_plan("1b", dt.date(2026, 1, 1))], DAY)
    other = make_plan("1", dt.date(2026, 1, 1), planogram_id="p-2")
    with pytest.raises(PlanogramError, match="several planograms"):
        in_force([v1, other], DAY)
    assert in_force([v1, other], DAY, planogram_id="p-2") is other
    with pytest.raises(PlanogramError, match="no planogram 'p-3'"):
        in_force([v1, other], DAY, planogram_id="p-3")
