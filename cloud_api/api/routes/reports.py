"""Merchandiser reports as JSON and CSV (the HTML pages in `reports_pages` render the same dicts).

Callers authenticate with the bearer token, or with the session cookie the report pages set at log-in
(so a browser can follow the CSV and image links). Merchandisers and admins only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from cloud_api.api.deps import Caller, ServicesDep
from cloud_api.api.schemas import ID_PATTERN
from cloud_api.reports import data as d
from cloud_api.reports import service
from cloud_api.security import user_for_token
from cloud_api.storage import ObjectNotFound

__all__ = ["REPORT_ROLES", "SESSION_COOKIE", "router", "token_caller"]

SESSION_COOKIE = "shelfloop_session"
REPORT_ROLES = frozenset({"merchandiser", "admin"})
_bearer = HTTPBearer(auto_error=False, description="A token from POST /auth/token.")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="Set by the report pages' log-in.")


def token_caller(svc: Any, token: str | None) -> Caller | None:
    if not token:
        return None
    with svc.db.session() as s:
        user = user_for_token(s, token)
        return None if user is None else Caller(user.id, user.username, user.role)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def report_caller(
    svc: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Caller:
    bearer = creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else None
    if not bearer and not cookie:
        raise _unauthorized("missing bearer token")
    caller = token_caller(svc, bearer or cookie)
    if caller is None:
        raise _unauthorized("invalid or expired token")
    if caller.role not in REPORT_ROLES:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {caller.role!r} may not read reports")
    return caller


Reader = Annotated[Caller, Depends(report_caller)]
StoreId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
BayId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
Days = Annotated[int, Query(ge=1, le=92, description="Days in the window, ending on `end`.")]
End = Annotated[
    date | None, Query(description="Last day of the window (UTC); default: the day of the newest snapshot.")
]
StoreQ = Annotated[str | None, Query(pattern=ID_PATTERN, max_length=64)]
RegionQ = Annotated[str | None, Query(max_length=128, pattern=r"^[^\x00]*$")]


@dataclass(frozen=True)
class ReportWindow:
    """The filter the report lists share: the days ending on `end`, all stores or one store or region."""

    days: int
    end: date | None
    store_id: str | None
    region: str | None

    def scope(self, session: Any, svc: Any) -> service.Scope:
        return service.scope(
            session, svc.store, days=self.days, end=self.end, store_id=self.store_id, region=self.region
        )


def report_window(
    days: Days = 14, end: End = None, store_id: StoreQ = None, region: RegionQ = None
) -> ReportWindow:
    return ReportWindow(days, end, store_id, region)


Window = Annotated[ReportWindow, Depends(report_window)]

router = APIRouter(prefix="/reports", tags=["reports"])


def _not_found(exc: service.ReportError) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


def _csv(header: tuple[str, ...], rows: list[list[Any]], filename: str) -> Response:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    for row in rows:
        # A cell that a spreadsheet would run as a formula is quoted with a leading apostrophe.
        w.writerow([f"'{c}" if isinstance(c, str) and c[:1] in ("=", "+", "-", "@") else c for c in row])
    return Response(
        buf.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/stores", summary="Stores with KPI tiles, worst bays and daily trend (merchandiser)")
def stores(svc: ServicesDep, _: Reader, days: Days = 14, end: End = None, region: RegionQ = None) -> dict:
    with svc.db.session() as s:
        return service.store_list(s, service.scope(s, svc.store, days=days, end=end, region=region))


@router.get(
    "/stores/{store_id}",
    summary="One store: KPIs, bays, trend, category and brand breakdown, tasks (merchandiser)",
    responses={404: {"description": "no snapshots for this store in the window"}},
)
def store(svc: ServicesDep, _: Reader, store_id: StoreId, days: Days = 14, end: End = None) -> dict:
    with svc.db.session() as s:
        try:
            return service.store_report(
                s, service.scope(s, svc.store, days=days, end=end, store_id=store_id), store_id
            )
        except service.ReportError as exc:
            raise _not_found(exc) from None


@router.get(
    "/stores/{store_id}/bays/{bay_id}",
    summary="One bay: slot verdicts, photo overlay boxes, planogram drawing, history (merchandiser)",
    responses={404: {"description": "no such snapshot"}},
)
def bay(
    svc: ServicesDep,
    _: Reader,
    store_id: StoreId,
    bay_id: BayId,
    snapshot_id: Annotated[str | None, Query(pattern=ID_PATTERN, max_length=64)] = None,
    days: Days = 14,
    end: End = None,
) -> dict:
    with svc.db.session() as s:
        sc = service.scope(s, svc.store, days=days, end=end, store_id=store_id, bay_id=bay_id)
        try:
            return service.bay_report(s, sc, svc.store, store_id, bay_id, snapshot_id)
        except service.ReportError as exc:
            raise _not_found(exc) from None


@router.get("/tasks", summary="Open tasks, biggest estimated lost revenue per day first (merchandiser)")
def tasks(
    svc: ServicesDep,
    _: Reader,
    window: Window,
    limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
) -> list[dict]:
    with svc.db.session() as s:
        return service.tasks(window.scope(s, svc), limit)


@router.get("/tasks.csv", summary="The task list as CSV (merchandiser)", response_class=Response)
def tasks_csv(svc: ServicesDep, _: Reader, window: Window) -> Response:
    with svc.db.session() as s:
        sc = window.scope(s, svc)
        rows = d.task_csv_rows(d.build_tasks(sc.latest, sc.catalogue, sc.directory))
        return _csv(d.TASK_CSV_FIELDS, rows, f"shelfloop-tasks-{sc.end.isoformat()}.csv")


@router.get("/slots.csv", summary="Every slot verdict of every snapshot in the window as CSV (merchandiser)")
def slots_csv(svc: ServicesDep, _: Reader, window: Window, latest_only: bool = False) -> Response:
    with svc.db.session() as s:
        sc = window.scope(s, svc)
        rows = d.slot_csv_rows(sc.latest if latest_only else sc.snaps, sc.catalogue)
        return _csv(d.SLOT_CSV_FIELDS, rows, f"shelfloop-slots-{sc.end.isoformat()}.csv")


@router.get("/aggregates", summary="KPIs grouped by store, region, category or brand (merchandiser)")
def aggregates(
    svc: ServicesDep, _: Reader, window: Window, by: Literal["store", "region", "category", "brand"] = "store"
) -> dict:
    with svc.db.session() as s:
        return service.aggregates(window.scope(s, svc), by)


@router.get("/trends", summary="Daily compliance, availability and out-of-stock count (merchandiser)")
def trends(svc: ServicesDep, _: Reader, window: Window) -> dict:
    with svc.db.session() as s:
        sc = window.scope(s, svc)
        return {
            "end": sc.end.isoformat(),
            "days": sc.days,
            "points": d.daily_trend(sc.snaps, end=sc.end, days=sc.days),
        }


@router.get(
    "/snapshots/{snapshot_id}/image",
    summary="The photo of a compliance snapshot (merchandiser)",
    response_class=Response,
    responses={404: {"description": "no such snapshot, or it has no photo"}},
)
def snapshot_image(
    svc: ServicesDep, _: Reader, snapshot_id: Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
) -> Response:
    import sqlalchemy as sa

    from cloud_api import models as m

    with svc.db.session() as s:
        key = s.scalar(
            sa.select(m.ComplianceSnapshotRow.image_key).where(
                m.ComplianceSnapshotRow.snapshot_id == snapshot_id
            )
        )
    if key is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such snapshot, or it has no photo")
    try:
        data = svc.store.get(key)
    except ObjectNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the photo is gone from storage") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})
