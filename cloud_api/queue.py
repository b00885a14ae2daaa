"""The annotation queue: leased tasks with fencing tokens, retries, consensus, gold tasks and agreement.

- **Lease** (visibility timeout): a claimed task is hidden from other annotators until its lease expires;
  then the next claim takes it over. ``FOR UPDATE SKIP LOCKED`` on PostgreSQL lets many API workers claim
  concurrently without blocking; on SQLite every transaction is ``BEGIN IMMEDIATE`` (one writer), which is
  correct and fast enough for an embedded install.
- **Fencing token**: ``lease_token`` grows on every claim of a task; only the holder of the current token
  can complete it, so an annotator whose lease was taken over cannot overwrite the new holder's work.
  A lease that merely expired but was not taken over can still be completed: the token is the arbiter.
- **Attempts**: claims since the task last made progress; a lease that expires with ``max_attempts``
  used up sends the task to ``dead`` (an admin can requeue it).
- **Consensus**: a task needs ``required`` answers from different annotators; agreement resolves it,
  disagreement sends it to ``review``.
- **Gold**: tasks with a known answer are served at ``gold_rate``; they are never resolved, and each
  annotator answers each once. Accuracy against gold and Cohen's/Fleiss' kappa come from `agreement`.
- **Hot path**: claim and complete are Core statements that carry these rules in SQL (`_Statements`). On
  PostgreSQL a claim is one ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING``
  and a complete one conditional UPDATE on the fencing token plus the answer's INSERT in a single
  statement, both in autocommit: one round trip each after the pool's ping. The partial index
  ``ix_annotation_tasks_claimable`` serves the claim's WHERE and ORDER BY.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal, NoReturn

import sqlalchemy as sa
from sqlalchemy.orm import Session

from cloud_api import models as m
from cloud_api.db import Database, is_postgres
from cloud_api.metrics import QUEUE_EVENTS

__all__ = [
    "OUTCOMES",
    "AnnotationQueue",
    "CompleteResult",
    "InvalidAnswer",
    "Lease",
    "LeaseLost",
    "TaskNotFound",
    "cohen_kappa",
    "enqueue_crop",
    "fleiss_kappa",
    "label_of",
    "task_priority",
]

Outcome = Literal["sku", "new_sku", "not_a_product", "unreadable", "skip"]
OUTCOMES: Final[tuple[str, ...]] = ("sku", "new_sku", "not_a_product", "unreadable", "skip")
TASK_STATUSES: Final[tuple[str, ...]] = ("pending", "leased", "review", "done", "dead")
_CLAIMABLE: Final[tuple[str, ...]] = ("pending", "leased")
"""The predicate of the partial index ``ix_annotation_tasks_claimable`` (models, migration 0002)."""


class TaskNotFound(LookupError):
    """No such task."""


class LeaseLost(RuntimeError):
    """The fencing token is not the task's current one (the lease was taken over or the task moved on)."""


class InvalidAnswer(ValueError):
    """An answer that does not fit the outcome (e.g. ``sku`` without a known sku_id)."""


def task_priority(priority: int, novelty: float | None, source: str) -> int:
    """Queue order: the device's priority, raised for novel-looking crops (likely new SKUs, the most
    valuable labels) and for checkout crops (an unresolved checkout item is lost revenue)."""
    bonus = min(20, round(10 * novelty)) if novelty else 0
    return priority + bonus + (10 if source == "checkout" else 0)


def label_of(outcome: str, sku_id: str | None) -> str:
    """The normalised answer compared for agreement and against gold (``sku:<id>`` or the outcome)."""
    if outcome not in OUTCOMES:
        raise InvalidAnswer(f"unknown outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
    if outcome == "sku":
        if not sku_id:
            raise InvalidAnswer("outcome 'sku' needs a sku_id")
        return f"sku:{sku_id}"
    if sku_id is not None:
        raise InvalidAnswer(f"outcome {outcome!r} takes no sku_id")
    return outcome


def enqueue_crop(
    session: Session, crop_pk: int, *, priority: int, novelty: float | None, source: str, required: int = 1
) -> int:
    """Create the annotation task of a newly ingested crop (same transaction as the crop row)."""
    task = m.AnnotationTask(
        crop_pk=crop_pk,
        priority=task_priority(priority, novelty, source),
        required=required,
        status="pending",
    )
    session.add(task)
    session.flush()
    return task.id


@dataclass(frozen=True)
class Lease:
    """A claimed task as an annotator sees it (gold tasks look like any other)."""

    task_id: int
    token: int
    expires_at: datetime
    crop_id: str
    object_key: str
    store_id: str
    device_id: str
    source: str
    width: int
    height: int
    priority: int
    suggestions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class CompleteResult:
    task_id: int
    status: str
    label: str
    final_label: str | None = None
    gold_correct: bool | None = None
    created_sku: str | None = None


_TASKS = m.AnnotationTask.__table__
_ANSWERS = m.Annotation.__table__
_CROPS = m.Crop.__table__
_SKUS = m.Sku.__table__
_LEASE_CROP_COLUMNS = tuple(
    _CROPS.c[name]
    for name in ("crop_id", "object_key", "store_id", "device_id", "source", "width", "height", "candidates")
)
_EVENTS: Final = {
    event: QUEUE_EVENTS.labels(event=event)
    for event in ("claimed", "completed", "fenced", "expired", "dead", "review")
}
"""Counter children looked up once: ``labels()`` takes a lock and hashes on every call."""


def _lit(value: str) -> sa.ColumnElement[Any]:
    """A constant string as a SQL literal (a fixed plan, and SQLite matches the partial index's WHERE only
    against literals)."""
    return sa.literal_column(f"'{value}'", sa.String)


def _lit_int(value: int) -> sa.ColumnElement[int]:
    """A constant LIMIT in the SQL text: as a parameter, PostgreSQL's generic plan assumes an unknown limit,
    prices it far above the custom plans and so re-plans the claim on every execution."""
    return sa.literal_column(str(int(value)), sa.Integer)


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    """A named parameter typed like ``column`` (so timestamps and JSON are converted on both databases)."""
    return sa.bindparam(name, type_=column.type)


class _Statements:
    """The hot path's Core statements, built once per queue: no ORM objects loaded, nothing constructed per
    call, and each statement's cache key is computed once, so SQLAlchemy goes straight to its compiled form.

    Parameters: ``annotator``, ``now``, ``expires``, ``gold``, ``max_attempts`` (claim); ``task``,
    ``token``, ``annotator``, ``now``, ``answer_*`` (complete).
    """

    def __init__(self, postgres: bool) -> None:
        t, a = _TASKS, _ANSWERS
        annotator, now = _param("annotator", t.c.leased_by), _param("now", t.c.updated_at)
        max_attempts = _param("max_attempts", t.c.attempts)
        self.sweep = (
            sa.update(t)
            .where(
                t.c.status == _lit("leased"),
                t.c.lease_expires_at <= now,
                t.c.attempts >= max_attempts,
                t.c.is_gold.is_(False),
            )
            .values(status=_lit("dead"), leased_by=sa.null(), lease_expires_at=sa.null(), updated_at=now)
        )

        # -- claim: the most urgent task this annotator has not answered, in the claim index's order.
        pick = t.alias("pick")
        answered = sa.exists().where(a.c.task_id == pick.c.id, a.c.annotator_id == annotator)
        candidate = [
            pick.c.is_gold == _param("gold", t.c.is_gold),
            pick.c.status.in_([_lit(s) for s in _CLAIMABLE]),  # verbatim the index predicate
            sa.or_(
                pick.c.status == _lit("pending"),
                sa.and_(
                    pick.c.status == _lit("leased"),
                    pick.c.lease_expires_at <= now,
                    sa.or_(pick.c.attempts < max_attempts, pick.c.is_gold),
                ),
            ),
            ~answered,
        ]
        lease_values = {
            "status": _lit("leased"),
            "leased_by": annotator,
            "lease_token": t.c.lease_token + 1,
            "lease_expires_at": _param("expires", t.c.lease_expires_at),
            "attempts": t.c.attempts + 1,
            "updated_at": now,
        }
        order = (pick.c.priority.desc(), pick.c.id)
        if postgres:
            # One statement, one round trip: lock the first claimable row nobody else holds (SKIP LOCKED),
            # lease it and return it with its crop. The crop join is outside the LIMIT, so it costs one row.
            chosen = (
                sa.select(pick.c.id, pick.c.status.label("was"))
                .where(*candidate)
                .order_by(*order)
                .limit(_lit_int(1))
                .with_for_update(skip_locked=True)
                .subquery("chosen")
            )
            self.claim = (
                sa.update(t)
                .where(t.c.id == chosen.c.id, _CROPS.c.id == t.c.crop_pk)
                .values(**lease_values)
                .returning(t.c.id, t.c.lease_token, t.c.priority, chosen.c.was, *_LEASE_CROP_COLUMNS)
            )
        else:
            # SQLite: the transaction is BEGIN IMMEDIATE (one writer), so select-then-update is safe; its
            # UPDATE ... RETURNING cannot return a joined table's columns, hence two statements.
            self.pick = (
                sa.select(pick.c.id, pick.c.status, pick.c.priority, *_LEASE_CROP_COLUMNS)
                .join_from(pick, _CROPS, _CROPS.c.id == pick.c.crop_pk)
                .where(*candidate)
                .order_by(*order)
                .limit(_lit_int(1))
            )
            self.lease = (
                sa.update(t)
                .where(t.c.id == _param("task", t.c.id))
                .values(**lease_values)
                .returning(t.c.lease_token)
            )

        # -- complete: a conditional UPDATE on the fencing token, then the answer's INSERT.
        self.finish = {
            (skip, check_sku): self._finish(skip, check_sku)
            for skip in (False, True)
            for check_sku in (False, True)
        }
        answer = {
            "task_id": _param("task", a.c.task_id),
            "annotator_id": annotator,
            "outcome": _param("answer_outcome", a.c.outcome),
            "sku_id": _param("answer_sku", a.c.sku_id),
            "label": _param("answer_label", a.c.label),
            "details": _param("answer_details", a.c.details),
            "lease_token": _param("token", a.c.lease_token),
            "created_at": now,
        }
        self.answer = sa.insert(a).values(**answer)
        self.finish_and_answer: dict[tuple[bool, bool], sa.Select[Any]] = {}
        if postgres:
            # Both in one statement (a data-modifying CTE, atomic on its own): the INSERT takes its row from
            # the UPDATE, so a stale token inserts nothing.
            for key, finish in self.finish.items():
                done = finish.cte("finished")
                insert = sa.insert(a).from_select(
                    list(answer), sa.select(done.c.id, *list(answer.values())[1:])
                )
                self.finish_and_answer[key] = sa.select(*done.c).add_cte(insert.cte("answered"))

        self.fence = sa.select(t.c.status, t.c.lease_token, t.c.leased_by).where(
            t.c.id == _param("task", t.c.id)
        )
        self.extend = (
            sa.update(t)
            .where(*self._fenced())
            .values(lease_expires_at=_param("expires", t.c.lease_expires_at), updated_at=now)
            .returning(t.c.lease_expires_at)
        )
        self.first_answer = (
            sa.select(a.c.details)
            .where(a.c.task_id == _param("task", a.c.task_id), a.c.outcome != _lit("skip"))
            .order_by(a.c.id)
            .limit(1)
        )
        self.set_final_label = (
            sa.update(t)
            .where(t.c.id == _param("task", t.c.id))
            .values(final_label=_param("final_label", t.c.final_label))
        )

    @staticmethod
    def _fenced() -> list[sa.ColumnElement[bool]]:
        """Only the current lease holder's token matches; a lease that merely expired still does."""
        t = _TASKS
        return [
            t.c.id == _param("task", t.c.id),
            t.c.status == _lit("leased"),
            t.c.lease_token == _param("token", t.c.lease_token),
            t.c.leased_by == _param("annotator", t.c.leased_by),
        ]

    @staticmethod
    def _finish(skip: bool, check_sku: bool) -> sa.Update:
        """Close the lease and move the task on, deciding the consensus in SQL (the other annotators'
        answers are committed; the current lease holder is the only one who can answer now)."""
        t, a = _TASKS, _ANSWERS
        values: dict[str, Any] = {
            "leased_by": sa.null(),
            "lease_expires_at": sa.null(),
            "attempts": 0,
            "updated_at": _param("now", t.c.updated_at),
        }
        if skip:
            values["status"] = _lit("pending")
        else:
            label = _param("answer_label", t.c.final_label)
            others = (a.c.task_id == t.c.id, a.c.outcome != _lit("skip"))
            answers = sa.select(sa.func.count()).where(*others).scalar_subquery() + 1
            agree = ~sa.exists().where(*others, a.c.label != label)
            settles = sa.and_(
                t.c.is_gold.is_(False), sa.or_(t.c.required <= 1, sa.and_(answers >= t.c.required, agree))
            )
            values["status"] = sa.case(
                (t.c.is_gold, _lit("pending")),  # gold stays available for the next annotator
                (settles, _lit("done")),
                (answers < t.c.required, _lit("pending")),
                else_=_lit("review"),
            )
            values["final_label"] = sa.case((settles, label), else_=t.c.final_label)
            values["resolved_by"] = sa.case(
                (settles, _param("annotator", t.c.resolved_by)), else_=t.c.resolved_by
            )
        where = _Statements._fenced()
        if check_sku:
            where.append(sa.exists().where(_SKUS.c.sku_id == _param("answer_sku", _SKUS.c.sku_id)))
        return (
            sa.update(t)
            .where(*where)
            .values(**values)
            .returning(t.c.id, t.c.status, t.c.is_gold, t.c.gold_label, t.c.crop_pk)
        )


class AnnotationQueue:
    """Queue operations, each in its own transaction. ``clock`` and ``rng`` are injectable for tests.

    Claim and complete are Core statements (built once, see `_Statements`): on PostgreSQL each is one
    autocommit statement, so one round trip after the pool's ping; on SQLite they share one ``BEGIN
    IMMEDIATE`` transaction per call.
    """

    def __init__(
        self,
        db: Database,
        *,
        lease_s: float = 300.0,
        max_attempts: int = 3,
        gold_rate: float = 0.0,
        clock: Callable[[], datetime] = m.utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_s)
        self.max_attempts = max_attempts
        self.gold_rate = gold_rate
        self.clock = clock
        self.rng = rng or random.Random()
        self._next_sweep: datetime | None = None
        self._postgres = db.is_postgres
        self._sql = _Statements(self._postgres)
        # Single statements need no transaction around them: autocommit saves BEGIN and COMMIT round trips.
        self._autocommit = db.engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        """Autocommit on PostgreSQL (every hot-path write is one statement); a transaction on SQLite."""
        if self._postgres:
            with self._autocommit.connect() as conn:
                yield conn
        else:
            with self.db.engine.begin() as conn:
                yield conn

    # -- claim ----------------------------------------------------------------------------------------

    def _expire(self, conn: sa.Connection, now: datetime) -> int:
        """Expired leases with no attempts left become dead (gold tasks never die).

        Swept at most once a second per process: claims skip such tasks anyway (they are ``leased`` with
        no attempts left), so the sweep only has to keep the ``dead`` count current.
        """
        if self._next_sweep is not None and now < self._next_sweep:
            return 0
        self._next_sweep = now + timedelta(seconds=1)
        dead = conn.execute(self._sql.sweep, {"now": now, "max_attempts": self.max_attempts}).rowcount
        if dead:
            _EVENTS["dead"].inc(dead)
        return dead

    def claim(self, annotator_id: int) -> Lease | None:
        """Lease the most urgent task this annotator has not answered yet (None when there is none).

        A gold task is wanted at ``gold_rate``; when none is left for this annotator, a regular one.
        """
        now = self.clock()
        want_gold = self.gold_rate > 0 and self.rng.random() < self.gold_rate
        params = {
            "annotator": annotator_id,
            "now": now,
            "expires": now + self.lease,
            "max_attempts": self.max_attempts,
            "gold": want_gold,
        }
        with self._connection() as conn:
            self._expire(conn, now)
            row = self._take(conn, params)
            if row is None and want_gold:
                row = self._take(conn, params | {"gold": False})
        if row is None:
            return None
        task_id, token, priority, was = row[:4]
        crop_id, object_key, store_id, device_id, source, width, height, candidates = row[4:]
        if was == "leased":
            _EVENTS["expired"].inc()
        _EVENTS["claimed"].inc()
        return Lease(
            task_id=task_id,
            token=token,
            expires_at=params["expires"],
            crop_id=crop_id,
            object_key=object_key,
            store_id=store_id,
            device_id=device_id,
            source=source,
            width=width,
            height=height,
            priority=priority,
            suggestions=list(candidates),
        )

    def _take(self, conn: sa.Connection, params: dict[str, Any]) -> Sequence[Any] | None:
        """Lease one task: (id, token, priority, previous status, the crop's lease columns...), or None."""
        if self._postgres:
            return conn.execute(self._sql.claim, params).first()
        picked = conn.execute(self._sql.pick, params).first()
        if picked is None:
            return None
        task_id, was, priority, *crop = picked
        token = conn.execute(self._sql.lease, params | {"task": task_id}).scalar_one()
        return (task_id, token, priority, was, *crop)

    # -- complete -------------------------------------------------------------------------------------

    def _refuse(
        self, conn: sa.Connection, task_id: int, token: int, annotator_id: int, sku_id: str | None
    ) -> NoReturn:
        """Why a fenced UPDATE matched no row: no task, a stale token, or (fence intact) an unknown SKU."""
        row = conn.execute(self._sql.fence, {"task": task_id}).first()
        if row is None:
            raise TaskNotFound(task_id)
        status, current, holder = row
        if sku_id is not None and status == "leased" and current == token and holder == annotator_id:
            raise InvalidAnswer(f"sku_id {sku_id!r} is not in the catalogue")
        _EVENTS["fenced"].inc()
        raise LeaseLost(
            f"task {task_id}: token {token} is not the current lease (status {status}, token {current})"
        )

    def extend(self, task_id: int, token: int, annotator_id: int) -> datetime:
        """Renew a lease (the annotation UI calls this while a person is still working on the crop)."""
        now = self.clock()
        params = {"task": task_id, "token": token, "annotator": annotator_id, "now": now}
        params["expires"] = expires = now + self.lease
        with self._connection() as conn:
            if conn.execute(self._sql.extend, params).first() is None:
                self._refuse(conn, task_id, token, annotator_id, None)
        return expires

    def complete(
        self,
        task_id: int,
        token: int,
        annotator_id: int,
        outcome: str,
        sku_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> CompleteResult:
        """Record an answer under the current fencing token; raises `LeaseLost` for a stale token.

        One conditional UPDATE (the fence, the SKU check and the consensus decision in its WHERE and SET)
        and the answer's INSERT: one statement on PostgreSQL. A ``new_sku`` answer that settles the task
        also creates the pending catalogue entry, in the same transaction (the ORM path; it is rare).
        """
        label = label_of(outcome, sku_id)
        params = {
            "task": task_id,
            "token": token,
            "annotator": annotator_id,
            "now": self.clock(),
            "answer_outcome": outcome,
            "answer_sku": sku_id,
            "answer_label": label,
            "answer_details": dict(details or {}),
        }
        key = (outcome == "skip", outcome == "sku")
        created = None
        if outcome == "new_sku":
            with self.db.session() as s:
                conn = s.connection()
                row = conn.execute(self._sql.finish[key], params).first()
                if row is None:
                    self._refuse(conn, task_id, token, annotator_id, sku_id)
                conn.execute(self._sql.answer, params)
                if row.status == "done":
                    created = self._create_sku(s, row.crop_pk, task_id, annotator_id)
                    conn.execute(
                        self._sql.set_final_label, {"task": task_id, "final_label": f"sku:{created}"}
                    )
        else:
            with self._connection() as conn:
                if self._postgres:
                    row = conn.execute(self._sql.finish_and_answer[key], params).first()
                else:
                    row = conn.execute(self._sql.finish[key], params).first()
                    if row is not None:
                        conn.execute(self._sql.answer, params)
                if row is None:
                    self._refuse(conn, task_id, token, annotator_id, sku_id)
        _EVENTS["completed"].inc()
        task_id, status, is_gold, gold_label, _crop_pk = row
        if outcome != "skip" and is_gold:
            return CompleteResult(task_id, status, label, gold_correct=label == gold_label)
        if status == "done":
            final = f"sku:{created}" if created else label
            return CompleteResult(task_id, status, label, final_label=final, created_sku=created)
        if status == "review":
            _EVENTS["review"].inc()
        return CompleteResult(task_id, status, label)

    def _create_sku(self, s: Session, crop_pk: int, task_id: int, actor_id: int) -> str:
        """The pending SKU a settled ``new_sku`` answer proposes, from the first answer's details."""
        from cloud_api.catalogue import create_pending_sku

        details = s.connection().execute(self._sql.first_answer, {"task": task_id}).scalar_one()
        actor = s.get(m.User, actor_id)
        crop = s.get(m.Crop, crop_pk)
        assert crop is not None  # the task's foreign key
        return create_pending_sku(s, details, actor=actor.username if actor else str(actor_id), crop=crop)

    def _locked_task(self, s: Session, task_id: int) -> m.AnnotationTask:
        stmt = sa.select(m.AnnotationTask).where(m.AnnotationTask.id == task_id)
        if is_postgres(s):
            stmt = stmt.with_for_update()
        task = s.scalars(stmt).first()
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def _resolve(
        self,
        s: Session,
        task: m.AnnotationTask,
        label: str,
        answer: m.Annotation,
        actor_id: int,
        now: datetime,
    ) -> CompleteResult:
        created = None
        if label == "new_sku":
            from cloud_api.catalogue import create_pending_sku

            actor = s.get(m.User, actor_id)
            created = create_pending_sku(
                s, answer.details, actor=actor.username if actor else str(actor_id), crop=task.crop
            )
            label = f"sku:{created}"
        task.status, task.final_label, task.resolved_by, task.updated_at = "done", label, actor_id, now
        return CompleteResult(task.id, task.status, answer.label, final_label=label, created_sku=created)

    def review(
        self,
        task_id: int,
        reviewer_id: int,
        outcome: str,
        sku_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> CompleteResult:
        """A reviewer settles a disagreement (or overrides a resolved task)."""
        label = label_of(outcome, sku_id)
        if outcome == "skip":
            raise InvalidAnswer("a review cannot skip")
        now = self.clock()
        with self.db.session() as s:
            task = self._locked_task(s, task_id)
            if task.is_gold or task.status not in ("review", "done"):
                raise LeaseLost(f"task {task_id} is {task.status}; only review or done tasks can be reviewed")
            if outcome == "sku" and s.get(m.Sku, sku_id) is None:
                raise InvalidAnswer(f"sku_id {sku_id!r} is not in the catalogue")
            answer = m.Annotation(
                task_id=task.id, annotator_id=reviewer_id, outcome=outcome, sku_id=sku_id, label=label
            )
            answer.details = dict(details or {})
            return self._resolve(s, task, label, answer, reviewer_id, now)

    def requeue(self, task_id: int) -> None:
        """Give a dead task a fresh set of attempts."""
        with self.db.session() as s:
            task = self._locked_task(s, task_id)
            if task.status != "dead":
                raise LeaseLost(f"task {task_id} is {task.status}, not dead")
            task.status, task.attempts, task.updated_at = "pending", 0, self.clock()

    def add_gold(self, crop_pk: int, outcome: str, sku_id: str | None = None) -> int:
        """Make a crop with a known answer a gold task."""
        label = label_of(outcome, sku_id)
        if outcome == "skip":
            raise InvalidAnswer("gold needs a real answer")
        with self.db.session() as s:
            if s.get(m.Crop, crop_pk) is None:
                raise TaskNotFound(f"crop {crop_pk}")
            task = m.AnnotationTask(crop_pk=crop_pk, is_gold=True, gold_label=label, status="pending")
            s.add(task)
            s.flush()
            return task.id

    # -- reports --------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.db.session() as s:
            rows = s.execute(
                sa.select(m.AnnotationTask.status, sa.func.count())
                .where(m.AnnotationTask.is_gold.is_(False))
                .group_by(m.AnnotationTask.status)
            ).all()
        return {status: 0 for status in TASK_STATUSES} | {status: n for status, n in rows}

    def annotator_accuracy(self) -> list[dict[str, Any]]:
        """Per annotator: answers on gold tasks and the share that matched the known answer."""
        with self.db.session() as s:
            rows = s.execute(
                sa.select(m.User.username, m.Annotation.label, m.AnnotationTask.gold_label)
                .join(m.AnnotationTask, m.Annotation.task_id == m.AnnotationTask.id)
                .join(m.User, m.Annotation.annotator_id == m.User.id)
                .where(m.AnnotationTask.is_gold.is_(True), m.Annotation.outcome != "skip")
            ).all()
        per: dict[str, list[bool]] = defaultdict(list)
        for username, label, gold in rows:
            per[username].append(label == gold)
        return [
            {"annotator": u, "gold_answers": len(v), "gold_correct": sum(v), "accuracy": sum(v) / len(v)}
            for u, v in sorted(per.items())
        ]

    def agreement(self) -> dict[str, Any]:
        """Inter-annotator agreement on regular tasks with at least two answers."""
        with self.db.session() as s:
            rows = s.execute(
                sa.select(m.Annotation.task_id, m.User.username, m.Annotation.label)
                .join(m.AnnotationTask, m.Annotation.task_id == m.AnnotationTask.id)
                .join(m.User, m.Annotation.annotator_id == m.User.id)
                .where(m.AnnotationTask.is_gold.is_(False), m.Annotation.outcome != "skip")
            ).all()
        by_task: dict[int, dict[str, str]] = defaultdict(dict)
        for task_id, username, label in rows:
            by_task[task_id][username] = label
        multi = {t: a for t, a in by_task.items() if len(a) >= 2}
        pairs = []
        annotators = sorted({u for a in multi.values() for u in a})
        for a, b in itertools.combinations(annotators, 2):
            shared = [(x[a], x[b]) for x in multi.values() if a in x and b in x]
            if shared:
                pairs.append(
                    {
                        "a": a,
                        "b": b,
                        "tasks": len(shared),
                        "kappa": cohen_kappa([p[0] for p in shared], [p[1] for p in shared]),
                    }
                )
        return {
            "tasks": len(multi),
            "fleiss_kappa": fleiss_kappa([list(x.values()) for x in multi.values()]),
            "pairs": pairs,
        }


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters over the same items; None when chance agreement is total."""
    if len(a) != len(b) or not a:
        raise ValueError("two equally long, non-empty rating lists are needed")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(items: list[list[str]]) -> float | None:
    """Fleiss' kappa, generalised to a varying number of raters per item (each item needs >= 2)."""
    items = [i for i in items if len(i) >= 2]
    if not items:
        return None
    totals: Counter[str] = Counter()
    p_items = []
    for ratings in items:
        n = len(ratings)
        counts = Counter(ratings)
        totals.update(counts)
        p_items.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
    n_ratings = sum(totals.values())
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((c / n_ratings) ** 2 for c in totals.values())
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)
