"""Report metadata that no ingested message carries: store regions and planogram geometry.

The snapshot table knows store and bay ids and a planogram version, but a merchandiser reads regions and
needs the bay drawn to scale. Both live in object storage so the schema stays untouched:

- ``reports/directory.json``: ``{"stores": {store_id: {"name": ..., "region": ...}}}`` (replaced whole);
- ``reports/planograms/<sha256(version)>.json``: one planogram per version, immutable like the version.

Reads are cached for a short time: every page needs them, and they change on the scale of days.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from cloud_api.storage import ObjectNotFound, ObjectStore
from planograms.schema import Bay, Planogram

__all__ = [
    "DIRECTORY_KEY",
    "UNASSIGNED_REGION",
    "StoreInfo",
    "get_planogram",
    "planogram_key",
    "put_planogram",
    "read_directory",
    "write_directory",
]

DIRECTORY_KEY = "reports/directory.json"
UNASSIGNED_REGION = "Unassigned"
_TTL_S = 30.0
_lock = threading.Lock()
_cache: dict[tuple[int, str], tuple[float, Any]] = {}


@dataclass(frozen=True, slots=True)
class StoreInfo:
    store_id: str
    name: str
    region: str


def planogram_key(version: str) -> str:
    """Versions are free text on the wire; hash them into a safe object key."""
    return f"reports/planograms/{hashlib.sha256(version.encode()).hexdigest()[:40]}.json"


def _cached(store: ObjectStore, key: str, load: Any) -> Any:
    now = time.monotonic()
    with _lock:
        hit = _cache.get((id(store), key))
        if hit is not None and now - hit[0] < _TTL_S:
            return hit[1]
    value = load()
    with _lock:
        _cache[(id(store), key)] = (now, value)
    return value


def invalidate() -> None:
    with _lock:
        _cache.clear()


def read_directory(store: ObjectStore) -> dict[str, StoreInfo]:
    """Store id -> name and region; an absent or unreadable document means no regions yet."""

    def load() -> dict[str, StoreInfo]:
        try:
            doc = json.loads(store.get(DIRECTORY_KEY))
        except (ObjectNotFound, ValueError):
            return {}
        out: dict[str, StoreInfo] = {}
        for sid, info in (doc.get("stores") or {}).items():
            if isinstance(info, dict):
                out[str(sid)] = StoreInfo(
                    str(sid), str(info.get("name") or sid), str(info.get("region") or UNASSIGNED_REGION)
                )
        return out

    return _cached(store, DIRECTORY_KEY, load)


def write_directory(store: ObjectStore, stores: dict[str, dict[str, str]]) -> None:
    """Replace the directory (admin tooling and the synthetic loader; not a hot path)."""
    data = json.dumps({"stores": stores}, indent=2, sort_keys=True).encode()
    try:
        if store.get(DIRECTORY_KEY) == data:
            return
    except ObjectNotFound:
        pass
    store.delete(DIRECTORY_KEY)
    store.put_if_absent(DIRECTORY_KEY, data, "application/json")
    invalidate()


def put_planogram(store: ObjectStore, planogram: Planogram, version: str) -> str:
    """File a planogram under the version string its snapshots carry; a version never changes."""
    key = planogram_key(version)
    store.put_if_absent(key, msgspec.json.encode(planogram), "application/json")
    invalidate()
    return key


def get_planogram(store: ObjectStore, version: str) -> Planogram | None:
    """The planogram of a snapshot's version, or None (the report then draws the plan from the slots)."""
    key = planogram_key(version)

    def load() -> Planogram | None:
        try:
            return msgspec.json.decode(store.get(key), type=Planogram)
        except (ObjectNotFound, msgspec.DecodeError, msgspec.ValidationError):
            return None

    return _cached(store, key, load)


def find_bay(planogram: Planogram | None, bay_id: str) -> Bay | None:
    if planogram is None:
        return None
    try:
        return planogram.bay(bay_id)
    except KeyError:
        return None
