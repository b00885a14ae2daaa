"""``shelfloop bench ingest``: crops/s from the broker through an ingest worker into S3 and the database,
against the raw S3 put rate measured in the same run, and annotation-queue claim+complete ops/s.

Everything runs on loopback: a Mosquitto started here (free port, 127.0.0.1, stopped by pid), an S3
endpoint (moto's server in its own process, as S3/MinIO is in production, unless one is given) and the
database named (PostgreSQL for the queue figure that matters; a temporary SQLite file otherwise). Loads
are fixed counts, never open-ended.

The baseline is sequential ``put_object`` calls from one minio client. The two sides are timed in
interleaved rounds (raw, ingest, ingest, raw, ...) and compared by their totals, so a load change on a
shared box during the run does not favour either side; both after a short untimed warm-up (a fresh
server and a fresh worker are slower at first). The device runs in its own process with its crops encoded
beforehand, as a device is another machine: in this process its MQTT client would take a third of the
worker's GIL time. The same puts from as many threads as the workers' pools hold are reported beside it,
for reference: the server's ceiling when requests overlap, as the workers' puts do.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
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
from shelfloop.contract import encode

__all__ = ["jpeg_of_size", "run"]

WARMUP = 20
"""Untimed puts, and crops through ingest, before each side is timed."""
ROUNDS = 4
"""Timed rounds of each side, interleaved (each of at least 20 crops; the same count on both sides).
Few and long: each ingest round pays the pipeline's fill and drain once, which a sequential put does not."""


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
def _s3(endpoint: str | None, workdir: Path) -> Iterator[str]:
    """An S3 endpoint: the one given, else moto's server in its own process (``python -m moto.server``).

    Its own process because production S3/MinIO is one: in-process, the S3 server would share this
    process's GIL with the ingest worker, paho and SQLAlchemy, and neither side could overlap its I/O.
    """
    if endpoint is not None:
        yield endpoint
        return
    port = free_port()
    with (workdir / "moto.log").open("wb") as log_file:  # werkzeug writes one access-log line per request
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        if not wait_port(port, 30):
            raise RuntimeError(f"moto's S3 server did not start; see {workdir / 'moto.log'}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _encoded_crop(crop_bytes: int) -> tuple[str, bytes]:
    crop = make_crop("bench-store", "bench-dev", jpeg=jpeg_of_size(crop_bytes))
    return crop.crop_id, encode(crop)


def _device_process(port: int, batches: list[list[tuple[str, bytes]]], timeout_s: float, conn: Any) -> None:
    """A device in its own process, as devices are other machines: its MQTT client does not take the
    ingest worker's GIL. Sends the batch it is told to and answers with the seconds until all were acked
    (or the error)."""
    try:
        device = DeviceSim("127.0.0.1", port, "bench-store", "bench-dev", resend_after_s=timeout_s)
        device.wait_connected()
        conn.send("ready")
        while (k := conn.recv()) is not None:
            started = time.perf_counter()
            for crop_id, payload in batches[k]:
                device.send(payload, crop_id)
            if not device.wait_all_acked(timeout_s, resend=False):
                raise RuntimeError(f"{device.pending()} crops not acked within {timeout_s}s")
            conn.send(time.perf_counter() - started)
        device.close()
    except BaseException as exc:  # reported to the parent, which raises
        conn.send(repr(exc))


@contextmanager
def _device(port: int, batches: list[list[tuple[str, bytes]]], timeout_s: float) -> Iterator[Any]:
    """Starts `_device_process`; yields ``send(k) -> seconds`` for batch k."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_device_process, args=(port, batches, timeout_s, child), daemon=True)
    proc.start()

    def answer() -> Any:
        if not parent.poll(timeout_s + 30):
            raise RuntimeError(f"the device process did not answer within {timeout_s + 30:.0f} s")
        reply = parent.recv()
        if isinstance(reply, str) and reply != "ready":
            raise RuntimeError(f"device process failed: {reply}")
        return reply

    def send(k: int) -> float:
        parent.send(k)
        return float(answer())

    try:
        answer()
        yield send
    finally:
        if proc.is_alive():
            parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def _raw_put_rate(store: S3ObjectStore, payloads: list[bytes], prefix: str, threads: int = 1) -> float:
    """Plain ``put_object`` calls of ``payloads`` (one after another, or spread over ``threads``): no
    validation, no database, no broker; what the ingest path is compared with."""
    from concurrent.futures import ThreadPoolExecutor

    def put(item: tuple[int, bytes]) -> None:
        i, data = item
        store.client.put_object(
            store.bucket, f"raw/{prefix}/{i}.jpg", io.BytesIO(data), len(data), content_type="image/jpeg"
        )

    started = time.perf_counter()
    if threads == 1:
        for item in enumerate(payloads):
            put(item)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, enumerate(payloads)))
    return len(payloads) / (time.perf_counter() - started)


def _queue_tasks(db: Database, ops: int, workers: int) -> list[int]:
    """``ops`` fresh pending tasks (with their crops) and a new annotator per worker; returns the user ids."""
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
    if db.is_postgres:
        # The tables as autovacuum keeps them for a running queue. Planner statistics: right after a bulk
        # insert they say "empty", and the claim gets a plan that rescans the annotator's answers per task.
        # Dead row versions: every claim and complete leaves one, and a database reused for several runs on
        # a server without autovacuum (the benchmark box's) would time the index entries of earlier runs.
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) crops, annotation_tasks, annotations")
    return user_ids


def _drain(queue: AnnotationQueue, user_id: int) -> int:
    """Claim and complete until the queue is empty for this annotator; returns the operations done."""
    done = 0
    while (lease := queue.claim(user_id)) is not None:
        queue.complete(lease.task_id, lease.token, user_id, "unreadable")
        done += 1
    return done


def _queue_process(url: str, user_id: int, start: Any, results: Any) -> None:
    """One queue worker in its own process, as API workers are deployed: its own interpreter (GIL),
    engine and pool. Reports (ops, start, end) on ``perf_counter``, which is CLOCK_MONOTONIC on Linux and so
    comparable between processes, or the error."""
    try:
        db = Database(url, run_migrations=False)
        queue = AnnotationQueue(db)
        with db.engine.connect():
            pass  # open the pooled connection before the clock starts
        start.wait(120)
        started = time.perf_counter()
        done = _drain(queue, user_id)
        results.put((done, started, time.perf_counter()))
        db.dispose()
    except BaseException as exc:  # reported to the parent, which raises
        start.abort()  # the other workers stop waiting for this one
        results.put(repr(exc))


def _queue_rate_processes(db: Database, ops: int, workers: int) -> float:
    """Claim + complete ops/s over ``ops`` fresh tasks with ``workers`` processes (spawned: no inherited
    connections), timed from the first worker's start to the last one's end (process start-up excluded)."""
    import multiprocessing
    import queue as queue_module

    user_ids = _queue_tasks(db, ops, workers)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_queue_process, args=(db.url, uid, start, results)) for uid in user_ids]
    for proc in procs:
        proc.start()
    reports = []
    try:
        for _ in procs:
            try:
                reports.append(results.get(timeout=600))
            except queue_module.Empty:
                raise RuntimeError("a queue worker process did not report within 600 s") from None
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    errors = [r for r in reports if isinstance(r, str)]
    if errors:
        raise RuntimeError(f"queue worker process failed: {errors[0]}")
    done = sum(r[0] for r in reports)
    return done / (max(r[2] for r in reports) - min(r[1] for r in reports))


def _queue_rate_threads(db: Database, ops: int, workers: int) -> float:
    """Claim + complete ops/s over ``ops`` fresh tasks with ``workers`` threads of this process (one GIL
    between them): the earlier form of this figure, kept for comparison."""
    user_ids = _queue_tasks(db, ops, workers)
    queue = AnnotationQueue(db)
    done = [0] * workers
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            done[k] = _drain(queue, user_ids[k])
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(done) / elapsed


def run(
    n: int = 1200,
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
        with private_mosquitto(tmp) as port, _s3(s3_endpoint, tmp) as endpoint:
            bucket = f"bench-{os.getpid()}-{int(time.time())}"
            store = S3ObjectStore(endpoint, "bench", "bench-secret", bucket, region="us-east-1")
            payloads = [jpeg_of_size(crop_bytes) for _ in range(min(n, 300))]
            _raw_put_rate(store, payloads[:WARMUP], "warmup")
            # Interleaved rounds, in the order raw, ingest, ingest, raw, raw, ...: the load on a shared box
            # drifts, and both sides are timed across the same stretch of it.
            rounds = max(1, min(ROUNDS, n // 20))
            per_round = -(-n // rounds)
            crops = [_encoded_crop(crop_bytes) for _ in range(n)]
            batches = [[_encoded_crop(crop_bytes) for _ in range(WARMUP)]]
            batches += [crops[k * per_round : (k + 1) * per_round] for k in range(rounds)]
            # Workers of one shared-subscription group split the uplinks, as deployed ingest scales out.
            workers = [
                IngestWorker(
                    Ingestor(db, store), host="127.0.0.1", port=port, client_id=f"bench-{os.getpid()}-{k}"
                )
                for k in range(ingest_workers)
            ]
            put_threads = sum(worker.put_threads for worker in workers)
            for worker in workers:
                worker.start()
                if not worker.wait_ready(10):
                    raise RuntimeError("ingest worker did not subscribe")
            raw_rounds: list[tuple[int, float]] = []  # (puts, seconds)
            ingest_rounds: list[tuple[int, float]] = []  # (crops, seconds)

            def raw_round(k: int, count: int) -> None:
                batch = [payloads[(k * count + j) % len(payloads)] for j in range(count)]
                raw_rounds.append((count, count / _raw_put_rate(store, batch, f"r{k}")))

            try:
                with _device(port, batches, timeout_s) as ingest_round:
                    ingest_round(0)  # warm-up, untimed
                    for k in range(rounds):
                        if k % 2 == 0:
                            raw_round(k, per_round)
                        ingest_rounds.append((len(batches[k + 1]), ingest_round(k + 1)))
                        if k % 2 == 1:
                            raw_round(k, per_round)
            finally:
                for worker in workers:
                    worker.stop()
            ingest_rate = sum(c for c, _ in ingest_rounds) / sum(t for _, t in ingest_rounds)
            raw_rate = sum(c for c, _ in raw_rounds) / sum(t for _, t in raw_rounds)
            round_ratios = [
                (ci / ti) / (cr / tr) for (ci, ti), (cr, tr) in zip(ingest_rounds, raw_rounds, strict=True)
            ]
            raw_concurrent = _raw_put_rate(store, payloads, "concurrent", threads=put_threads)
        queue_rate = _queue_rate_processes(db, queue_ops, queue_workers)
        queue_rate_threads = _queue_rate_threads(db, queue_ops, queue_workers)
    finally:
        db.dispose()
        shutil.rmtree(tmp, ignore_errors=True)
    dialect = url.split(":", 1)[0]
    figures = {
        "crops": n,
        "crop_bytes": len(payloads[0]),
        "ingest_crops_per_s": round(ingest_rate, 1),
        "raw_s3_puts_per_s": round(raw_rate, 1),
        "rounds": len(round_ratios),
        "round_ratios": [round(r, 3) for r in round_ratios],
        "ingest_crops_per_s_rounds": [round(c / t, 1) for c, t in ingest_rounds],
        "raw_s3_puts_per_s_rounds": [round(c / t, 1) for c, t in raw_rounds],
        "raw_s3_puts_per_s_concurrent": round(raw_concurrent, 1),
        "raw_s3_concurrent_threads": put_threads,
        "s3_server": "moto_server, own process" if s3_endpoint is None else s3_endpoint,
        "ingest_to_storage_ratio": round(ingest_rate / raw_rate, 3),
        "queue_ops_per_s": round(queue_rate, 1),
        "queue_ops_per_s_threads": round(queue_rate_threads, 1),
        "queue_ops": queue_ops,
        "queue_workers": queue_workers,
        "ingest_workers": ingest_workers,
        "database": dialect,
    }
    lines = [
        f"ingest: {n} crops of {figures['crop_bytes']} B, broker -> {ingest_workers} worker(s) -> S3 + "
        f"{dialect} -> ack: {figures['ingest_crops_per_s']} crops/s",
        f"raw S3 put_object, sequential from one client (same server, in {len(round_ratios)} rounds "
        f"interleaved with the ingest's): {figures['raw_s3_puts_per_s']} puts/s; ingest/raw ratio "
        f"{figures['ingest_to_storage_ratio']} (per round: "
        + ", ".join(f"{r:.2f}" for r in round_ratios)
        + ")",
        f"raw S3 put_object from {put_threads} threads (the server's ceiling when requests overlap, for "
        f"reference): {figures['raw_s3_puts_per_s_concurrent']} puts/s",
        f"queue ({dialect}): {figures['queue_ops_per_s']} claim+complete ops/s from {queue_workers} worker "
        f"processes (as API workers are deployed); {figures['queue_ops_per_s_threads']} ops/s from "
        f"{queue_workers} threads of one process (one GIL)",
    ]
    return {"figures": figures, "lines": lines}
