"""Dead letters (admin): list, inspect, download the payload, replay after a fix."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from cloud_api import models as m
from cloud_api.api.deps import Admin, ServicesDep
from cloud_api.api.schemas import DeadLetterOut, ReplayOut
from cloud_api.ingest import replay_dead_letter

router = APIRouter(prefix="/dead-letters", tags=["dead letters"])
IdPath = Annotated[int, Path(ge=1, le=2**62)]
_404 = {404: {"description": "no such dead letter"}}


@router.get("", response_model=list[DeadLetterOut], summary="List dead letters, newest first")
def list_dead_letters(
    svc: ServicesDep,
    _: Admin,
    reason: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[DeadLetterOut]:
    stmt = sa.select(m.DeadLetter).order_by(m.DeadLetter.id.desc()).limit(limit).offset(offset)
    if reason:
        stmt = stmt.where(m.DeadLetter.reason == reason)
    with svc.db.session() as s:
        return [DeadLetterOut.model_validate(r, from_attributes=True) for r in s.scalars(stmt)]


@router.get("/{dl_id}", response_model=DeadLetterOut, summary="One dead letter", responses=_404)
def get_dead_letter(dl_id: IdPath, svc: ServicesDep, _: Admin) -> DeadLetterOut:
    with svc.db.session() as s:
        row = s.get(m.DeadLetter, dl_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dead letter")
        return DeadLetterOut.model_validate(row, from_attributes=True)


@router.get(
    "/{dl_id}/payload",
    summary="The payload as received",
    response_class=Response,
    responses={**_404, 200: {"content": {"application/octet-stream": {}}}},
)
def payload(dl_id: IdPath, svc: ServicesDep, _: Admin) -> Response:
    with svc.db.session() as s:
        row = s.get(m.DeadLetter, dl_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dead letter")
        data = svc.ingestor.dead_letter_payload(row)
    return Response(data, media_type="application/octet-stream")


@router.post(
    "/{dl_id}/replay", response_model=ReplayOut, summary="Run it through ingest again", responses=_404
)
def replay(dl_id: IdPath, svc: ServicesDep, _: Admin) -> ReplayOut:
    try:
        result = replay_dead_letter(svc.ingestor, dl_id)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dead letter") from None
    return ReplayOut(
        id=dl_id,
        status=result.status,
        reason=result.reason,
        crop_id=result.crop_id,
        object_key=result.object_key,
    )
