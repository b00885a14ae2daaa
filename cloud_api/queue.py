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
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session, joinedload

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


class AnnotationQueue:
    """Queue operations, each in its own transaction. ``clock`` and ``rng`` are injectable for tests."""

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

    # -- claim ----------------------------------------------------------------------------------------

    def _expire(self, s: Session, now: datetime) -> int:
        """Expired leases with no attempts left become dead (gold tasks never die).

        Swept at most once a second per process: claims skip such tasks anyway (they are ``leased`` with
        no attempts left), so the sweep only has to keep the ``dead`` count current.
        """
        if self._next_sweep is not None and now < self._next_sweep:
            return 0
        self._next_sweep = now + timedelta(seconds=1)
        result = s.execute(
            sa.update(m.AnnotationTask)
            .where(
                m.AnnotationTask.status == "leased",
                m.AnnotationTask.lease_expires_at <= now,
                m.AnnotationTask.attempts >= self.max_attempts,
                m.AnnotationTask.is_gold.is_(False),
            )
            .values(status="dead", leased_by=None, lease_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount:
            QUEUE_EVENTS.labels(event="dead").inc(result.rowcount)
        return result.rowcount

    def _candidate(self, s: Session, annotator_id: int, now: datetime, gold: bool) -> m.AnnotationTask | None:
        t = m.AnnotationTask
        answered = sa.exists().where(m.Annotation.task_id == t.id, m.Annotation.annotator_id == annotator_id)
        stmt = (
            sa.select(t)
            .where(
                t.is_gold.is_(gold),
                sa.or_(
                    t.status == "pending",
                    sa.and_(
                        t.status == "leased",
                        t.lease_expires_at <= now,
                        sa.or_(t.attempts < self.max_attempts, t.is_gold.is_(True)),
                    ),
                ),
                ~answered,
            )
            .order_by(t.priority.desc(), t.id)
            .limit(1)
            .options(joinedload(t.crop))
        )
        if is_postgres(s):
            stmt = stmt.with_for_update(skip_locked=True, of=t)
        return s.scalars(stmt).first()

    def claim(self, annotator_id: int) -> Lease | None:
        """Lease the most urgent task this annotator has not answered yet (None when there is none)."""
        now = self.clock()
        want_gold = self.gold_rate > 0 and self.rng.random() < self.gold_rate
        with self.db.session() as s:
            self._expire(s, now)
            task = self._candidate(s, annotator_id, now, gold=want_gold)
            if task is None and want_gold:
                task = self._candidate(s, annotator_id, now, gold=False)
            if task is None:
                return None
            if task.status == "leased":
                QUEUE_EVENTS.labels(event="expired").inc()
            task.status = "leased"
            task.leased_by = annotator_id
            task.lease_token += 1
            task.lease_expires_at = now + self.lease
            task.attempts += 1
            task.updated_at = now
            crop = task.crop
            s.flush()
            QUEUE_EVENTS.labels(event="claimed").inc()
            return Lease(
                task_id=task.id,
                token=task.lease_token,
                expires_at=task.lease_expires_at,
                crop_id=crop.crop_id,
                object_key=crop.object_key,
                store_id=crop.store_id,
                device_id=crop.device_id,
                source=crop.source,
                width=crop.width,
                height=crop.height,
                priority=task.priority,
                suggestions=list(crop.candidates),
            )

    # -- complete -------------------------------------------------------------------------------------

    def _locked_task(self, s: Session, task_id: int) -> m.AnnotationTask:
        stmt = sa.select(m.AnnotationTask).where(m.AnnotationTask.id == task_id)
        if is_postgres(s):
            stmt = stmt.with_for_update()
        task = s.scalars(stmt).first()
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def _check_fence(self, task: m.AnnotationTask, token: int, annotator_id: int) -> None:
        if task.status != "leased" or task.lease_token != token or task.leased_by != annotator_id:
            QUEUE_EVENTS.labels(event="fenced").inc()
            raise LeaseLost(
                f"task {task.id}: token {token} is not the current lease (status {task.status}, "
                f"token {task.lease_token})"
            )

    def extend(self, task_id: int, token: int, annotator_id: int) -> datetime:
        """Renew a lease (the annotation UI calls this while a person is still working on the crop)."""
        now = self.clock()
        with self.db.session() as s:
            task = self._locked_task(s, task_id)
            self._check_fence(task, token, annotator_id)
            task.lease_expires_at = now + self.lease
            task.updated_at = now
            return task.lease_expires_at

    def complete(
        self,
        task_id: int,
        token: int,
        annotator_id: int,
        outcome: str,
        sku_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> CompleteResult:
        """Record an answer under the current fencing token; raises `LeaseLost` for a stale token."""
        label = label_of(outcome, sku_id)
        details = dict(details or {})
        now = self.clock()
        with self.db.session() as s:
            task = self._locked_task(s, task_id)
            self._check_fence(task, token, annotator_id)
            if outcome == "sku" and s.get(m.Sku, sku_id) is None:
                raise InvalidAnswer(f"sku_id {sku_id!r} is not in the catalogue")
            answer = m.Annotation(
                task_id=task.id,
                annotator_id=annotator_id,
                outcome=outcome,
                sku_id=sku_id,
                label=label,
                details=details,
                lease_token=token,
                created_at=now,
            )
            s.add(answer)
            s.flush()
            task.leased_by, task.lease_expires_at, task.attempts, task.updated_at = None, None, 0, now
            QUEUE_EVENTS.labels(event="completed").inc()
            if outcome == "skip":
                task.status = "pending"
                return CompleteResult(task.id, task.status, label)
            if task.is_gold:
                task.status = "pending"  # gold stays available for the next annotator
                return CompleteResult(task.id, task.status, label, gold_correct=label == task.gold_label)
            if task.required <= 1:  # no consensus: this answer settles it (saves loading the others)
                return self._resolve(s, task, label, answer, annotator_id, now)
            answers = [a for a in task.annotations if a.outcome != "skip"]
            if len(answers) < task.required:
                task.status = "pending"
                return CompleteResult(task.id, task.status, label)
            if len({a.label for a in answers}) == 1:
                return self._resolve(s, task, label, answers[0], annotator_id, now)
            task.status = "review"
            QUEUE_EVENTS.labels(event="review").inc()
            return CompleteResult(task.id, task.status, label)

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
