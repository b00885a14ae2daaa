"""Step 8: the ingest benchmark runs end to end on loopback (tiny counts here; figures come from the CLI)."""

from __future__ import annotations

import pytest

from cloud_api.bench import jpeg_of_size, run


def test_jpeg_of_size_is_close_to_the_target() -> None:
    data = jpeg_of_size(30 * 1024)
    assert 30 * 1024 <= len(data) < 60 * 1024


@pytest.mark.broker
@pytest.mark.postgres
def test_bench_reports_ingest_storage_ratio_and_queue_rate(postgres_db: str) -> None:
    result = run(
        n=20, crop_bytes=8 * 1024, database_url=postgres_db, queue_ops=40, queue_workers=2, timeout_s=60
    )
    figures = result["figures"]
    assert figures["database"].startswith("postgresql")
    assert figures["ingest_crops_per_s"] > 0 and figures["raw_s3_puts_per_s"] > 0
    assert figures["ingest_to_storage_ratio"] == pytest.approx(
        figures["ingest_crops_per_s"] / figures["raw_s3_puts_per_s"], rel=0.01
    )
    # 20 crops make one round of each side; the ratio is that of the totals over all rounds.
    assert figures["rounds"] == 1 and figures["round_ratios"] == [
        pytest.approx(figures["ingest_to_storage_ratio"], abs=0.002)
    ]
    assert figures["raw_s3_puts_per_s_concurrent"] > 0 and figures["s3_server"] == "moto_server, own process"
    # Queue: worker processes (the figure) and threads of one process (for comparison), 40 tasks each.
    assert figures["queue_ops_per_s"] > 0 and figures["queue_ops_per_s_threads"] > 0
    assert "worker processes" in result["lines"][3] and len(result["lines"]) == 4
