"""The wire contract between store devices (edge) and the cloud: the only vocabulary they share.

Everything that crosses MQTT is defined here: the message structs, how they are encoded, the limits, the
errors a receiver reports, and the topic scheme. It is imported on store devices, so it depends on the
standard library and msgspec only (no numpy, no pydantic, no paho).

Encoding is MessagePack via msgspec: compact, schema-checked on decode, and JPEG crops travel as raw
``bin`` fields instead of base64 text. Each payload is a map carrying ``kind`` (the tag that selects the
struct) and ``schema_version``; publishers set the MQTT v5 content-type property to `CONTENT_TYPE`.

Validation is strict on purpose. A device that produces a bad message should fail loudly in its own tests
(`encode` re-validates everything), and the cloud gets a typed `ContractError` with a stable ``reason`` code
for its dead-letter store instead of a crash deep in ingestion.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, ClassVar, Final, Literal, TypeAlias, TypeVar, get_args, overload

import msgspec
from msgspec import Meta

__all__ = [
    "ARTIFACTS",
    "CONTENT_TYPE",
    "DETECTION_STATUSES",
    "FLEET",
    "INGEST_SHARED_SUBSCRIPTION",
    "KIND_CHECKOUT_ACK",
    "KIND_CHECKOUT_ITEM",
    "KIND_COMPLIANCE_SNAPSHOT",
    "KIND_CROP",
    "KIND_CROP_ACK",
    "KIND_HEARTBEAT",
    "KIND_RELEASE_POINTER",
    "MAX_JPEG_BYTES",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "SLOT_STATUSES",
    "SOURCES",
    "TOPIC_PREFIX",
    "UNCERTAINTY_REASONS",
    "UPLINK_CHANNELS",
    "AckStatus",
    "Artifact",
    "BoundingBox",
    "CheckoutAck",
    "CheckoutItem",
    "CheckoutStatus",
    "ComplianceSnapshot",
    "ContractError",
    "CropAck",
    "DetectionStatus",
    "Heartbeat",
    "InvalidImage",
    "InvalidTopic",
    "LatencyStats",
    "MalformedMessage",
    "Message",
    "OversizeMessage",
    "ReleasePointer",
    "SkuCandidate",
    "SlotResult",
    "SlotStatus",
    "Source",
    "TopicInfo",
    "TopicMismatch",
    "UncertainCrop",
    "UncertaintyReason",
    "UnknownKind",
    "UnplannedDetection",
    "UnsupportedSchemaVersion",
    "ack_topic",
    "check_topic_matches",
    "checkout_ack_topic",
    "cloud_acl",
    "decode",
    "device_acl",
    "device_subscriptions",
    "encode",
    "jpeg_dimensions",
    "kind_of",
    "new_crop_id",
    "new_id",
    "parse_topic",
    "release_topic",
    "shared_ingest_subscription",
    "uplink_topic",
    "uplink_topic_for",
    "utc_now",
]

# --------------------------------------------------------------------------------------------------------
# Constants and limits
# --------------------------------------------------------------------------------------------------------

CONTENT_TYPE: Final = "application/vnd.shelfloop+msgpack"
"""Value for the MQTT v5 content-type property, so a subscriber can tell our payloads from anything else."""

MAX_MESSAGE_BYTES: Final = 1_048_576
"""Largest encoded payload; equal to the broker's ``message_size_limit`` so we refuse before it drops."""

MAX_JPEG_BYTES: Final = 512 * 1024
"""Largest embedded JPEG: crops are small, and a huge one means the device is sending whole frames."""

KIND_CROP: Final = "crop"
KIND_CROP_ACK: Final = "crop_ack"
KIND_HEARTBEAT: Final = "heartbeat"
KIND_COMPLIANCE_SNAPSHOT: Final = "compliance_snapshot"
KIND_CHECKOUT_ITEM: Final = "checkout_item"
KIND_RELEASE_POINTER: Final = "release_pointer"
KIND_CHECKOUT_ACK: Final = "checkout_ack"

SCHEMA_VERSION: Final[Mapping[str, int]] = MappingProxyType(
    {
        KIND_CROP: 1,
        KIND_CROP_ACK: 1,
        KIND_HEARTBEAT: 1,
        KIND_COMPLIANCE_SNAPSHOT: 1,
        KIND_CHECKOUT_ITEM: 1,
        KIND_RELEASE_POINTER: 1,
        KIND_CHECKOUT_ACK: 1,
    }
)
"""The schema version this code speaks, per kind. Bumped per kind, so one message can evolve alone."""

# --------------------------------------------------------------------------------------------------------
# Constrained field types
# --------------------------------------------------------------------------------------------------------

_ID_BODY = r"[A-Za-z0-9_.-]{1,64}"
# Identifiers become MQTT topic levels and object-store key parts: no "/", "+", "#", "$", whitespace,
# and not "." or ".." (path traversal in object keys).
_ID_PATTERN = rf"^(?!\.\.?$){_ID_BODY}$"
FLEET: Final = "_fleet"
"""Reserved pseudo store id for fleet-wide release pointers; never a real store."""
_STORE_ID_PATTERN = rf"^(?!{FLEET}$)(?!\.\.?$){_ID_BODY}$"
_ID_RE = re.compile(_ID_PATTERN)
_STORE_ID_RE = re.compile(_STORE_ID_PATTERN)

Identifier: TypeAlias = Annotated[str, Meta(pattern=_ID_PATTERN, min_length=1, max_length=64)]
StoreId: TypeAlias = Annotated[str, Meta(pattern=_STORE_ID_PATTERN, min_length=1, max_length=64)]
CropId: TypeAlias = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{8,64}$", min_length=8, max_length=64)]
Version: TypeAlias = Annotated[str, Meta(pattern=r"^[\x21-\x7e]{1,128}$", min_length=1, max_length=128)]
"""A model/gallery/agent/planogram version: printable ASCII without spaces."""
Timestamp: TypeAlias = Annotated[datetime, Meta(tz=True)]
"""Always timezone-aware: naive datetimes are ambiguous across stores in different time zones."""
Unit: TypeAlias = Annotated[float, Meta(ge=0.0, le=1.0)]
"""A probability/score in [0, 1]; the bounds also reject NaN and infinities."""
Percent: TypeAlias = Annotated[float, Meta(ge=0.0, le=100.0)]
Pixel: TypeAlias = Annotated[float, Meta(ge=0.0, le=100_000.0)]
"""Pixel coordinate in the source frame: boxes must be clipped to the frame before sending."""
NonNegFloat: TypeAlias = Annotated[float, Meta(ge=0.0, le=1e12)]
NonNegInt: TypeAlias = Annotated[int, Meta(ge=0, le=2**63 - 1)]
ShortText: TypeAlias = Annotated[str, Meta(min_length=1, max_length=512)]

Source: TypeAlias = Literal["shelf", "checkout"]
UncertaintyReason: TypeAlias = Literal[
    "low_detector_confidence",
    "low_margin",
    "low_probability",
    "novelty",
    "track_disagreement",
    "audit_sample",
]
AckStatus: TypeAlias = Literal["stored", "duplicate", "rejected"]
SlotStatus: TypeAlias = Literal[
    "correct",
    "misplaced_same_row",
    "wrong_shelf",
    "out_of_stock",
    "missing_unverified",
    "facing_count_mismatch",
]
DetectionStatus: TypeAlias = Literal["extra_unplanned", "unknown_product"]
CheckoutStatus: TypeAlias = Literal["resolved", "unresolved"]
Artifact: TypeAlias = Literal["model", "gallery"]

SOURCES: Final[tuple[str, ...]] = get_args(Source)
UNCERTAINTY_REASONS: Final[tuple[str, ...]] = get_args(UncertaintyReason)
SLOT_STATUSES: Final[tuple[str, ...]] = get_args(SlotStatus)
DETECTION_STATUSES: Final[tuple[str, ...]] = get_args(DetectionStatus)
ARTIFACTS: Final[tuple[str, ...]] = get_args(Artifact)

# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


class ContractError(Exception):
    """Base of every error the contract raises; ``reason`` is a stable code for dead-letter records."""

    reason: ClassVar[str] = "contract"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"[{self.reason}] {self.detail}"


class OversizeMessage(ContractError):
    """The payload (or an embedded image) exceeds its byte limit; checked before any parsing."""

    reason: ClassVar[str] = "oversize"


class MalformedMessage(ContractError):
    """Not MessagePack, not a map, a missing field, a wrong type or a violated constraint.

    ``path`` is msgspec's location of the problem (e.g. ``$.box.x1``) when it names one.
    """

    reason: ClassVar[str] = "malformed"

    def __init__(self, detail: str, *, path: str | None = None) -> None:
        super().__init__(detail)
        self.path = path


class UnknownKind(ContractError):
    """The ``kind`` tag names no message this code knows."""

    reason: ClassVar[str] = "unknown_kind"

    def __init__(self, detail: str, *, kind: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind


class UnsupportedSchemaVersion(ContractError):
    """A known kind at a schema version this code does not speak (e.g. a newer device)."""

    reason: ClassVar[str] = "schema_version"

    def __init__(
        self, detail: str, *, kind: str | None = None, got: int | None = None, supported: int | None = None
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.got = got
        self.supported = supported


class InvalidImage(ContractError):
    """Bytes that claim to be a JPEG but are not a structurally complete baseline/progressive JPEG."""

    reason: ClassVar[str] = "invalid_image"


class InvalidTopic(ContractError):
    """A topic (or an identifier meant to become a topic level) outside the ``shelfloop/v1`` scheme."""

    reason: ClassVar[str] = "invalid_topic"


class TopicMismatch(ContractError):
    """The topic's store/device/channel disagree with the payload: a device speaking for another."""

    reason: ClassVar[str] = "topic_mismatch"


# --------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------


def _check_sorted_unique(candidates: list[SkuCandidate]) -> None:
    """Top-k candidates are ranked: receivers take ``candidates[0]`` as the best guess without sorting."""
    for before, after in itertools.pairwise(candidates):
        if after.score > before.score:
            raise ValueError("`candidates` must be sorted by score, descending")
    if len({c.sku_id for c in candidates}) != len(candidates):
        raise ValueError("`candidates` must not repeat a sku_id")


class _Struct(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Common options: immutable, unknown fields are errors. ``kw_only`` is not inherited: set per class."""


class SkuCandidate(_Struct, kw_only=True):
    """One recognition hypothesis: a SKU and its score in [0, 1]."""

    sku_id: Identifier
    score: Unit


class BoundingBox(_Struct, kw_only=True):
    """An axis-aligned box in source-frame pixels (x1, y1) top-left to (x2, y2) bottom-right."""

    x1: Pixel
    y1: Pixel
    x2: Pixel
    y2: Pixel

    def __post_init__(self) -> None:
        if not (self.x2 > self.x1 and self.y2 > self.y1):
            raise ValueError("box must have x2 > x1 and y2 > y1")


class LatencyStats(_Struct, kw_only=True):
    """Latency of one pipeline stage over the heartbeat window."""

    p50_ms: NonNegFloat
    p95_ms: NonNegFloat
    count: NonNegInt

    def __post_init__(self) -> None:
        if self.p95_ms < self.p50_ms:
            raise ValueError("p95_ms must be >= p50_ms")


class SlotResult(_Struct, kw_only=True):
    """Compliance verdict for one planogram slot (shelf row, slot index)."""

    shelf_row: Annotated[int, Meta(ge=0, le=1000)]
    slot_index: Annotated[int, Meta(ge=0, le=1000)]
    planned_sku: Identifier
    status: SlotStatus
    facings_planned: Annotated[int, Meta(ge=0, le=1000)]
    facings_found: Annotated[int, Meta(ge=0, le=1000)]
    found_sku: Identifier | None = None
    boxes: Annotated[list[BoundingBox], Meta(max_length=1000)] = []


class UnplannedDetection(_Struct, kw_only=True):
    """A detection that matches no planogram slot: a known SKU out of place, or an unknown product."""

    status: DetectionStatus
    sku_id: Identifier | None
    box: BoundingBox
    score: Unit

    def __post_init__(self) -> None:
        if self.status == "extra_unplanned" and self.sku_id is None:
            raise ValueError("`sku_id` is required when status is 'extra_unplanned'")
        if self.status == "unknown_product" and self.sku_id is not None:
            raise ValueError("`sku_id` must be null when status is 'unknown_product'")


class _Message(_Struct, kw_only=True, tag_field="kind"):
    """Base of the top-level messages: tagged by ``kind`` and versioned by ``schema_version``."""

    kind: ClassVar[str]
    """The message's tag (also available on the class); set once all classes exist, see below."""

    schema_version: int = 1

    def __post_init__(self) -> None:
        supported = SCHEMA_VERSION[self.kind]
        if self.schema_version != supported:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (supported: {supported})"
            )


class UncertainCrop(_Message, kw_only=True, tag=KIND_CROP):
    """A product crop the edge was unsure about, sent up for annotation and active-learning retraining."""

    crop_id: CropId
    store_id: StoreId
    device_id: Identifier
    camera_id: Identifier
    captured_at: Timestamp
    source: Source
    model_version: Version
    gallery_version: Version
    detector_confidence: Unit
    box: BoundingBox
    frame_width: Annotated[int, Meta(gt=0, le=100_000)]
    frame_height: Annotated[int, Meta(gt=0, le=100_000)]
    candidates: Annotated[list[SkuCandidate], Meta(max_length=20)]
    reasons: Annotated[list[UncertaintyReason], Meta(min_length=1, max_length=len(UNCERTAINTY_REASONS))]
    priority: Annotated[int, Meta(ge=0, le=100)]
    margin: Unit | None
    novelty: NonNegFloat | None
    bay_id: Identifier | None = None
    track_id: NonNegInt | None = None
    jpeg: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sorted_unique(self.candidates)
        if len(set(self.reasons)) != len(self.reasons):
            raise ValueError("`reasons` must not repeat a reason")
        # One pixel of slack for rounding when boxes are mapped back from the model's input size.
        if self.box.x2 > self.frame_width + 1 or self.box.y2 > self.frame_height + 1:
            raise ValueError("`box` must lie inside the frame (frame_width x frame_height)")


class CropAck(_Message, kw_only=True, tag=KIND_CROP_ACK):
    """The cloud's answer to one crop; after any ack the device may delete the crop from its outbox.

    ``stored``: kept (``object_key`` says where). ``duplicate``: already had it. ``rejected``: dead-lettered
    (``reason`` says why); the device must not resend it.
    """

    crop_id: CropId
    status: AckStatus
    reason: ShortText | None
    object_key: Annotated[str, Meta(min_length=1, max_length=1024)] | None
    acked_at: Timestamp

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status == "rejected" and self.reason is None:
            raise ValueError("`reason` is required when status is 'rejected'")
        if self.status == "stored" and self.object_key is None:
            raise ValueError("`object_key` is required when status is 'stored'")


class CheckoutAck(_Message, kw_only=True, tag=KIND_CHECKOUT_ACK):
    """The cloud's answer to one checkout item, sent only after its row is committed; after it the device
    deletes the item from its outbox.

    A message of its own (not a `CropAck` with another id) because an ``event_id`` is an `Identifier`, not
    a `CropId`, and so that devices that predate it, which decode every ``down/ack`` payload as a
    `CropAck`, keep working: it travels on its own topic (`checkout_ack_topic`). ``stored``: new row.
    ``duplicate``: the row was already there (a resend). ``rejected``: dead-lettered (``reason`` says
    why); the device must not resend it.
    """

    event_id: Identifier
    status: AckStatus
    reason: ShortText | None
    acked_at: Timestamp

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status == "rejected" and self.reason is None:
            raise ValueError("`reason` is required when status is 'rejected'")


StageName: TypeAlias = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class Heartbeat(_Message, kw_only=True, tag=KIND_HEARTBEAT):
    """Periodic device health: throughput, per-stage latency, versions and the state of the outbox."""

    store_id: StoreId
    device_id: Identifier
    sent_at: Timestamp
    agent_version: Version
    uptime_s: NonNegFloat
    frames_per_s: NonNegFloat
    stage_latency: Annotated[dict[StageName, LatencyStats], Meta(max_length=32)]
    model_version: Version
    gallery_version: Version
    outbox_depth: NonNegInt
    outbox_bytes: NonNegInt
    outbox_dropped: NonNegInt
    crops_sent: NonNegInt
    crops_deduplicated: NonNegInt
    cpu_percent: NonNegFloat | None
    memory_mb: NonNegFloat | None
    gpu_percent: Percent | None = None
    temperature_c: Annotated[float, Meta(ge=-100.0, le=250.0)] | None = None
    faults: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=64)] = []


class ComplianceSnapshot(_Message, kw_only=True, tag=KIND_COMPLIANCE_SNAPSHOT):
    """Planogram compliance of one bay at one moment, with an optional small annotated JPEG."""

    snapshot_id: Identifier
    store_id: StoreId
    device_id: Identifier
    camera_id: Identifier
    bay_id: Identifier
    planogram_version: Version
    captured_at: Timestamp
    model_version: Version
    gallery_version: Version
    slots: Annotated[list[SlotResult], Meta(max_length=4096)]
    unplanned: Annotated[list[UnplannedDetection], Meta(max_length=4096)]
    compliance_pct: Percent
    availability_pct: Percent
    image_jpeg: bytes | None

    def __post_init__(self) -> None:
        super().__post_init__()
        keys = {(s.shelf_row, s.slot_index) for s in self.slots}
        if len(keys) != len(self.slots):
            raise ValueError("`slots` must not repeat a (shelf_row, slot_index)")


class CheckoutItem(_Message, kw_only=True, tag=KIND_CHECKOUT_ITEM):
    """One tracked item at a checkout, resolved to a SKU by voting over frames, or left unresolved."""

    event_id: Identifier
    store_id: StoreId
    device_id: Identifier
    camera_id: Identifier
    basket_id: Identifier
    track_id: NonNegInt
    status: CheckoutStatus
    sku_id: Identifier | None
    probability: Unit
    candidates: Annotated[list[SkuCandidate], Meta(max_length=20)]
    votes: NonNegInt
    first_seen: Timestamp
    last_seen: Timestamp
    reason: ShortText | None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status == "resolved" and self.sku_id is None:
            raise ValueError("`sku_id` is required when status is 'resolved'")
        if self.status == "unresolved" and self.sku_id is not None:
            raise ValueError("`sku_id` must be null when status is 'unresolved'")
        if self.last_seen < self.first_seen:
            raise ValueError("`last_seen` must not be before `first_seen`")
        _check_sorted_unique(self.candidates)


_SIGNATURE_BYTES: Final = 64


class ReleasePointer(_Message, kw_only=True, tag=KIND_RELEASE_POINTER):
    """Points devices at a signed model or gallery artifact; the artifact itself is fetched from ``url``.

    Published retained at device, store and fleet scope (see `release_topic`); the device verifies
    ``size_bytes``, ``sha256`` and the ed25519 ``signature`` (by ``key_id``) before activating it.
    ``sha256``/``size_bytes`` describe the downloaded archive; ``signature`` is the bundle's own
    ``manifest.sig`` (base64 ed25519 over its ``manifest.json``) and ``key_id`` the manifest's signing key,
    so a pointer cannot vouch for an artifact its signer did not sign.
    """

    artifact: Artifact
    name: Identifier
    version: Version
    url: Annotated[str, Meta(pattern=r"^(https?|s3|file)://\S+$", max_length=2048)]
    size_bytes: Annotated[int, Meta(gt=0, le=2**63 - 1)]
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    signature: Annotated[str, Meta(min_length=1, max_length=128)]
    key_id: Identifier
    published_at: Timestamp
    min_agent_version: Version | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            raw = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("`signature` is not valid base64") from None
        if len(raw) != _SIGNATURE_BYTES:
            raise ValueError(f"`signature` must decode to {_SIGNATURE_BYTES} bytes (ed25519), got {len(raw)}")


Message: TypeAlias = (
    UncertainCrop | CropAck | Heartbeat | ComplianceSnapshot | CheckoutItem | ReleasePointer | CheckoutAck
)
"""Any top-level message."""

_MESSAGE_CLASSES: Final[tuple[type[_Message], ...]] = (
    UncertainCrop,
    CropAck,
    Heartbeat,
    ComplianceSnapshot,
    CheckoutItem,
    ReleasePointer,
    CheckoutAck,
)
for _cls in _MESSAGE_CLASSES:
    _cls.kind = str(_cls.__struct_config__.tag)

MESSAGE_TYPES: Final[Mapping[str, type[_Message]]] = MappingProxyType({c.kind: c for c in _MESSAGE_CLASSES})
"""Kind tag -> message class."""

assert set(MESSAGE_TYPES) == set(SCHEMA_VERSION), "every kind needs a schema version"

M = TypeVar("M", bound=_Message)


def kind_of(msg: Message | type[Message]) -> str:
    """The ``kind`` tag of a message or message class."""
    return msg.kind


# --------------------------------------------------------------------------------------------------------
# JPEG structural check
# --------------------------------------------------------------------------------------------------------

# Start-of-frame markers that carry the image size (C4 DHT, C8 JPG and CC DAC are not frames).
_SOF_MARKERS: Final = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_MAX_TRAILING_PADDING: Final = 8


def jpeg_dimensions(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return ``(width, height)`` of a JPEG after a structural check, without an image library.

    Checks the SOI marker, walks the marker segments to a start-of-frame header (baseline, extended,
    progressive, lossless or arithmetic), reads a non-zero size, requires a start-of-scan after it and the
    EOI marker at the end (up to a few bytes of zero padding allowed). That catches PNGs, truncated uploads
    and random bytes behind a JPEG signature, which is what goes wrong in practice; it does not decode the
    entropy-coded image data. Raises `InvalidImage`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImage(f"expected JPEG bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise InvalidImage("not a JPEG: missing SOI marker FF D8")
    end = len(buf)
    padding = 0
    while end > 0 and buf[end - 1] == 0x00 and padding < _MAX_TRAILING_PADDING:
        end -= 1
        padding += 1
    if end < 4 or buf[end - 2] != 0xFF or buf[end - 1] != 0xD9:
        raise InvalidImage("truncated JPEG: missing EOI marker FF D9 at the end")
    body_end = end - 2  # segments must lie before the final EOI
    size: tuple[int, int] | None = None
    i = 2
    while True:
        if i >= body_end:
            raise InvalidImage("JPEG ends before a start-of-scan segment")
        if buf[i] != 0xFF:
            raise InvalidImage(f"JPEG marker expected at offset {i}, got byte 0x{buf[i]:02X}")
        while i < body_end and buf[i] == 0xFF:  # markers may be preceded by fill bytes
            i += 1
        if i >= body_end:
            raise InvalidImage("JPEG ends inside a marker")
        marker = buf[i]
        i += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            raise InvalidImage(f"unexpected JPEG marker FF {marker:02X} at offset {i - 2}")
        if i + 2 > body_end:
            raise InvalidImage("JPEG segment length runs past the end")
        length = (buf[i] << 8) | buf[i + 1]
        if length < 2 or i + length > body_end:
            raise InvalidImage(f"JPEG segment FF {marker:02X} has an invalid length {length}")
        if marker in _SOF_MARKERS:
            if size is not None:
                raise InvalidImage("JPEG has more than one frame header")
            if length < 8:
                raise InvalidImage("JPEG frame header is too short")
            precision = buf[i + 2]
            height = (buf[i + 3] << 8) | buf[i + 4]
            width = (buf[i + 5] << 8) | buf[i + 6]
            components = buf[i + 7]
            if not 2 <= precision <= 16 or not 1 <= components <= 4 or length != 8 + 3 * components:
                raise InvalidImage("JPEG frame header is inconsistent")
            if width == 0 or height == 0:
                raise InvalidImage(f"JPEG frame has a zero dimension ({width}x{height})")
            size = (width, height)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows up to EOI
            if size is None:
                raise InvalidImage("JPEG start-of-scan before any frame header")
            return size
        i += length


# --------------------------------------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------------------------------------


class _Peek(msgspec.Struct):
    """Lenient first look at a payload: only the routing fields, everything else skipped."""

    kind: str | msgspec.UnsetType = msgspec.UNSET
    schema_version: int | msgspec.UnsetType = msgspec.UNSET


_ENCODER: Final = msgspec.msgpack.Encoder()
_PEEK_DECODER: Final = msgspec.msgpack.Decoder(_Peek)
_DECODERS: Final[Mapping[str, msgspec.msgpack.Decoder[_Message]]] = MappingProxyType(
    {kind: msgspec.msgpack.Decoder(cls) for kind, cls in MESSAGE_TYPES.items()}
)
_PATH_RE: Final = re.compile(r"at `(\$[^`]*)`")


def _malformed(exc: Exception) -> MalformedMessage:
    """Map a msgspec error; validation errors without a location are about the top-level object."""
    text = str(exc)
    match = _PATH_RE.search(text)
    if match:
        return MalformedMessage(text, path=match.group(1))
    return MalformedMessage(text, path="$" if isinstance(exc, msgspec.ValidationError) else None)


def _decode_with(decoder: msgspec.msgpack.Decoder, payload: bytes | bytearray | memoryview):
    """Run a msgspec decoder, turning every way it can fail into `MalformedMessage`."""
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _malformed(exc) from None
    except UnicodeDecodeError as exc:  # msgspec raises this (not DecodeError) for invalid UTF-8 in a str
        raise MalformedMessage(f"invalid UTF-8 in a string: {exc}") from None
    except RecursionError:
        raise MalformedMessage("payload is nested too deeply") from None


def _check_images(msg: _Message, max_image_bytes: int) -> None:
    """Validate embedded JPEGs: a broken image would only surface later, in the annotation tool."""
    images: list[tuple[str, bytes]] = []
    if isinstance(msg, UncertainCrop):
        images.append(("$.jpeg", msg.jpeg))
    elif isinstance(msg, ComplianceSnapshot) and msg.image_jpeg is not None:
        images.append(("$.image_jpeg", msg.image_jpeg))
    for path, data in images:
        if len(data) > max_image_bytes:
            raise OversizeMessage(f"{path} is {len(data)} bytes, over the {max_image_bytes}-byte image limit")
        try:
            jpeg_dimensions(data)
        except InvalidImage as exc:
            raise InvalidImage(f"{path}: {exc.detail}") from None


def encode(
    msg: Message, *, max_bytes: int = MAX_MESSAGE_BYTES, max_image_bytes: int = MAX_JPEG_BYTES
) -> bytes:
    """Serialise a message to MessagePack after validating it exactly as a receiver would.

    msgspec does not check constraints when a struct is constructed, so the encoded bytes are decoded
    again: a device finds out about a bad message here, not from a dead-letter queue. Raises
    `ContractError` subclasses (e.g. `OversizeMessage` before anything reaches the broker).
    """
    if not isinstance(msg, _MESSAGE_CLASSES):
        raise MalformedMessage(f"not a contract message: {type(msg).__name__}")
    try:
        payload = _ENCODER.encode(msg)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
        raise MalformedMessage(f"cannot encode {msg.kind}: {exc}") from None
    decode(payload, max_bytes=max_bytes, max_image_bytes=max_image_bytes)
    return payload


@overload
def decode(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int = ...,
    max_image_bytes: int = ...,
    expect: None = None,
) -> Message: ...


@overload
def decode(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int = ...,
    max_image_bytes: int = ...,
    expect: type[M],
) -> M: ...


def decode(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_image_bytes: int = MAX_JPEG_BYTES,
    expect: type[_Message] | None = None,
) -> _Message:
    """Parse and fully validate a payload; for any input it raises only `ContractError` subclasses.

    Order matters: size first (nothing is parsed from an oversize payload), then a lenient peek at
    ``kind``/``schema_version`` (so a newer message with new fields is reported as a version problem, not
    as garbage), then the strict typed decode, then the JPEG check. ``expect`` restricts the result to one
    message class.
    """
    if expect is not None and expect not in _MESSAGE_CLASSES:
        raise TypeError(f"expect must be a message class, got {expect!r}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
    size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if size > max_bytes:
        raise OversizeMessage(f"payload is {size} bytes, over the {max_bytes}-byte limit")
    peek = _decode_with(_PEEK_DECODER, payload)
    if peek.kind is msgspec.UNSET:
        raise MalformedMessage("Object missing required field `kind`", path="$")
    if peek.kind not in MESSAGE_TYPES:
        raise UnknownKind(f"unknown message kind {peek.kind!r}", kind=peek.kind)
    if peek.schema_version is msgspec.UNSET:
        raise MalformedMessage("Object missing required field `schema_version`", path="$")
    supported = SCHEMA_VERSION[peek.kind]
    if peek.schema_version != supported:
        raise UnsupportedSchemaVersion(
            f"{peek.kind} schema_version {peek.schema_version} is not supported (supported: {supported})",
            kind=peek.kind,
            got=peek.schema_version,
            supported=supported,
        )
    if expect is not None and expect.kind != peek.kind:
        raise MalformedMessage(f"expected a {expect.kind} message, got {peek.kind}", path="$.kind")
    msg = _decode_with(_DECODERS[peek.kind], payload)
    _check_images(msg, max_image_bytes)
    return msg


# --------------------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------------------

TOPIC_PREFIX: Final = "shelfloop/v1"

UPLINK_CHANNELS: Final[Mapping[str, str]] = MappingProxyType(
    {
        KIND_CROP: "crop",
        KIND_HEARTBEAT: "heartbeat",
        KIND_COMPLIANCE_SNAPSHOT: "compliance",
        KIND_CHECKOUT_ITEM: "checkout",
    }
)
"""Kind -> uplink channel (the last topic level of ``.../up/{channel}``)."""
_UPLINK_KINDS: Final[Mapping[str, str]] = MappingProxyType({v: k for k, v in UPLINK_CHANNELS.items()})
_DOWNLINK_KINDS: Final[Mapping[str, str]] = MappingProxyType(
    {"ack": KIND_CROP_ACK, "checkout_ack": KIND_CHECKOUT_ACK, "release": KIND_RELEASE_POINTER}
)

INGEST_SHARED_SUBSCRIPTION: Final = f"$share/ingest/{TOPIC_PREFIX}/+/+/up/#"
"""What cloud ingest workers subscribe to: one shared group, so each uplink is handled by one worker."""

Direction: TypeAlias = Literal["up", "down"]
Scope: TypeAlias = Literal["device", "store", "fleet"]


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """A parsed topic. ``store_id`` is None only for fleet-wide release pointers (``scope == "fleet"``)."""

    store_id: str | None
    device_id: str | None
    direction: Direction
    channel: str
    artifact: str | None = None

    @property
    def scope(self) -> Scope:
        """Who the topic addresses: one device, a whole store, or the whole fleet."""
        if self.device_id is not None:
            return "device"
        return "store" if self.store_id is not None else "fleet"

    @property
    def kind(self) -> str:
        """The message kind this topic carries."""
        if self.direction == "up":
            return _UPLINK_KINDS[self.channel]
        return _DOWNLINK_KINDS[self.channel]


def _store_level(store_id: str) -> str:
    if not isinstance(store_id, str) or not _STORE_ID_RE.match(store_id):
        raise InvalidTopic(f"invalid store_id {store_id!r}: 1-64 chars of [A-Za-z0-9_.-], not {FLEET!r}")
    return store_id


def _id_level(name: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidTopic(f"invalid {name} {value!r}: 1-64 chars of [A-Za-z0-9_.-]")
    return value


def _artifact_level(artifact: str) -> str:
    if artifact not in ARTIFACTS:
        raise InvalidTopic(f"invalid artifact {artifact!r}: one of {', '.join(ARTIFACTS)}")
    return artifact


def uplink_topic(store_id: str, device_id: str, kind: str) -> str:
    """Device -> cloud topic for messages of ``kind``: ``shelfloop/v1/{store}/{device}/up/{channel}``."""
    channel = UPLINK_CHANNELS.get(kind)
    if channel is None:
        raise InvalidTopic(f"{kind!r} is not an uplink kind: one of {', '.join(UPLINK_CHANNELS)}")
    return f"{TOPIC_PREFIX}/{_store_level(store_id)}/{_id_level('device_id', device_id)}/up/{channel}"


def uplink_topic_for(msg: UncertainCrop | Heartbeat | ComplianceSnapshot | CheckoutItem) -> str:
    """The uplink topic a message belongs on, from its own store/device ids."""
    return uplink_topic(msg.store_id, msg.device_id, msg.kind)


def ack_topic(store_id: str, device_id: str) -> str:
    """Cloud -> device topic for crop acks: ``shelfloop/v1/{store}/{device}/down/ack``."""
    return f"{TOPIC_PREFIX}/{_store_level(store_id)}/{_id_level('device_id', device_id)}/down/ack"


def checkout_ack_topic(store_id: str, device_id: str) -> str:
    """Cloud -> device topic for checkout-item acks: ``shelfloop/v1/{store}/{device}/down/checkout_ack``.

    Next to (not on) the crop ack topic, so one topic still carries one kind; the device ACL's ``down/#``
    already covers it.
    """
    return f"{TOPIC_PREFIX}/{_store_level(store_id)}/{_id_level('device_id', device_id)}/down/checkout_ack"


def release_topic(artifact: str, store_id: str | None = None, device_id: str | None = None) -> str:
    """Topic of a retained release pointer, at one of three scopes.

    - device: ``shelfloop/v1/{store}/{device}/down/release/{artifact}``
    - store:  ``shelfloop/v1/{store}/release/{artifact}``
    - fleet:  ``shelfloop/v1/_fleet/release/{artifact}``

    Precedence on the device is device > store > fleet: a device runs the most specific pointer it has
    for an artifact and falls back to the wider scope when the narrower retained pointer is cleared
    (an empty retained publish). That lets the cloud canary a release on one device or one store.
    """
    artifact = _artifact_level(artifact)
    if device_id is not None:
        if store_id is None:
            raise InvalidTopic("a device-scoped release topic needs the store_id too")
        return (
            f"{TOPIC_PREFIX}/{_store_level(store_id)}/{_id_level('device_id', device_id)}"
            f"/down/release/{artifact}"
        )
    if store_id is not None:
        return f"{TOPIC_PREFIX}/{_store_level(store_id)}/release/{artifact}"
    return f"{TOPIC_PREFIX}/{FLEET}/release/{artifact}"


def parse_topic(topic: str) -> TopicInfo:
    """Parse any ``shelfloop/v1`` topic; raises `InvalidTopic` for anything outside the scheme."""
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a string, got {type(topic).__name__}")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"{topic!r} contains wildcards; a publish topic cannot")
    levels = topic.split("/")
    prefix = TOPIC_PREFIX.split("/")
    if levels[: len(prefix)] != prefix:
        raise InvalidTopic(f"{topic!r} is not under {TOPIC_PREFIX}/")
    rest = levels[len(prefix) :]
    match rest:
        case [store, "release", artifact]:
            store_id = None if store == FLEET else _store_level(store)
            return TopicInfo(store_id, None, "down", "release", _artifact_level(artifact))
        case [store, device, "up", channel]:
            if channel not in _UPLINK_KINDS:
                raise InvalidTopic(f"{topic!r}: unknown uplink channel {channel!r}")
            return TopicInfo(_store_level(store), _id_level("device_id", device), "up", channel)
        case [store, device, "down", ("ack" | "checkout_ack") as channel]:
            return TopicInfo(_store_level(store), _id_level("device_id", device), "down", channel)
        case [store, device, "down", "release", artifact]:
            store_id = _store_level(store)
            return TopicInfo(
                store_id, _id_level("device_id", device), "down", "release", _artifact_level(artifact)
            )
        case _:
            raise InvalidTopic(f"{topic!r} does not match the {TOPIC_PREFIX} topic scheme")


def check_topic_matches(topic: str, msg: Message) -> TopicInfo:
    """Raise `TopicMismatch` unless ``msg`` belongs on ``topic``; returns the parsed topic.

    The broker ACL confines a device to its own topics; this is the cloud's second check, so a device
    (or a bug) cannot file crops or heartbeats under another store's or device's identity.
    """
    info = parse_topic(topic)
    if info.kind != msg.kind:
        raise TopicMismatch(f"a {msg.kind} message does not belong on {topic!r} (carries {info.kind})")
    if isinstance(msg, ReleasePointer):
        if info.artifact != msg.artifact:
            raise TopicMismatch(f"a {msg.artifact} release pointer does not belong on {topic!r}")
    elif isinstance(msg, UncertainCrop | Heartbeat | ComplianceSnapshot | CheckoutItem) and (
        msg.store_id != info.store_id or msg.device_id != info.device_id
    ):
        raise TopicMismatch(
            f"message from store {msg.store_id!r} device {msg.device_id!r} arrived on the topic of "
            f"store {info.store_id!r} device {info.device_id!r}"
        )
    return info


def device_subscriptions(store_id: str, device_id: str) -> list[str]:
    """What an edge agent subscribes to: its own downlink, and store- and fleet-wide release pointers."""
    store_id, device_id = _store_level(store_id), _id_level("device_id", device_id)
    return [
        f"{TOPIC_PREFIX}/{store_id}/{device_id}/down/#",
        f"{TOPIC_PREFIX}/{store_id}/release/+",
        f"{TOPIC_PREFIX}/{FLEET}/release/+",
    ]


def shared_ingest_subscription(group: str = "ingest") -> str:
    """The shared subscription for cloud ingest workers in consumer group ``group``."""
    _id_level("group", group)
    return f"$share/{group}/{TOPIC_PREFIX}/+/+/up/#"


_USERNAME_RE: Final = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


def _acl_username(username: str) -> str:
    # A newline or space here would inject extra lines into the broker's acl_file.
    if not isinstance(username, str) or not _USERNAME_RE.match(username):
        raise ValueError(f"invalid MQTT username {username!r}: 1-128 chars of [A-Za-z0-9_.@:-]")
    return username


def device_acl(store_id: str, device_id: str, username: str) -> str:
    """The Mosquitto ``acl_file`` block that confines one device's credentials to its own topics.

    Uplink is ``up/+`` rather than ``up/#`` and release pointers ``release/+``: single-level wildcards
    cannot reach a sibling device's topics even if a device is named like a topic keyword ("release").
    """
    store_id, device_id = _store_level(store_id), _id_level("device_id", device_id)
    base = f"{TOPIC_PREFIX}/{store_id}"
    return (
        f"user {_acl_username(username)}\n"
        f"topic write {base}/{device_id}/up/+\n"
        f"topic read {base}/{device_id}/down/#\n"
        f"topic read {base}/release/+\n"
        f"topic read {TOPIC_PREFIX}/{FLEET}/release/+\n"
    )


def cloud_acl(username: str) -> str:
    """The ``acl_file`` block for cloud services: read every uplink, write acks and release pointers.

    The read rule is exactly the pattern of `INGEST_SHARED_SUBSCRIPTION` (without the ``$share`` prefix).
    """
    return (
        f"user {_acl_username(username)}\n"
        f"topic read {TOPIC_PREFIX}/+/+/up/#\n"
        f"topic write {TOPIC_PREFIX}/+/+/down/#\n"
        f"topic write {TOPIC_PREFIX}/+/release/+\n"
    )


# --------------------------------------------------------------------------------------------------------
# Identifiers and time
# --------------------------------------------------------------------------------------------------------

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS: Final = 80
_id_lock = threading.Lock()
_id_last_ms = -1
_id_last_random = 0


def _reset_id_state() -> None:
    """After fork the child must not continue the parent's sequence (it would repeat the parent's ids)."""
    global _id_last_ms, _id_last_random
    _id_last_ms, _id_last_random = -1, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_id_state)


def new_id() -> str:
    """A ULID: 48-bit millisecond timestamp + 80 random bits, 26 Crockford base32 chars, sortable by time.

    Within one process ids are strictly increasing (same millisecond: random part + 1), so an outbox
    ordered by id is ordered by creation; across devices, 80 random bits make collisions negligible.
    """
    global _id_last_ms, _id_last_random
    with _id_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _id_last_ms:  # same millisecond, or the clock stepped back
            now_ms, rand = _id_last_ms, _id_last_random + 1
            if rand >= 1 << _RANDOM_BITS:
                now_ms, rand = now_ms + 1, secrets.randbits(_RANDOM_BITS)
        else:
            rand = secrets.randbits(_RANDOM_BITS)
        _id_last_ms, _id_last_random = now_ms, rand
    value = (now_ms << _RANDOM_BITS) | rand
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_crop_id() -> str:
    """A fresh ``crop_id`` (a ULID, see `new_id`); the cloud deduplicates on it."""
    return new_id()


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC (the contract rejects naive datetimes)."""
    return datetime.now(UTC)
