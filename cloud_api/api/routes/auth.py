"""Log-in (bearer tokens) and user management."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, status
from sqlalchemy.exc import IntegrityError

from cloud_api import models as m
from cloud_api.api.deps import Admin, AnyUser, ServicesDep
from cloud_api.api.schemas import LoginIn, TokenOut, UserIn, UserOut
from cloud_api.security import authenticate, create_user, issue_token

router = APIRouter(tags=["auth"])


@router.post(
    "/auth/token",
    response_model=TokenOut,
    summary="Exchange username and password for a bearer token",
    responses={401: {"description": "wrong username or password"}},
)
def login(body: LoginIn, svc: ServicesDep) -> TokenOut:
    with svc.db.session() as s:
        user = authenticate(s, body.username, body.password)
        if user is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
        token, expires = issue_token(s, user, svc.settings.cloud.token_ttl_s)
        return TokenOut(access_token=token, expires_at=expires, role=user.role)  # type: ignore[arg-type]


@router.get("/auth/me", response_model=UserOut, summary="The caller")
def me(caller: AnyUser) -> UserOut:
    return UserOut(id=caller.id, username=caller.username, role=caller.role, active=True)


@router.post(
    "/users",
    response_model=UserOut,
    status_code=201,
    summary="Create a user (admin)",
    responses={409: {"description": "username taken"}},
)
def add_user(body: UserIn, svc: ServicesDep, _: Admin) -> UserOut:
    try:
        with svc.db.session() as s:
            user = create_user(s, body.username, body.password, body.role)
            return UserOut(id=user.id, username=user.username, role=user.role, active=user.active)
    except IntegrityError:
        raise HTTPException(status.HTTP_409_CONFLICT, "username taken") from None


@router.get("/users", response_model=list[UserOut], summary="List users (admin)")
def list_users(svc: ServicesDep, _: Admin) -> list[UserOut]:
    with svc.db.session() as s:
        users = s.scalars(sa.select(m.User).order_by(m.User.id)).all()
        return [UserOut(id=u.id, username=u.username, role=u.role, active=u.active) for u in users]
