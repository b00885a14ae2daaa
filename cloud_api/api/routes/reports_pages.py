"""The merchandiser web app: server-rendered HTML (Jinja2) over `cloud_api.reports.service`.

No JavaScript build: pages are plain HTML with inline SVG, styled for screen and print. Log-in puts the
bearer token in an HttpOnly, SameSite=Lax cookie, so the pages, CSV links and photos share one session;
every page is a GET and changes nothing, log-out is a POST. Pages are not part of the OpenAPI document.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from cloud_api.api.deps import Caller, ServicesDep
from cloud_api.api.routes.reports import REPORT_ROLES, SESSION_COOKIE, token_caller
from cloud_api.api.schemas import ID_PATTERN
from cloud_api.reports import service
from cloud_api.reports import views as v
from cloud_api.reports.data import bay_label
from cloud_api.security import authenticate, issue_token, revoke_token

__all__ = ["router"]

ASSETS = FsPath(__file__).resolve().parents[2] / "reports"
templates = Jinja2Templates(directory=str(ASSETS / "templates"))
router = APIRouter(prefix="/app", include_in_schema=False)

StoreId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
BayId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
Days = Annotated[int, Query(ge=1, le=92)]


def sparkline(
    values: list[float | None], width: float = 160, height: float = 36, lo: float | None = None
) -> dict:
    """Polyline points for a small trend line; gaps (days without captures) break the line."""
    vals = [x for x in values if x is not None]
    if not vals:
        return {"segments": [], "last": None, "width": width, "height": height}
    lo = min(vals) if lo is None else min(lo, min(vals))
    hi = max(vals)
    span = hi - lo or 1.0
    step = width / max(len(values) - 1, 1)
    segments: list[list[tuple[float, float]]] = [[]]
    for i, x in enumerate(values):
        if x is None:
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append((round(i * step, 1), round(height - 3 - (x - lo) / span * (height - 6), 1)))
    segs = [" ".join(f"{a},{b}" for a, b in seg) for seg in segments if seg]
    last = segments[-1][-1] if segments[-1] else None
    return {"segments": segs, "last": last, "width": width, "height": height, "lo": lo, "hi": hi}


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f} %"


def money(x: float | None) -> str:
    return "–" if x is None else f"{x:,.2f}"


def when(iso: str | datetime, short: bool = False) -> str:
    t = datetime.fromisoformat(iso) if isinstance(iso, str) else iso
    return t.strftime("%d %b, %H:%M" if short else "%d %b %Y, %H:%M UTC")


def day_label(iso: str) -> str:
    return date.fromisoformat(iso).strftime("%a %d %b")


def tone(x: float | None, good: float = 95.0, fair: float = 85.0) -> str:
    """Traffic-light class of a percentage (targets a chain would set; these are sensible defaults)."""
    if x is None:
        return "none"
    return "good" if x >= good else "fair" if x >= fair else "poor"


def by_pct(rows: list[dict[str, Any]], key: str = "compliance_pct") -> list[dict[str, Any]]:
    """Worst first; groups without a figure (only unplanned products) last."""
    return sorted(rows, key=lambda r: (r.get(key) is None, r.get(key) or 0.0))


templates.env.filters["by_pct"] = by_pct
templates.env.globals.update(
    sparkline=sparkline,
    pct=pct,
    money=money,
    when=when,
    day_label=day_label,
    tone=tone,
    colour=v.colour,
    status_label=v.label,
    STATUS_STYLE=v.STATUS_STYLE,
    LEGEND=v.legend(),
    bay_label=bay_label,
)


def _session_caller(request: Request, svc: Any) -> Caller | None:
    return token_caller(svc, request.cookies.get(SESSION_COOKIE))


def _gate(request: Request, svc: Any) -> tuple[Caller | None, Response | None]:
    """The caller, or the response to send instead: to the log-in page, or a 403 page."""
    caller = _session_caller(request, svc)
    if caller is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return None, RedirectResponse(f"/app/login?next={quote(target)}", status.HTTP_303_SEE_OTHER)
    if caller.role not in REPORT_ROLES:
        page = templates.TemplateResponse(
            request,
            "error.html",
            {
                "caller": caller,
                "title": "Not for your role",
                "message": f"Reports are for merchandisers; you are signed in as {caller.role}.",
            },
            status_code=403,
        )
        return None, page
    return caller, None


def _render(request: Request, name: str, caller: Caller, **ctx: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"caller": caller, "nav": name.split(".")[0], **ctx})


def _not_found(request: Request, caller: Caller, exc: Exception) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "error.html",
        {"caller": caller, "title": "Nothing to show", "message": str(exc)},
        status_code=404,
    )


def _safe_next(target: str | None) -> str:
    """Only our own pages: never an open redirect to another site."""
    if target and target.startswith("/app/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/app/stores"


@router.get("")
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/app/stores", status.HTTP_303_SEE_OTHER)


@router.get("/static/reports.css")
def stylesheet() -> FileResponse:
    return FileResponse(ASSETS / "static" / "reports.css", media_type="text/css")


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_model=None)
async def login(request: Request, svc: ServicesDep) -> Response:
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    username, password = form.get("username", "")[:64], form.get("password", "")[:1024]
    target = _safe_next(form.get("next"))
    with svc.db.session() as s:
        user = authenticate(s, username, password) if username and password else None
        token = issue_token(s, user, svc.settings.cloud.token_ttl_s)[0] if user is not None else None
    if token is None:
        ctx = {"next": target, "error": "Wrong username or password.", "username": username}
        return templates.TemplateResponse(request, "login.html", ctx, status_code=401)
    resp = RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    resp.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=svc.settings.cloud.token_ttl_s,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )
    return resp


@router.post("/logout")
def logout(request: Request, svc: ServicesDep) -> RedirectResponse:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        with svc.db.session() as s:
            revoke_token(s, token)
    resp = RedirectResponse("/app/login", status.HTTP_303_SEE_OTHER)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/stores", response_class=HTMLResponse)
def stores_page(request: Request, svc: ServicesDep, days: Days = 14) -> Response:
    caller, deny = _gate(request, svc)
    if deny is not None or caller is None:
        return deny  # type: ignore[return-value]
    with svc.db.session() as s:
        sc = service.scope(s, svc.store, days=days)
        report = service.store_list(s, sc)
        regions = service.aggregates(sc, "region")["groups"]
        top = service.tasks(sc, 5)
    return _render(request, "stores.html", caller, r=report, regions=regions, top=top)


@router.get("/stores/{store_id}", response_class=HTMLResponse)
def store_page(request: Request, svc: ServicesDep, store_id: StoreId, days: Days = 14) -> Response:
    caller, deny = _gate(request, svc)
    if deny is not None or caller is None:
        return deny  # type: ignore[return-value]
    with svc.db.session() as s:
        try:
            r = service.store_report(s, service.scope(s, svc.store, days=days, store_id=store_id), store_id)
        except service.ReportError as exc:
            return _not_found(request, caller, exc)
    return _render(request, "store.html", caller, r=r)


@router.get("/stores/{store_id}/visit", response_class=HTMLResponse)
def visit_page(request: Request, svc: ServicesDep, store_id: StoreId, days: Days = 14) -> Response:
    """The printable visit sheet: the store's figures, its tasks as a checklist, every bay annotated."""
    caller, deny = _gate(request, svc)
    if deny is not None or caller is None:
        return deny  # type: ignore[return-value]
    with svc.db.session() as s:
        sc = service.scope(s, svc.store, days=days, store_id=store_id)
        try:
            r = service.store_report(s, sc, store_id)
            bays = [service.bay_report(s, sc, svc.store, store_id, b["bay_id"]) for b in r["bays"]]
        except service.ReportError as exc:
            return _not_found(request, caller, exc)
    return _render(request, "visit.html", caller, r=r, bays=bays, printed=datetime.now().astimezone())


@router.get("/stores/{store_id}/bays/{bay_id}", response_class=HTMLResponse)
def bay_page(
    request: Request,
    svc: ServicesDep,
    store_id: StoreId,
    bay_id: BayId,
    snapshot_id: Annotated[str | None, Query(pattern=ID_PATTERN, max_length=64)] = None,
    days: Days = 14,
) -> Response:
    caller, deny = _gate(request, svc)
    if deny is not None or caller is None:
        return deny  # type: ignore[return-value]
    with svc.db.session() as s:
        sc = service.scope(s, svc.store, days=days, store_id=store_id, bay_id=bay_id)
        try:
            b = service.bay_report(s, sc, svc.store, store_id, bay_id, snapshot_id)
        except service.ReportError as exc:
            return _not_found(request, caller, exc)
    return _render(request, "bay.html", caller, b=b)


@router.get("/tasks", response_class=HTMLResponse)
def tasks_page(
    request: Request,
    svc: ServicesDep,
    store_id: Annotated[str | None, Query(pattern=ID_PATTERN, max_length=64)] = None,
    region: Annotated[str | None, Query(max_length=128, pattern=r"^[^\x00]*$")] = None,
    days: Days = 14,
) -> Response:
    caller, deny = _gate(request, svc)
    if deny is not None or caller is None:
        return deny  # type: ignore[return-value]
    with svc.db.session() as s:
        sc = service.scope(s, svc.store, days=days, store_id=store_id or None, region=region or None)
        tasks = service.tasks(sc)
        stores = service.store_list(s, service.scope(s, svc.store, days=days))["stores"]
    query = "&".join(f"{k}={quote(x)}" for k, x in (("store_id", store_id), ("region", region)) if x)
    return _render(
        request,
        "tasks.html",
        caller,
        tasks=tasks,
        stores=stores,
        store_id=store_id,
        region=region,
        regions=sorted({st["region"] for st in stores}),
        csv_query=query,
        end=sc.end.isoformat(),
        total=round(sum(t["lost_revenue_per_day"] for t in tasks), 2),
    )


@router.get("/aggregates", response_class=HTMLResponse)
def aggregates_page(request: Request, svc: ServicesDep, days: Days = 14) -> Response:
    caller, deny = _gate(request, svc)
    if deny is not None or caller is None:
        return deny  # type: ignore[return-value]
    with svc.db.session() as s:
        sc = service.scope(s, svc.store, days=days)
        groups = {by: service.aggregates(sc, by) for by in ("region", "store", "category", "brand")}
        trend = service.store_list(s, sc)["trend"]
    return _render(
        request, "aggregates.html", caller, groups=groups, trend=trend, end=sc.end.isoformat(), days=days
    )
