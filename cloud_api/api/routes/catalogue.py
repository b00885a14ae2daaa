"""Catalogue: SKUs, variants, reference images, import/export and the change log."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from sqlalchemy.orm import selectinload

from cloud_api import catalogue as cat
from cloud_api import models as m
from cloud_api.api.deps import AnyUser, Merchandiser, ServicesDep
from cloud_api.api.schemas import (
    ID_PATTERN,
    VARIANT_PATTERN,
    CatalogueDoc,
    CatalogueEventOut,
    ImportOut,
    SkuIn,
    VariantIn,
)
from cloud_api.ingest import full_jpeg_decode
from shelfloop import contract

router = APIRouter(prefix="/catalogue", tags=["catalogue"])
SkuPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
MAX_IMAGE_BYTES = contract.MAX_JPEG_BYTES


def _unprocessable(exc: cat.CatalogueError) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": exc.problems})


@router.get("/skus", summary="Search SKUs (any role: annotators pick answers from here)")
def list_skus(
    svc: ServicesDep,
    _: AnyUser,
    q: Annotated[str | None, Query(max_length=128, pattern=r"^[^\x00]*$")] = None,
    sku_status: Annotated[Literal["new", "active", "discontinued"] | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[dict[str, Any]]:
    stmt = sa.select(m.Sku).options(selectinload(m.Sku.variants), selectinload(m.Sku.images))
    if q:
        like = f"%{q.lower()}%"
        stmt = stmt.where(
            sa.or_(
                sa.func.lower(m.Sku.name).like(like),
                sa.func.lower(m.Sku.brand).like(like),
                m.Sku.sku_id.like(like),
                m.Sku.gtin == q,
            )
        )
    if sku_status:
        stmt = stmt.where(m.Sku.status == sku_status)
    with svc.db.session() as s:
        rows = s.scalars(stmt.order_by(m.Sku.sku_id).limit(limit).offset(offset)).all()
        return [cat.sku_to_json(x) for x in rows]


@router.get("/skus/{sku_id}", summary="One SKU", responses={404: {"description": "no such SKU"}})
def get_sku(sku_id: SkuPath, svc: ServicesDep, _: AnyUser) -> dict[str, Any]:
    with svc.db.session() as s:
        sku = s.get(m.Sku, sku_id)
        if sku is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such SKU")
        return cat.sku_to_json(sku)


@router.put(
    "/skus/{sku_id}",
    summary="Create or update a SKU (merchandiser)",
    responses={422: {"description": "invalid record"}},
)
def put_sku(sku_id: SkuPath, body: SkuIn, svc: ServicesDep, caller: Merchandiser) -> dict[str, Any]:
    record = body.model_dump()
    record["sku_id"] = sku_id
    try:
        with svc.db.session() as s:
            cat.upsert_sku(s, record, actor=caller.username)
            s.flush()
            sku = s.get(m.Sku, sku_id)
            s.refresh(sku)
            return cat.sku_to_json(sku)
    except cat.CatalogueError as exc:
        raise _unprocessable(exc) from None


@router.post(
    "/skus/{sku_id}/variants",
    status_code=201,
    summary="Map a packaging variant to this SKU (merchandiser)",
    responses={404: {"description": "no such SKU"}},
)
def add_variant(sku_id: SkuPath, body: VariantIn, svc: ServicesDep, caller: Merchandiser) -> dict[str, Any]:
    with svc.db.session() as s:
        if s.get(m.Sku, sku_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such SKU")
        changed = cat.add_variant(s, sku_id, body.variant_id, body.kind, body.gtin, actor=caller.username)
        return {"variant_id": body.variant_id, "sku_id": sku_id, "changed": changed}


@router.post(
    "/skus/{sku_id}/images",
    status_code=201,
    summary="Add a reference image (merchandiser); the body is the JPEG",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={404: {"description": "no such SKU"}, 413: {"description": "image too large"}},
)
async def add_image(
    sku_id: SkuPath,
    request: Request,
    svc: ServicesDep,
    caller: Merchandiser,
    variant_id: Annotated[str | None, Query(pattern=VARIANT_PATTERN)] = None,
) -> dict[str, str]:
    data = await request.body()
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"image over {MAX_IMAGE_BYTES} bytes")
    try:
        full_jpeg_decode(data)
    except contract.InvalidImage as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    with svc.db.session() as s:
        if s.get(m.Sku, sku_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such SKU")
        key = cat.add_reference_image(
            s, svc.store, sku_id, data, actor=caller.username, variant_id=variant_id
        )
    return {"object_key": key}


@router.post("/import", response_model=ImportOut, summary="Import a catalogue.json document (merchandiser)")
def import_json(body: CatalogueDoc, svc: ServicesDep, caller: Merchandiser) -> ImportOut:
    try:
        with svc.db.session() as s:
            report = cat.import_json(s, body.model_dump(), actor=caller.username)
    except cat.CatalogueError as exc:
        raise _unprocessable(exc) from None
    return ImportOut(**report.as_dict())


@router.post(
    "/import.csv",
    response_model=ImportOut,
    summary="Import CSV in the export's columns (merchandiser)",
    openapi_extra={
        "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}
    },
)
async def import_csv(request: Request, svc: ServicesDep, caller: Merchandiser) -> ImportOut:
    raw = await request.body()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "CSV must be UTF-8") from None
    try:
        with svc.db.session() as s:
            report = cat.import_csv(s, text.replace("\x00", ""), actor=caller.username)
    except cat.CatalogueError as exc:
        raise _unprocessable(exc) from None
    return ImportOut(**report.as_dict())


@router.get("/export", summary="The whole catalogue as catalogue.json")
def export_json(svc: ServicesDep, _: AnyUser) -> dict[str, Any]:
    with svc.db.session() as s:
        return cat.export_json(s)


@router.get("/export.csv", summary="The whole catalogue as CSV", response_class=Response)
def export_csv(svc: ServicesDep, _: AnyUser) -> Response:
    with svc.db.session() as s:
        return Response(cat.export_csv(s), media_type="text/csv")


@router.get("/events", response_model=list[CatalogueEventOut], summary="Catalogue change log (merchandiser)")
def events(
    svc: ServicesDep,
    _: Merchandiser,
    after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CatalogueEventOut]:
    with svc.db.session() as s:
        rows = s.scalars(
            sa.select(m.CatalogueEvent)
            .where(m.CatalogueEvent.id > after_id)
            .order_by(m.CatalogueEvent.id)
            .limit(limit)
        ).all()
        return [CatalogueEventOut.model_validate(r, from_attributes=True) for r in rows]
