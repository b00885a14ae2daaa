"""Planograms and compliance: pure logic that the edge and the cloud both use.

- `planograms.schema`: the planogram (store format -> bays -> shelf rows -> slots), validation, JSON,
  the version in force on a date; `planograms.csv_import`: position lists from space-planning tools.
- `planograms.compliance`: the compliance engine (`check_bay`) and its micro-benchmark (`bench_bay`).
- `planograms.metrics`: compliance %, on-shelf availability, share of shelf; label scores.
- `planograms.evaluate`: grading the engine against a synthetic world's ground truth.

Only the standard library, msgspec and (for the engine) numpy: no other ShelfLoop package.
"""
