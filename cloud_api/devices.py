"""Stores, devices and their broker credentials: the cloud owns Mosquitto's password and ACL files.

Provisioning issues a random password per device (shown once), keeps only its hash, and rewrites the
broker's ``password_file`` (PBKDF2-SHA512, the ``$7$`` format Mosquitto 2 reads, so no ``mosquitto_passwd``
subprocess is needed) and ``acl_file`` (`contract.device_acl` per active device, `contract.cloud_acl` for
the cloud's own users). A SIGHUP to the broker applies the change; revoking removes both entries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from cloud_api import models as m
from cloud_api.db import Database
from shelfloop import contract
from shelfloop.settings import BrokerAdminSettings

__all__ = [
    "DeviceCredentials",
    "DeviceError",
    "DeviceRegistry",
    "mosquitto_hash",
    "mqtt_username",
    "reload_broker",
    "render_acl_file",
    "render_password_file",
    "verify_mosquitto_hash",
]

_PBKDF2_ITERATIONS = 101  # Mosquitto 2's own default for `mosquitto_passwd`
_SALT_BYTES = 12


class DeviceError(ValueError):
    """A device operation that cannot be done (unknown device, invalid id)."""


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = _PBKDF2_ITERATIONS) -> str:
    """``$7$iterations$salt$hash``: PBKDF2-HMAC-SHA512 as Mosquitto 2's password_file stores it."""
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, hashed: str) -> bool:
    try:
        _, alg, iterations, salt_b64, digest_b64 = hashed.split("$")
        if alg != "7":
            return False
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt_b64), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(base64.b64encode(digest).decode(), digest_b64)


def mqtt_username(store_id: str, device_id: str) -> str:
    """``{device}@{store}``: ``@`` cannot occur in either id, so the name is unambiguous (``:`` would be,
    but Mosquitto's password_file splits each line at the first ``:``)."""
    contract.ack_topic(store_id, device_id)  # validates both ids as topic levels
    return f"{device_id}@{store_id}"


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device needs to connect; the password exists only in this object, never in the database."""

    store_id: str
    device_id: str
    username: str
    password: str


def render_password_file(session: Session, cloud_users: Mapping[str, str]) -> str:
    """Active devices plus the cloud's users (``cloud_users`` maps username -> password hash)."""
    rows = session.execute(
        sa.select(m.Device.mqtt_username, m.Device.password_hash)
        .where(m.Device.status == "active", m.Device.password_hash.is_not(None))
        .order_by(m.Device.mqtt_username)
    ).all()
    lines = [f"{user}:{hashed}" for user, hashed in sorted(cloud_users.items())]
    lines += [f"{user}:{hashed}" for user, hashed in rows]
    return "".join(line + "\n" for line in lines)


def render_acl_file(session: Session, cloud_usernames: list[str]) -> str:
    """One block per active device (its own topics only) and one per cloud user."""
    rows = session.execute(
        sa.select(m.Device.store_id, m.Device.device_id, m.Device.mqtt_username)
        .where(m.Device.status == "active")
        .order_by(m.Device.mqtt_username)
    ).all()
    blocks = ["# Written by ShelfLoop cloud_api.devices; edits are overwritten.\n"]
    blocks += [contract.cloud_acl(user) for user in sorted(cloud_usernames)]
    blocks += [contract.device_acl(store, device, user) for store, device, user in rows]
    return "\n".join(blocks)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # the broker never reads a half-written file


def reload_broker(pid: int | None = None, pid_file: Path | None = None) -> bool:
    """SIGHUP the broker so it re-reads its password and ACL files; False when no broker pid is known."""
    if pid is None and pid_file is not None and pid_file.is_file():
        text = pid_file.read_text().strip()
        pid = int(text) if text.isdigit() else None
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


class DeviceRegistry:
    """Device lifecycle plus the broker files that follow from it."""

    def __init__(
        self,
        db: Database,
        broker: BrokerAdminSettings | None = None,
        *,
        cloud_users: Mapping[str, str] | None = None,
    ) -> None:
        """``cloud_users`` maps the cloud's own MQTT usernames to their plain passwords (from settings)."""
        self.db = db
        self.broker = broker or BrokerAdminSettings()
        self._cloud_hashes = {user: mosquitto_hash(pw) for user, pw in (cloud_users or {}).items()}

    def ensure_store(self, s: Session, store_id: str, name: str = "") -> m.Store:
        contract.ack_topic(store_id, "x")  # validates the store id (not "_fleet", no topic syntax)
        store = s.get(m.Store, store_id)
        if store is None:
            store = m.Store(store_id=store_id, name=name)
            s.add(store)
            s.flush()
        elif name and store.name != name:
            store.name = name
        return store

    def provision(self, store_id: str, device_id: str) -> DeviceCredentials:
        """Register a device (or rotate its credential) and return the new password, shown only now."""
        try:
            username = mqtt_username(store_id, device_id)
        except contract.ContractError as exc:
            raise DeviceError(str(exc)) from None
        password = secrets.token_urlsafe(24)
        with self.db.session() as s:
            self.ensure_store(s, store_id)
            device = s.scalar(
                sa.select(m.Device).where(m.Device.store_id == store_id, m.Device.device_id == device_id)
            )
            if device is None:
                device = m.Device(store_id=store_id, device_id=device_id, mqtt_username=username)
                s.add(device)
            device.password_hash = mosquitto_hash(password)
            device.status, device.revoked_at = "active", None
        self.sync()
        return DeviceCredentials(store_id, device_id, username, password)

    def revoke(self, store_id: str, device_id: str) -> None:
        with self.db.session() as s:
            device = s.scalar(
                sa.select(m.Device).where(m.Device.store_id == store_id, m.Device.device_id == device_id)
            )
            if device is None:
                raise DeviceError(f"no device {store_id}/{device_id}")
            device.status, device.revoked_at, device.password_hash = "revoked", m.utcnow(), None
        self.sync()

    def sync(self) -> bool:
        """Rewrite the broker files from the database and SIGHUP the broker; True if it was signalled."""
        if self.broker.password_file is None and self.broker.acl_file is None:
            return False
        with self.db.session() as s:
            if self.broker.password_file is not None:
                _atomic_write(self.broker.password_file, render_password_file(s, self._cloud_hashes))
            if self.broker.acl_file is not None:
                _atomic_write(self.broker.acl_file, render_acl_file(s, list(self._cloud_hashes)))
        return reload_broker(pid_file=self.broker.pid_file)
