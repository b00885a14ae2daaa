"""The durable outbox: every accepted uncertain crop and every checkout item waits here, on disk, until
the cloud acks it.

Why SQLite in WAL mode with ``synchronous=FULL``: a crop or checkout item the agent accepted must survive
a SIGKILL or a power cut a millisecond later, and the broker's PUBACK proves nothing (Mosquitto can lose
acknowledged QoS-1 messages on a crash), so a crop leaves the store only when the cloud's `CropAck` for its
id arrives, and a checkout item only when the `CheckoutAck` for its ``event_id`` does.

Checkout items (what a customer is billed for) live in their own table with their own bound, so the crop
drop policy below never touches them: they are tiny, sent before any crop, never expire by age, and only
when ``max_items`` are waiting is the oldest one dropped (counted like every other drop). Heartbeats and
compliance snapshots never come here: they are telemetry, where the latest value wins.

The store is bounded by bytes, count and age. When a new crop does not fit, the explicit drop policy
removes the lowest priority first and, within a priority, the oldest; a new crop that ranks below
everything stored is itself refused. Every drop is counted in the database, so the counts survive
restarts and go up in the heartbeat. A full disk or an I/O error on insert rolls back, is reported as a
fault and never takes the agent down.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from shelfloop import contract

__all__ = ["DROP_COUNTERS", "DueCrop", "DueItem", "Outbox", "OutboxLimits", "OutboxStats", "PutResult"]

log = logging.getLogger("shelfloop.edge.outbox")

_CROP_DROP_COUNTERS: Final = ("dropped_capacity", "dropped_expired", "dropped_io_error")
_ITEM_DROP_COUNTERS: Final = ("items_dropped_capacity", "items_dropped_io_error")
DROP_COUNTERS: Final = (*_CROP_DROP_COUNTERS, *_ITEM_DROP_COUNTERS)
"""Why a crop or checkout item never reached the cloud: pushed out by a bound, too old (crops only), or
not writable at all. Their sum is the heartbeat's ``outbox_dropped``."""
_ACK_COUNTERS: Final = ("acked_stored", "acked_duplicate", "acked_rejected", "acked_unknown")
_ITEM_ACK_COUNTERS: Final = (
    "items_acked_stored",
    "items_acked_duplicate",
    "items_acked_rejected",
    "items_acked_unknown",
)
_COUNTERS: Final = (*DROP_COUNTERS, *_ACK_COUNTERS, *_ITEM_ACK_COUNTERS, "accepted", "items_accepted")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS crops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    crop_id TEXT NOT NULL UNIQUE,
    priority INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_sent REAL,
    next_attempt REAL NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS crops_send_order ON crops (priority DESC, seq);
CREATE INDEX IF NOT EXISTS crops_drop_order ON crops (priority, seq);
CREATE TABLE IF NOT EXISTS checkout_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_sent REAL,
    next_attempt REAL NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of the store; the defaults keep a day of heavy uncertainty on a small SD card.

    ``max_bytes``, ``max_count`` and ``max_age_s`` bound the crops; ``max_items`` alone bounds the checkout
    items (weeks of a busy till, a few tens of MB at most, since the contract caps an item's size).
    """

    max_bytes: int = 256 * 1024 * 1024
    max_count: int = 50_000
    max_age_s: float = 7 * 24 * 3600.0
    max_items: int = 100_000


@dataclass(frozen=True)
class PutResult:
    """What happened to one crop offered to the outbox and to the crops it pushed out."""

    accepted: bool
    reason: Literal["accepted", "duplicate", "full", "too_large", "io_error"]
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class DueCrop:
    """A crop ready to be (re)published: its stable id and the exact bytes the cloud deduplicates on."""

    crop_id: str
    priority: int
    attempts: int
    payload: bytes


@dataclass(frozen=True)
class DueItem:
    """A checkout item ready to be (re)published, with the exact bytes the cloud deduplicates on."""

    event_id: str
    attempts: int
    payload: bytes


@dataclass(frozen=True)
class OutboxStats:
    """The outbox as the heartbeat reports it: ``depth``, ``bytes`` and ``dropped`` cover crops and
    checkout items together (``items`` of the depth are checkout items)."""

    depth: int
    bytes: int
    dropped: int
    counters: dict[str, int] = field(default_factory=dict)
    faults: tuple[str, ...] = ()
    items: int = 0

    @property
    def crops(self) -> int:
        return self.depth - self.items


class Outbox:
    """A bounded, crash-safe store of encoded `UncertainCrop` payloads, keyed by ``crop_id``, and of
    encoded `CheckoutItem` payloads, keyed by ``event_id``.

    Thread-safe: the agent loop puts crops and items while the MQTT network thread records acks.
    """

    def __init__(
        self,
        path: str | Path,
        limits: OutboxLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or OutboxLimits()
        self._clock = clock
        self._lock = threading.RLock()
        self._faults: list[str] = []
        self._io_errors = 0  # drops that could not be persisted (the disk refused the write)
        self._item_io_errors = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            # A device must keep working: set the unreadable file aside for forensics and start empty.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._fault(f"outbox database unreadable ({exc}); moved to {aside.name}, starting empty")
            self._conn = self._open()
        with self._tx():
            self._conn.executemany(
                "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(n,) for n in _COUNTERS]
            )
        self._count, self._bytes = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM crops"
        ).fetchone()
        self._items, self._item_bytes = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM checkout_items"
        ).fetchone()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    # -- transactions ---------------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self._conn)

    def _bump(self, name: str, by: int = 1) -> None:
        self._conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))

    def _fault(self, text: str) -> None:
        log.error("outbox fault: %s", text)
        self._faults.append(text)
        del self._faults[:-16]

    # -- writing --------------------------------------------------------------------------------------

    def put(self, crop: contract.UncertainCrop) -> PutResult:
        """Encode (and so validate) a crop and store it; the priority travels in the crop itself."""
        return self.put_payload(crop.crop_id, contract.encode(crop), crop.priority)

    def put_payload(self, crop_id: str, payload: bytes, priority: int) -> PutResult:
        """Store an already encoded crop. Returns only when it is on disk (or refused, with the reason)."""
        size = len(payload)
        with self._lock:
            if size > self.limits.max_bytes:
                return self._refuse("too_large", crop_id)
            try:
                with self._tx():
                    if self._conn.execute("SELECT 1 FROM crops WHERE crop_id = ?", (crop_id,)).fetchone():
                        return PutResult(False, "duplicate")
                    self._expire_locked()
                    victims = self._victims(size, priority)
                    if victims is None:
                        self._bump("dropped_capacity")
                        log.warning("outbox full: crop %s (priority %d) refused", crop_id, priority)
                        return PutResult(False, "full", (crop_id,))
                    dropped_bytes = 0
                    for seq, _victim_id, victim_size in victims:
                        self._conn.execute("DELETE FROM crops WHERE seq = ?", (seq,))
                        dropped_bytes += victim_size
                    if victims:
                        self._bump("dropped_capacity", len(victims))
                    self._conn.execute(
                        "INSERT INTO crops (crop_id, priority, size, created, payload) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (crop_id, priority, size, self._clock(), payload),
                    )
                    self._bump("accepted")
            except sqlite3.Error as exc:
                self._recount()
                return self._refuse("io_error", crop_id, exc)
            self._count += 1 - len(victims)
            self._bytes += size - dropped_bytes
            dropped = tuple(v[1] for v in victims)
            if dropped:
                log.warning(
                    "outbox full: dropped %d lower-priority/older crops for %s", len(dropped), crop_id
                )
            return PutResult(True, "accepted", dropped)

    def _refuse(
        self, reason: Literal["too_large", "io_error"], crop_id: str, exc: Exception | None = None
    ) -> PutResult:
        if reason == "io_error":
            self._fault(f"outbox write failed for crop {crop_id}: {exc}")
        try:
            with self._tx():
                self._bump("dropped_io_error" if reason == "io_error" else "dropped_capacity")
        except sqlite3.Error:
            if reason == "io_error":
                self._io_errors += 1  # the disk refuses even the counter: keep it in memory
        return PutResult(False, reason, (crop_id,))

    def _victims(self, size: int, priority: int) -> list[tuple[int, str, int]] | None:
        """Crops to drop so a new one fits (lowest priority, then oldest); None if the new one ranks last."""
        need_count = self._count + 1 - self.limits.max_count
        need_bytes = self._bytes + size - self.limits.max_bytes
        victims: list[tuple[int, str, int]] = []
        if need_count <= 0 and need_bytes <= 0:
            return victims
        freed_bytes = 0
        rows = self._conn.execute("SELECT seq, crop_id, size, priority FROM crops ORDER BY priority, seq")
        for seq, crop_id, victim_size, victim_priority in rows:
            if victim_priority > priority:
                return None  # everything left outranks the newcomer: refuse it instead
            victims.append((seq, crop_id, victim_size))
            freed_bytes += victim_size
            if len(victims) >= need_count and freed_bytes >= need_bytes:
                return victims
        return None

    def _expire_locked(self) -> int:
        cutoff = self._clock() - self.limits.max_age_s
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM crops WHERE created < ?", (cutoff,)
        ).fetchone()
        if row[0]:
            self._conn.execute("DELETE FROM crops WHERE created < ?", (cutoff,))
            self._bump("dropped_expired", row[0])
            self._count -= row[0]
            self._bytes -= row[1]
            log.warning("outbox: %d crops older than %.0f s dropped", row[0], self.limits.max_age_s)
        return int(row[0])

    def expire(self) -> int:
        """Drop crops past the age bound (also done on every put); returns how many."""
        with self._lock:
            try:
                with self._tx():
                    return self._expire_locked()
            except sqlite3.Error as exc:
                self._recount()
                self._fault(f"outbox expiry failed: {exc}")
                return 0

    def _recount(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._count, self._bytes = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM crops"
            ).fetchone()
            self._items, self._item_bytes = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM checkout_items"
            ).fetchone()

    # -- checkout items -------------------------------------------------------------------------------

    def put_item(self, item: contract.CheckoutItem) -> PutResult:
        """Encode (and so validate) a checkout item and store it before anything is sent.

        Returns only when it is on disk, or refused (``io_error``, counted, a fault). At ``max_items`` the
        oldest waiting item is dropped for it and counted: a stuck backlog must not stop today's items.
        """
        event_id, payload = item.event_id, contract.encode(item)
        with self._lock:
            try:
                with self._tx():
                    if self._conn.execute(
                        "SELECT 1 FROM checkout_items WHERE event_id = ?", (event_id,)
                    ).fetchone():
                        return PutResult(False, "duplicate")
                    over = self._items + 1 - self.limits.max_items
                    victims = (
                        self._conn.execute(
                            "SELECT seq, event_id, size FROM checkout_items ORDER BY seq LIMIT ?", (over,)
                        ).fetchall()
                        if over > 0
                        else []
                    )
                    for seq, _victim_id, _size in victims:
                        self._conn.execute("DELETE FROM checkout_items WHERE seq = ?", (seq,))
                    if victims:
                        self._bump("items_dropped_capacity", len(victims))
                    self._conn.execute(
                        "INSERT INTO checkout_items (event_id, size, created, payload) VALUES (?, ?, ?, ?)",
                        (event_id, len(payload), self._clock(), payload),
                    )
                    self._bump("items_accepted")
            except sqlite3.Error as exc:
                self._recount()
                self._fault(f"outbox write failed for checkout item {event_id}: {exc}")
                try:
                    with self._tx():
                        self._bump("items_dropped_io_error")
                except sqlite3.Error:
                    self._item_io_errors += 1  # the disk refuses even the counter: keep it in memory
                return PutResult(False, "io_error", (event_id,))
            self._items += 1 - len(victims)
            self._item_bytes += len(payload) - sum(v[2] for v in victims)
            dropped = tuple(v[1] for v in victims)
            if dropped:
                log.error("outbox: %d checkout items over max_items dropped (oldest first)", len(dropped))
            return PutResult(True, "accepted", dropped)

    def due_items(self, limit: int, *, exclude: set[str] | frozenset[str] = frozenset()) -> list[DueItem]:
        """Checkout items whose next attempt is due, oldest first."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._conn.execute(
                "SELECT event_id, attempts, payload FROM checkout_items WHERE next_attempt <= ? "
                "ORDER BY seq LIMIT ?",
                (self._clock(), limit + len(exclude)),
            ).fetchall()
        return [DueItem(r[0], r[1], r[2]) for r in rows if r[0] not in exclude][:limit]

    def mark_item_sent(self, event_id: str, retry_after_s: float) -> None:
        """Record a publish of a checkout item and when to try again if no ack has come by then."""
        self._mark_sent("checkout_items", "event_id", event_id, retry_after_s)

    def ack_item(self, ack: contract.CheckoutAck) -> bool:
        """Delete the checkout item the cloud acked; idempotent like `ack`."""
        with self._lock:
            size = self._delete_acked("checkout_items", "event_id", ack.event_id, "items_acked", ack.status)
            if size is not None:
                self._items -= 1
                self._item_bytes -= size
            return size is not None

    def item_ids(self) -> list[str]:
        """Event ids of the checkout items still waiting for their ack, oldest first."""
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT event_id FROM checkout_items ORDER BY seq")]

    def items(self) -> list[contract.CheckoutItem]:
        """The waiting checkout items themselves, oldest first (for tests and the local API)."""
        with self._lock:
            rows = self._conn.execute("SELECT payload FROM checkout_items ORDER BY seq").fetchall()
        return [contract.decode(r[0], expect=contract.CheckoutItem) for r in rows]

    # -- sending --------------------------------------------------------------------------------------

    def due(self, limit: int, *, exclude: set[str] | frozenset[str] = frozenset()) -> list[DueCrop]:
        """Crops whose next attempt is due, highest priority first, then oldest."""
        if limit <= 0:
            return []
        now = self._clock()
        with self._lock:
            rows = self._conn.execute(
                "SELECT crop_id, priority, attempts, payload FROM crops WHERE next_attempt <= ? "
                "ORDER BY priority DESC, seq LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
        return [DueCrop(r[0], r[1], r[2], r[3]) for r in rows if r[0] not in exclude][:limit]

    def mark_sent(self, crop_id: str, retry_after_s: float) -> None:
        """Record a publish and when to try again if no ack has come by then."""
        self._mark_sent("crops", "crop_id", crop_id, retry_after_s)

    def _mark_sent(self, table: str, key: str, value: str, retry_after_s: float) -> None:
        now = self._clock()
        with self._lock:
            try:
                with self._tx():
                    self._conn.execute(
                        f"UPDATE {table} SET attempts = attempts + 1, last_sent = ?, next_attempt = ? "
                        f"WHERE {key} = ?",
                        (now, now + retry_after_s, value),
                    )
            except sqlite3.Error as exc:
                self._fault(f"outbox could not record a send: {exc}")

    def make_all_due(self) -> None:
        """After a reconnect everything un-acked is resent now (the cloud dedupes on crop_id / event_id)."""
        with self._lock:
            try:
                with self._tx():
                    self._conn.execute("UPDATE crops SET next_attempt = 0")
                    self._conn.execute("UPDATE checkout_items SET next_attempt = 0")
            except sqlite3.Error as exc:
                self._fault(f"outbox could not reschedule: {exc}")

    def ack(self, ack: contract.CropAck) -> bool:
        """Delete the crop the cloud acked; idempotent (a repeated or unknown ack is counted, no error)."""
        with self._lock:
            size = self._delete_acked("crops", "crop_id", ack.crop_id, "acked", ack.status)
            if size is not None:
                self._count -= 1
                self._bytes -= size
            return size is not None

    def _delete_acked(self, table: str, key: str, value: str, counter: str, status: str) -> int | None:
        """Delete one acked row and count the ack (`<counter>_<status>`, or `_unknown` for no row); the
        deleted row's size, None when there was none or the store failed (a fault). Caller holds the lock."""
        try:
            with self._tx():
                row = self._conn.execute(
                    f"DELETE FROM {table} WHERE {key} = ? RETURNING size", (value,)
                ).fetchone()
                self._bump(f"{counter}_{status}" if row else f"{counter}_unknown")
        except sqlite3.Error as exc:
            self._fault(f"outbox could not record ack for {table} {value}: {exc}")
            return None
        return row[0] if row else None

    # -- reading --------------------------------------------------------------------------------------

    def contains(self, crop_id: str) -> bool:
        with self._lock:
            return (
                self._conn.execute("SELECT 1 FROM crops WHERE crop_id = ?", (crop_id,)).fetchone() is not None
            )

    def crop_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT crop_id FROM crops ORDER BY seq")]

    def attempts(self, crop_id: str) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT attempts FROM crops WHERE crop_id = ?", (crop_id,)).fetchone()
        return None if row is None else int(row[0])

    def counters(self) -> dict[str, int]:
        with self._lock:
            values = {str(n): int(v) for n, v in self._conn.execute("SELECT name, value FROM counters")}
        values["dropped_io_error"] = values.get("dropped_io_error", 0) + self._io_errors
        values["items_dropped_io_error"] = values.get("items_dropped_io_error", 0) + self._item_io_errors
        return values

    def stats(self) -> OutboxStats:
        counters = self.counters()
        with self._lock:
            items = self._items
            depth, size = self._count + items, self._bytes + self._item_bytes
            faults = tuple(self._faults)
        dropped = sum(counters[n] for n in DROP_COUNTERS)
        return OutboxStats(depth, size, dropped, counters, faults, items)

    def take_faults(self) -> list[str]:
        """Faults since the last call (the heartbeat reports each once)."""
        with self._lock:
            faults, self._faults = self._faults, []
        return faults

    def integrity_ok(self) -> bool:
        with self._lock:
            return self._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """BEGIN IMMEDIATE .. COMMIT, rolled back on any error (the store is never left half-written)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")
