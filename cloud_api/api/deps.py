"""Dependencies shared by the routers: the process's services, the caller, and role checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloud_api.db import Database
from cloud_api.devices import DeviceRegistry
from cloud_api.ingest import Ingestor
from cloud_api.queue import AnnotationQueue
from cloud_api.security import user_for_token
from cloud_api.storage import ObjectStore
from shelfloop.settings import Settings


@dataclass
class Services:
    """Everything a request may need, built once per process by `cloud_api.main.create_app`."""

    settings: Settings
    db: Database
    store: ObjectStore
    queue: AnnotationQueue
    registry: DeviceRegistry
    ingestor: Ingestor


@dataclass(frozen=True)
class Caller:
    id: int
    username: str
    role: str


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
_bearer = HTTPBearer(auto_error=False, description="A token from POST /auth/token.")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def current_caller(
    svc: ServicesDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    if creds is None or creds.scheme.lower() != "bearer":
        raise _unauthorized("missing bearer token")
    with svc.db.session() as s:
        user = user_for_token(s, creds.credentials)
        if user is None:
            raise _unauthorized("invalid or expired token")
        return Caller(user.id, user.username, user.role)


def require(*roles: str) -> Any:
    """A dependency that lets in the given roles (and admin, who may do everything)."""
    allowed = frozenset(roles) | {"admin"}

    def check(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
        if caller.role not in allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {caller.role!r} may not do this")
        return caller

    check.__name__ = f"require_{'_'.join(sorted(allowed))}"
    return Depends(check)


AnyUser = Annotated[Caller, require("annotator", "reviewer", "merchandiser")]
Annotator = Annotated[Caller, require("annotator", "reviewer")]
Reviewer = Annotated[Caller, require("reviewer")]
Merchandiser = Annotated[Caller, require("merchandiser")]
Admin = Annotated[Caller, require()]
