"""Step 5 of the cloud: the annotation queue on SQLite and PostgreSQL (leases, fencing, attempts, consensus,
gold, agreement), with a controllable clock instead of sleeping."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_api import models as m
from cloud_api.db import Database
from cloud_api.devsim import crop_row
from cloud_api.metrics import REGISTRY
from cloud_api.queue import (
    AnnotationQueue,
    InvalidAnswer,
    LeaseLost,
    TaskNotFound,
    cohen_kappa,
    enqueue_crop,
    fleiss_kappa,
    task_priority,
)
from shelfloop import contract as c


class Clock:
    def __init__(self) -> None:
        self.now = c.utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'q.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_db")
    )
    database = Database(url)
    yield database
    database.dispose()


def users(db: Database, *names: str) -> list[int]:
    with db.session() as s:
        rows = [m.User(username=n, password_hash="x", role="annotator") for n in names]
        s.add_all(rows)
        s.flush()
        return [u.id for u in rows]


def crops(db: Database, n: int, *, priorities: list[int] | None = None, required: int = 1) -> list[int]:
    """Crop rows with their tasks; returns the task ids."""
    ids = []
    with db.session() as s:
        s.merge(m.Sku(sku_id="sku-a", name="A"))
        s.merge(m.Sku(sku_id="sku-b", name="B"))
        for i in range(n):
            crop = m.Crop(
                **crop_row(
                    object_key=f"crops/s/d/{i:064x}.jpg",
                    sha256=f"{i:064x}",
                    size_bytes=10,
                    width=8,
                    height=8,
                    box={"x1": 0, "y1": 0, "x2": 8, "y2": 8},
                    frame_width=100,
                    frame_height=100,
                    candidates=[{"sku_id": "sku-a", "score": 0.5}, {"sku_id": "sku-b", "score": 0.4}],
                    reasons=["low_margin"],
                    priority=priorities[i] if priorities else 50,
                    margin=0.1,
                )
            )
            s.add(crop)
            s.flush()
            ids.append(
                enqueue_crop(
                    s, crop.id, priority=crop.priority, novelty=None, source="shelf", required=required
                )
            )
    return ids


def status(db: Database, task_id: int) -> str:
    with db.session() as s:
        return s.get(m.AnnotationTask, task_id).status


def test_priority_rules() -> None:
    assert task_priority(50, None, "shelf") == 50
    assert task_priority(50, 0.8, "checkout") == 50 + 8 + 10
    assert task_priority(50, 9.0, "shelf") == 70  # novelty bonus is capped


def test_claims_go_by_priority_and_carry_the_suggestions(db: Database) -> None:
    (ann,) = users(db, "ann")
    tasks = crops(db, 3, priorities=[10, 90, 50])
    q = AnnotationQueue(db)
    order = []
    while (lease := q.claim(ann)) is not None:
        order.append(lease.task_id)
        assert lease.suggestions[0] == {"sku_id": "sku-a", "score": 0.5} and lease.token == 1
    assert order == [tasks[1], tasks[2], tasks[0]]


def test_lease_expiry_returns_the_task_and_a_stale_token_cannot_complete(db: Database) -> None:
    a, b = users(db, "a", "b")
    (task,) = crops(db, 1)
    clock = Clock()
    q = AnnotationQueue(db, lease_s=60, clock=clock)
    first = q.claim(a)
    assert first is not None and q.claim(b) is None  # hidden while leased
    clock.advance(61)
    second = q.claim(b)
    assert second is not None and second.task_id == task and second.token == first.token + 1
    with pytest.raises(LeaseLost):
        q.complete(task, first.token, a, "sku", "sku-a")
    with pytest.raises(LeaseLost):
        q.complete(task, second.token, a, "sku", "sku-a")  # right token, wrong annotator
    assert q.complete(task, second.token, b, "sku", "sku-b").final_label == "sku:sku-b"
    with pytest.raises(LeaseLost):
        q.complete(task, second.token, b, "sku", "sku-b")  # done is done
    assert status(db, task) == "done"


def test_extend_keeps_a_lease_alive(db: Database) -> None:
    a, b = users(db, "a", "b")
    (task,) = crops(db, 1)
    clock = Clock()
    q = AnnotationQueue(db, lease_s=60, clock=clock)
    lease = q.claim(a)
    assert lease is not None
    clock.advance(50)
    q.extend(task, lease.token, a)
    clock.advance(50)
    assert q.claim(b) is None
    q.complete(task, lease.token, a, "not_a_product")
    assert status(db, task) == "done"


def test_attempts_run_out_into_dead_and_requeue(db: Database) -> None:
    a, b, admin = users(db, "a", "b", "admin")
    (task,) = crops(db, 1)
    clock = Clock()
    q = AnnotationQueue(db, lease_s=10, max_attempts=2, clock=clock)
    assert q.claim(a) is not None
    clock.advance(11)
    assert q.claim(b) is not None
    clock.advance(11)
    assert q.claim(admin) is None
    assert status(db, task) == "dead" and q.counts()["dead"] == 1
    q.requeue(task)
    assert q.claim(admin) is not None


def test_invalid_answers_are_refused(db: Database) -> None:
    (a,) = users(db, "a")
    (task,) = crops(db, 1)
    q = AnnotationQueue(db)
    lease = q.claim(a)
    assert lease is not None
    for outcome, sku in [
        ("sku", None),
        ("sku", "not-in-catalogue"),
        ("maybe", None),
        ("unreadable", "sku-a"),
    ]:
        with pytest.raises(InvalidAnswer):
            q.complete(task, lease.token, a, outcome, sku)
    assert status(db, task) == "leased"


def test_consensus_agreement_resolves_and_disagreement_goes_to_review(db: Database) -> None:
    a, b, rev = users(db, "a", "b", "rev")
    t1, t2 = crops(db, 2, priorities=[90, 10], required=2)
    q = AnnotationQueue(db)
    for who, answers in ((a, {t1: "sku-a", t2: "sku-a"}), (b, {t1: "sku-a", t2: "sku-b"})):
        for _ in range(2):
            lease = q.claim(who)
            assert lease is not None
            q.complete(lease.task_id, lease.token, who, "sku", answers[lease.task_id])
        assert q.claim(who) is None  # never the same task twice
    assert (status(db, t1), status(db, t2)) == ("done", "review")
    with pytest.raises(LeaseLost):
        q.requeue(t2)  # only dead tasks can be requeued
    result = q.review(t2, rev, "sku", "sku-b")
    assert result.status == "done" and result.final_label == "sku:sku-b"
    agreement = q.agreement()
    assert agreement["tasks"] == 2 and agreement["pairs"][0]["tasks"] == 2


def test_skip_returns_the_task_to_others(db: Database) -> None:
    a, b = users(db, "a", "b")
    (task,) = crops(db, 1)
    q = AnnotationQueue(db)
    lease = q.claim(a)
    assert lease is not None
    q.complete(task, lease.token, a, "skip")
    assert status(db, task) == "pending" and q.claim(a) is None
    lease_b = q.claim(b)
    assert lease_b is not None and lease_b.task_id == task


def test_new_sku_creates_a_pending_catalogue_entry(db: Database) -> None:
    (a,) = users(db, "a")
    (task,) = crops(db, 1)
    q = AnnotationQueue(db)
    lease = q.claim(a)
    assert lease is not None
    result = q.complete(task, lease.token, a, "new_sku", details={"name": "Mystery Cola", "brand": "Fizz"})
    assert result.created_sku == f"new-{lease.crop_id}" and result.final_label == f"sku:{result.created_sku}"
    with db.session() as s:
        sku = s.get(m.Sku, result.created_sku)
        assert sku is not None and (sku.status, sku.name, sku.brand) == ("new", "Mystery Cola", "Fizz")
        assert [img.object_key for img in sku.images] == [lease.object_key]
        actions = s.scalars(
            sa.select(m.CatalogueEvent.action).where(m.CatalogueEvent.sku_id == sku.sku_id)
        ).all()
        assert list(actions) == ["create", "image_add"]


def test_new_sku_consensus_creates_the_sku_once_from_the_first_answer(db: Database) -> None:
    a, b = users(db, "a", "b")
    (task,) = crops(db, 1, required=2)
    q = AnnotationQueue(db)
    first = q.claim(a)
    assert first is not None
    assert q.complete(task, first.token, a, "new_sku", details={"name": "First"}).status == "pending"
    second = q.claim(b)
    assert second is not None and second.token == first.token + 1
    result = q.complete(task, second.token, b, "new_sku", details={"name": "Second"})
    assert (result.status, result.label, result.created_sku) == ("done", "new_sku", f"new-{first.crop_id}")
    with db.session() as s:
        assert s.get(m.Sku, result.created_sku).name == "First"
        done = s.get(m.AnnotationTask, task)
        assert (done.final_label, done.resolved_by) == (f"sku:{result.created_sku}", b)


def test_the_token_decides_and_unknown_tasks_are_not_found(db: Database) -> None:
    a, b = users(db, "a", "b")
    (task,) = crops(db, 1)
    clock = Clock()
    q = AnnotationQueue(db, lease_s=60, clock=clock)
    lease = q.claim(a)
    assert lease is not None
    clock.advance(61)  # expired, but nobody took it over: the holder can still extend and answer
    assert q.extend(task, lease.token, a) == clock.now + timedelta(seconds=60)
    with pytest.raises(LeaseLost):
        q.extend(task, lease.token, b)
    with pytest.raises(LeaseLost):
        q.complete(task, lease.token, b, "sku", "not-in-catalogue")  # the fence is checked first
    for call in (lambda: q.complete(task + 99, 1, a, "unreadable"), lambda: q.extend(task + 99, 1, a)):
        with pytest.raises(TaskNotFound):
            call()
    result = q.complete(task, lease.token, a, "sku", "sku-a")
    assert (result.status, result.final_label) == ("done", "sku:sku-a")
    with db.session() as s:
        done = s.get(m.AnnotationTask, task)
        assert (done.leased_by, done.lease_expires_at, done.attempts, done.resolved_by) == (None, None, 0, a)
        answer = s.scalars(sa.select(m.Annotation).where(m.Annotation.task_id == task)).one()
        assert (answer.annotator_id, answer.label, answer.lease_token) == (a, "sku:sku-a", lease.token)


def test_queue_transitions_are_counted(db: Database) -> None:
    def events() -> dict[str, float]:
        names = ("claimed", "completed", "fenced", "expired", "dead", "review")
        return {
            e: REGISTRY.get_sample_value("shelfloop_queue_events_total", {"event": e}) or 0 for e in names
        }

    a, b, c_ = users(db, "a", "b", "c")
    consensus, doomed = crops(db, 2, priorities=[90, 10], required=2)
    clock = Clock()
    q = AnnotationQueue(db, lease_s=10, max_attempts=2, clock=clock)
    before = events()
    first = q.claim(a)
    assert first is not None and first.task_id == consensus
    clock.advance(11)
    taken = q.claim(b)  # takes the expired lease over
    assert taken is not None and taken.task_id == consensus
    with pytest.raises(LeaseLost):
        q.complete(consensus, first.token, a, "unreadable")
    q.complete(consensus, taken.token, b, "sku", "sku-a")
    again = q.claim(a)
    assert again is not None and again.task_id == consensus
    assert q.complete(consensus, again.token, a, "sku", "sku-b").status == "review"
    for who in (a, b):  # two attempts on the other task, both left to expire
        assert q.claim(who) is not None
        clock.advance(11)
    assert q.claim(c_) is None and status(db, doomed) == "dead"
    after = events()
    assert {e: after[e] - before[e] for e in after} == {
        "claimed": 5,
        "completed": 2,
        "fenced": 1,
        "expired": 2,
        "dead": 1,
        "review": 1,
    }


def test_gold_tasks_are_mixed_in_and_score_annotators(db: Database) -> None:
    good, bad = users(db, "good", "bad")
    regular = crops(db, 3)
    with db.session() as s:
        crop_pks = [s.get(m.AnnotationTask, t).crop_pk for t in regular]
    q = AnnotationQueue(db, gold_rate=1.0, rng=random.Random(1))
    gold = [q.add_gold(crop_pks[0], "sku", "sku-a"), q.add_gold(crop_pks[1], "not_a_product")]
    for who, answers in (
        (good, {gold[0]: ("sku", "sku-a"), gold[1]: ("not_a_product", None)}),
        (bad, {gold[0]: ("sku", "sku-b"), gold[1]: ("not_a_product", None)}),
    ):
        served = []
        for _ in range(2):
            lease = q.claim(who)
            assert lease is not None
            served.append(lease.task_id)
            q.complete(lease.task_id, lease.token, who, *answers[lease.task_id])
        assert sorted(served) == sorted(gold)  # gold first at rate 1.0
        nxt = q.claim(who)
        assert nxt is not None and nxt.task_id in regular  # no gold left for this annotator
    accuracy = {r["annotator"]: r["accuracy"] for r in q.annotator_accuracy()}
    assert accuracy == {"good": 1.0, "bad": 0.5}
    assert all(status(db, g) == "pending" for g in gold)  # gold is reusable, never resolved
    assert q.counts()["done"] == 0


def test_concurrent_claims_never_share_a_task(db: Database) -> None:
    names = [f"w{i}" for i in range(4)]
    ids = users(db, *names)
    tasks = crops(db, 40)
    q = AnnotationQueue(db)
    done: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(uid: int) -> None:
        try:
            while (lease := q.claim(uid)) is not None:
                q.complete(lease.task_id, lease.token, uid, "unreadable")
                with lock:
                    done.append(lease.task_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(uid,)) for uid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert Counter(done) == Counter(tasks)


def test_kappa_against_published_examples() -> None:
    # Cohen: 50 items, both yes 20, A-yes/B-no 5, A-no/B-yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None
    # Fleiss (1971) worked example as on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    items = [[str(j) for j, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.210, abs=0.001)
