"""The FastAPI application: `create_app` wires settings, database, storage and the routers together.

Served by ``shelfloop cloud serve`` (uvicorn). The schema is migrated at start, and an admin user can be
bootstrapped from settings (``cloud.bootstrap_admin`` / ``cloud.bootstrap_admin_password``) so a fresh
install is reachable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from cloud_api import models as m
from cloud_api.api.deps import Services
from cloud_api.api.routes import (
    auth,
    catalogue,
    crops,
    dead_letters,
    devices,
    health,
    queue,
    reports,
    reports_pages,
)
from cloud_api.db import Database
from cloud_api.devices import DeviceRegistry
from cloud_api.ingest import Ingestor
from cloud_api.metrics import HTTP_LATENCY, HTTP_REQUESTS
from cloud_api.queue import AnnotationQueue
from cloud_api.security import create_user
from cloud_api.storage import ObjectStore, make_object_store
from shelfloop import __version__
from shelfloop.settings import Settings, load_settings

__all__ = ["build_services", "create_app"]

log = logging.getLogger("shelfloop.cloud.api")


def build_services(
    settings: Settings, *, db: Database | None = None, store: ObjectStore | None = None
) -> Services:
    """The process-wide services from settings (tests pass their own database or store)."""
    db = db or Database(settings.database.url)
    store = store or make_object_store(settings.storage)
    q = settings.cloud.queue
    cloud_users = {}
    if settings.mqtt.username and settings.mqtt.password:
        cloud_users[settings.mqtt.username] = settings.mqtt.password.get_secret_value()
    return Services(
        settings=settings,
        db=db,
        store=store,
        queue=AnnotationQueue(db, lease_s=q.lease_s, max_attempts=q.max_attempts, gold_rate=q.gold_rate),
        registry=DeviceRegistry(db, settings.cloud.broker, cloud_users=cloud_users),
        ingestor=Ingestor(db, store, image_check=settings.cloud.image_check, consensus_k=q.consensus_k),
    )


def _bootstrap_admin(services: Services) -> None:
    cloud = services.settings.cloud
    if not cloud.bootstrap_admin or cloud.bootstrap_admin_password is None:
        return
    with services.db.session() as s:
        if s.scalar(sa.select(m.User.id).where(m.User.username == cloud.bootstrap_admin)) is None:
            create_user(s, cloud.bootstrap_admin, cloud.bootstrap_admin_password.get_secret_value(), "admin")
            log.info("bootstrap admin created", extra={"username": cloud.bootstrap_admin})


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    settings = settings or (services.settings if services else load_settings())
    services = services or build_services(settings)
    _bootstrap_admin(services)
    app = FastAPI(
        title="ShelfLoop cloud API",
        version=__version__,
        description=(
            "Catalogue, devices, the annotation queue and dead letters of the ShelfLoop cloud. "
            "Authenticate with POST /auth/token and send `Authorization: Bearer <token>`. Roles: annotator, "
            "reviewer, merchandiser, admin (admin may do everything)."
        ),
    )
    app.state.services = services
    for router in (
        health.router,
        auth.router,
        catalogue.router,
        devices.router,
        queue.router,
        dead_letters.router,
    ):
        app.include_router(router)
    app.include_router(crops.router)
    app.include_router(reports.router)
    app.include_router(reports_pages.router)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - started
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        HTTP_REQUESTS.labels(route=template, method=request.method, status=str(response.status_code)).inc()
        HTTP_LATENCY.labels(route=template).observe(elapsed)
        log.info(
            "request",
            extra={
                "method": request.method,
                "route": template,
                "status": response.status_code,
                "ms": round(elapsed * 1000, 2),
            },
        )
        return response

    @app.exception_handler(DataError)
    async def data_error(_request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value validation let through (e.g. NUL in a PostgreSQL text column).
        return JSONResponse(
            {"detail": f"value not storable: {exc.orig}"[:500]}, status.HTTP_422_UNPROCESSABLE_CONTENT
        )

    return app
