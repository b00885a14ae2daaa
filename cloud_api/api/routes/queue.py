"""The annotation queue over HTTP: claim, complete, extend, review, gold and agreement statistics."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy.orm import selectinload

from cloud_api import models as m
from cloud_api.api.deps import Admin, Annotator, Reviewer, ServicesDep
from cloud_api.api.schemas import (
    AnnotationOut,
    CompleteIn,
    CompleteOut,
    GoldIn,
    LeaseOut,
    ReviewIn,
    ReviewTaskOut,
    TokenIn,
)
from cloud_api.queue import CompleteResult, InvalidAnswer, LeaseLost, TaskNotFound

router = APIRouter(prefix="/queue", tags=["queue"])
TaskPath = Annotated[int, Path(ge=1, le=2**62)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such task"},
    409: {"description": "stale fencing token: the lease was taken over or the task moved on"},
    422: {"description": "the answer does not fit the outcome"},
}


def _image_url(crop_id: str) -> str:
    return f"/crops/{crop_id}/image"


def _fail(exc: Exception) -> HTTPException:
    if isinstance(exc, TaskNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, "no such task")
    if isinstance(exc, LeaseLost):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))


def _out(r: CompleteResult) -> CompleteOut:
    return CompleteOut(
        task_id=r.task_id,
        status=r.status,
        label=r.label,
        final_label=r.final_label,
        created_sku=r.created_sku,
    )


@router.post(
    "/claim",
    response_model=LeaseOut,
    summary="Lease the next task (annotator); 204 when the queue is empty",
    responses={204: {"description": "nothing to do"}},
)
def claim(svc: ServicesDep, caller: Annotator) -> Any:
    lease = svc.queue.claim(caller.id)
    if lease is None:
        return Response(status_code=204)
    return LeaseOut(
        task_id=lease.task_id,
        token=lease.token,
        expires_at=lease.expires_at,
        crop_id=lease.crop_id,
        image_url=_image_url(lease.crop_id),
        store_id=lease.store_id,
        device_id=lease.device_id,
        source=lease.source,
        width=lease.width,
        height=lease.height,
        priority=lease.priority,
        suggestions=lease.suggestions,
    )


@router.post(
    "/tasks/{task_id}/complete", response_model=CompleteOut, summary="Answer a leased task", responses=_ERRORS
)
def complete(task_id: TaskPath, body: CompleteIn, svc: ServicesDep, caller: Annotator) -> CompleteOut:
    try:
        result = svc.queue.complete(task_id, body.token, caller.id, body.outcome, body.sku_id, body.details)
    except (TaskNotFound, LeaseLost, InvalidAnswer) as exc:
        raise _fail(exc) from None
    return _out(result)


@router.post("/tasks/{task_id}/extend", summary="Renew a lease", responses=_ERRORS)
def extend(task_id: TaskPath, body: TokenIn, svc: ServicesDep, caller: Annotator) -> dict[str, Any]:
    try:
        expires = svc.queue.extend(task_id, body.token, caller.id)
    except (TaskNotFound, LeaseLost) as exc:
        raise _fail(exc) from None
    return {"task_id": task_id, "expires_at": expires}


@router.get(
    "/review", response_model=list[ReviewTaskOut], summary="Tasks whose annotators disagreed (reviewer)"
)
def review_list(svc: ServicesDep, _: Reviewer, limit: int = 50) -> list[ReviewTaskOut]:
    limit = max(1, min(limit, 500))
    with svc.db.session() as s:
        tasks = s.scalars(
            sa.select(m.AnnotationTask)
            .where(m.AnnotationTask.status == "review")
            .options(selectinload(m.AnnotationTask.annotations), selectinload(m.AnnotationTask.crop))
            .order_by(m.AnnotationTask.priority.desc(), m.AnnotationTask.id)
            .limit(limit)
        ).all()
        names = {uid: name for uid, name in s.execute(sa.select(m.User.id, m.User.username))}
        return [
            ReviewTaskOut(
                task_id=t.id,
                crop_id=t.crop.crop_id,
                image_url=_image_url(t.crop.crop_id),
                suggestions=list(t.crop.candidates),
                annotations=[
                    AnnotationOut(
                        annotator=names.get(a.annotator_id, "?"),
                        outcome=a.outcome,
                        sku_id=a.sku_id,
                        label=a.label,
                        created_at=a.created_at,
                    )
                    for a in t.annotations
                ],
            )
            for t in tasks
        ]


@router.post(
    "/tasks/{task_id}/review",
    response_model=CompleteOut,
    summary="Settle a task (reviewer)",
    responses=_ERRORS,
)
def review(task_id: TaskPath, body: ReviewIn, svc: ServicesDep, caller: Reviewer) -> CompleteOut:
    try:
        result = svc.queue.review(task_id, caller.id, body.outcome, body.sku_id, body.details)
    except (TaskNotFound, LeaseLost, InvalidAnswer) as exc:
        raise _fail(exc) from None
    return _out(result)


@router.post("/tasks/{task_id}/requeue", summary="Give a dead task new attempts (admin)", responses=_ERRORS)
def requeue(task_id: TaskPath, svc: ServicesDep, _: Admin) -> dict[str, Any]:
    try:
        svc.queue.requeue(task_id)
    except (TaskNotFound, LeaseLost) as exc:
        raise _fail(exc) from None
    return {"task_id": task_id, "status": "pending"}


@router.post(
    "/gold",
    status_code=201,
    summary="Make a crop with a known answer a gold task (reviewer)",
    responses={404: {"description": "no such crop"}, 422: {"description": "invalid answer"}},
)
def add_gold(body: GoldIn, svc: ServicesDep, _: Reviewer) -> dict[str, int]:
    with svc.db.session() as s:
        crop_pk = s.scalar(sa.select(m.Crop.id).where(m.Crop.crop_id == body.crop_id))
        if crop_pk is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such crop")
        exists = s.scalar(
            sa.select(m.AnnotationTask.id).where(
                m.AnnotationTask.crop_pk == crop_pk, m.AnnotationTask.is_gold
            )
        )
    if exists is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, "crop is already gold")
    try:
        if body.outcome == "sku":
            with svc.db.session() as s:
                if body.sku_id is None or s.get(m.Sku, body.sku_id) is None:
                    raise InvalidAnswer(f"sku_id {body.sku_id!r} is not in the catalogue")
        task_id = svc.queue.add_gold(crop_pk, body.outcome, body.sku_id)
    except (TaskNotFound, InvalidAnswer) as exc:
        raise _fail(exc) from None
    return {"task_id": task_id}


@router.get("/stats", summary="Task counts by status (reviewer)")
def stats(svc: ServicesDep, _: Reviewer) -> dict[str, int]:
    return svc.queue.counts()


@router.get("/stats/annotators", summary="Per-annotator accuracy on gold tasks (reviewer)")
def annotator_stats(svc: ServicesDep, _: Reviewer) -> list[dict[str, Any]]:
    return svc.queue.annotator_accuracy()


@router.get(
    "/stats/agreement", summary="Inter-annotator agreement: Fleiss' and pairwise Cohen's kappa (reviewer)"
)
def agreement(svc: ServicesDep, _: Reviewer) -> dict[str, Any]:
    return svc.queue.agreement()
