"""``shelfloop bench ingest``: crops/s from the broker through an ingest worker into S3 and the database,
against the raw S3 put rate measured in the same run, and annotation-queue claim+complete ops/s.

Everything runs on loopback: a Mosquitto started here (free port, 127.0.0.1, stopped by pid), an S3
endpoint (moto's server in-process unless one is given) and the database named (PostgreSQL for the queue
figure that matters; a temporary SQLite file otherwise). Loads are fixed counts, never open-ended.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud_api.db import Database
from cloud_api.devsim import DeviceSim, crop_row, make_crop
from cloud_api.ingest import Ingestor, IngestWorker
from cloud_api.queue import AnnotationQueue, enqueue_crop
from cloud_api.storage import S3ObjectStore
from shelfloop.broker import free_port, private_mosquitto, wait_port

__all__ = ["jpeg_of_size", "run"]


def jpeg_of_size(target_bytes: int) -> bytes:
    """A random-pixel JPEG of roughly ``target_bytes`` (crops from devices are 5-60 KB)."""
    from PIL import Image

    side = 16
    while True:
        img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        if buf.tell() >= target_bytes or side >= 2048:
            return buf.getvalue()
        side = int(side * 1.25) + 1


@contextmanager
def _s3(endpoint: str | None) -> Iterator[str]:
    if endpoint is not None:
        yield endpoint
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_port(port, 10)
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def _raw_put_rate(store: S3ObjectStore, payloads: list[bytes]) -> float:
    """Plain ``put_object`` calls, the ceiling the ingest path is compared with."""
    started = time.perf_counter()
    for i, data in enumerate(payloads):
        store.client.put_object(
            store.bucket, f"raw/{i}.jpg", io.BytesIO(data), len(data), content_type="image/jpeg"
        )
    return len(payloads) / (time.perf_counter() - started)


def _queue_rate(db: Database, ops: int, workers: int) -> float:
    """Claim + complete ops/s over ``ops`` fresh tasks with ``workers`` threads."""
    from cloud_api import models as m

    with db.session() as s:
        users = [
            m.User(username=f"bench-{os.getpid()}-{i}-{time.time_ns()}", password_hash="x", role="annotator")
            for i in range(workers)
        ]
        s.add_all(users)
        s.flush()
        user_ids = [u.id for u in users]
        for i in range(ops):
            crop = m.Crop(
                **crop_row(
                    object_key=f"bench/{time.time_ns()}-{i}.jpg",
                    store_id="bench",
                    device_id="bench",
                    camera_id="bench",
                )
            )
            s.add(crop)
            s.flush()
            enqueue_crop(s, crop.id, priority=50, novelty=None, source="shelf")
    queue = AnnotationQueue(db)
    done = [0] * workers

    def work(k: int) -> None:
        while (lease := queue.claim(user_ids[k])) is not None:
            queue.complete(lease.task_id, lease.token, user_ids[k], "unreadable")
            done[k] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return sum(done) / (time.perf_counter() - started)


def run(
    n: int = 500,
    crop_bytes: int = 30 * 1024,
    *,
    database_url: str | None = None,
    s3_endpoint: str | None = None,
    queue_ops: int = 1000,
    queue_workers: int = 2,
    ingest_workers: int = 1,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"figures": {...}, "lines": [...]}`` like `shelfloop bench contract`."""
    tmp = Path(tempfile.mkdtemp(prefix="shelfloop-bench-"))
    url = database_url or f"sqlite:///{tmp / 'bench.db'}"
    db = Database(url)
    try:
        with private_mosquitto(tmp) as port, _s3(s3_endpoint) as endpoint:
            bucket = f"bench-{os.getpid()}-{int(time.time())}"
            store = S3ObjectStore(endpoint, "bench", "bench-secret", bucket, region="us-east-1")
            raw_rate = _raw_put_rate(store, [jpeg_of_size(crop_bytes) for _ in range(min(n, 300))])
            crops = [make_crop("bench-store", "bench-dev", jpeg=jpeg_of_size(crop_bytes)) for _ in range(n)]
            # Workers of one shared-subscription group split the uplinks, as deployed ingest scales out.
            workers = [
                IngestWorker(
                    Ingestor(db, store), host="127.0.0.1", port=port, client_id=f"bench-{os.getpid()}-{k}"
                )
                for k in range(ingest_workers)
            ]
            for worker in workers:
                worker.start()
                if not worker.wait_ready(10):
                    raise RuntimeError("ingest worker did not subscribe")
            device = DeviceSim("127.0.0.1", port, "bench-store", "bench-dev", resend_after_s=timeout_s)
            try:
                device.wait_connected()
                started = time.perf_counter()
                for crop in crops:
                    device.send(crop)
                if not device.wait_all_acked(timeout_s, resend=False):
                    raise RuntimeError(f"{device.pending()} crops not acked within {timeout_s}s")
                ingest_rate = n / (time.perf_counter() - started)
            finally:
                device.close()
                for worker in workers:
                    worker.stop()
        queue_rate = _queue_rate(db, queue_ops, queue_workers)
    finally:
        db.dispose()
        shutil.rmtree(tmp, ignore_errors=True)
    dialect = url.split(":", 1)[0]
    figures = {
        "crops": n,
        "crop_bytes": len(crops[0].jpeg),
        "ingest_crops_per_s": round(ingest_rate, 1),
        "raw_s3_puts_per_s": round(raw_rate, 1),
        "ingest_to_storage_ratio": round(ingest_rate / raw_rate, 3),
        "queue_ops_per_s": round(queue_rate, 1),
        "queue_ops": queue_ops,
        "queue_workers": queue_workers,
        "ingest_workers": ingest_workers,
        "database": dialect,
    }
    lines = [
        f"ingest: {n} crops of {figures['crop_bytes']} B, broker -> {ingest_workers} worker(s) -> S3 + "
        f"{dialect} -> ack: {figures['ingest_crops_per_s']} crops/s",
        f"raw S3 put (same server, same run): {figures['raw_s3_puts_per_s']} puts/s; "
        f"ingest/raw ratio {figures['ingest_to_storage_ratio']}",
        f"queue ({dialect}, {queue_workers} workers): {figures['queue_ops_per_s']} claim+complete ops/s",
    ]
    return {"figures": figures, "lines": lines}
