"""Users, roles, password hashing (argon2id) and opaque bearer tokens.

Tokens are random and only their SHA-256 is stored: a token can be revoked by deleting its row, and a
database dump cannot be replayed as sessions. Roles are flat; ``admin`` may do everything.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Final

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.orm import Session

from cloud_api import models as m

__all__ = [
    "ROLES",
    "authenticate",
    "create_user",
    "hash_password",
    "issue_token",
    "revoke_token",
    "user_for_token",
    "verify_password",
]

ROLES: Final = ("annotator", "reviewer", "merchandiser", "admin")
_HASHER: Final = PasswordHasher()  # argon2id with the library's current recommended parameters
# A real hash to verify against when the user does not exist, so timing does not reveal valid usernames.
_DUMMY_HASH: Final = _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password: str, hashed: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def create_user(s: Session, username: str, password: str, role: str) -> m.User:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    user = m.User(username=username, password_hash=hash_password(password), role=role)
    s.add(user)
    s.flush()
    return user


def authenticate(s: Session, username: str, password: str) -> m.User | None:
    user = s.scalar(sa.select(m.User).where(m.User.username == username))
    if user is None:
        verify_password(password, _DUMMY_HASH)
        return None
    if not user.active or not verify_password(password, user.password_hash):
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(s: Session, user: m.User, ttl_s: int) -> tuple[str, datetime]:
    token = secrets.token_urlsafe(32)
    expires = m.utcnow() + timedelta(seconds=ttl_s)
    s.add(m.ApiToken(token_sha256=_digest(token), user_id=user.id, expires_at=expires))
    return token, expires


def user_for_token(s: Session, token: str) -> m.User | None:
    row = s.scalar(sa.select(m.ApiToken).where(m.ApiToken.token_sha256 == _digest(token)))
    if row is None or row.expires_at <= m.utcnow():
        return None
    user = s.get(m.User, row.user_id)
    return user if user is not None and user.active else None


def revoke_token(s: Session, token: str) -> None:
    s.execute(sa.delete(m.ApiToken).where(m.ApiToken.token_sha256 == _digest(token)))
