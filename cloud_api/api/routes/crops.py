"""Crops: metadata and the JPEG for the annotation tool."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Response, status

from cloud_api import models as m
from cloud_api.api.deps import Annotator, ServicesDep
from cloud_api.api.schemas import CropOut
from cloud_api.storage import ObjectNotFound

router = APIRouter(prefix="/crops", tags=["crops"])
CropPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
_404 = {404: {"description": "no such crop"}}


def _crop(svc: ServicesDep, crop_id: str) -> m.Crop:
    with svc.db.session() as s:
        crop = s.scalar(sa.select(m.Crop).where(m.Crop.crop_id == crop_id))
    if crop is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such crop")
    return crop


@router.get("/{crop_id}", response_model=CropOut, summary="Crop metadata (annotator)", responses=_404)
def get_crop(crop_id: CropPath, svc: ServicesDep, _: Annotator) -> CropOut:
    c = _crop(svc, crop_id)
    return CropOut(
        crop_id=c.crop_id,
        object_key=c.object_key,
        store_id=c.store_id,
        device_id=c.device_id,
        camera_id=c.camera_id,
        captured_at=c.captured_at,
        received_at=c.received_at,
        source=c.source,
        width=c.width,
        height=c.height,
        priority=c.priority,
        reasons=list(c.reasons),
        candidates=list(c.candidates),
        image_url=f"/crops/{c.crop_id}/image",
    )


@router.get(
    "/{crop_id}/image",
    summary="The crop's JPEG (annotator)",
    response_class=Response,
    responses={**_404, 200: {"content": {"image/jpeg": {}}}},
)
def get_image(crop_id: CropPath, svc: ServicesDep, _: Annotator) -> Response:
    crop = _crop(svc, crop_id)
    try:
        data = svc.store.get(crop.object_key)
    except ObjectNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image missing from object storage") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})
