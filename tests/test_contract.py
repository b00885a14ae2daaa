"""Tests of the edge-cloud wire contract (shelfloop.contract), without a broker."""

from __future__ import annotations

import base64
import io
import random
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shelfloop import contract as c

# --------------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------------


def make_jpeg(
    width: int = 32,
    height: int = 24,
    *,
    mode: str = "RGB",
    progressive: bool = False,
    optimize: bool = False,
    quality: int = 85,
    exif: bool = False,
) -> bytes:
    """A real JPEG from Pillow (the contract itself must not depend on an image library)."""
    image = Image.new(mode, (width, height))
    for x in range(0, width, 3):  # some structure, so the entropy-coded data is not trivial
        image.putpixel((x, (x * 7) % height), (255, 128, 0) if mode == "RGB" else 200)
    options: dict[str, Any] = {"quality": quality, "progressive": progressive, "optimize": optimize}
    if exif:
        info = Image.Exif()
        info[0x010F] = "ShelfLoop"  # Make
        options["exif"] = info.tobytes()
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **options)
    return buf.getvalue()


def make_noise_jpeg(width: int, height: int, quality: int = 90) -> bytes:
    """A JPEG of random pixels: about one byte per pixel at quality 90, for size limits."""
    pixels = random.Random(width * height).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


JPEG = make_jpeg()
JPEG_SAMPLES = [
    JPEG,
    make_jpeg(1, 1),
    make_jpeg(64, 48, progressive=True),
    make_jpeg(17, 33, mode="L"),
    make_jpeg(40, 30, exif=True, optimize=True),
]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)
T0 = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
SHA = "0123456789abcdef" * 4
SIGNATURE = base64.b64encode(bytes(range(64))).decode()


def crop(**changes: Any) -> c.UncertainCrop:
    fields: dict[str, Any] = {
        "crop_id": "01J0CROP0000000000000000AA",
        "store_id": "store-001",
        "device_id": "edge-01",
        "camera_id": "cam-2",
        "captured_at": T0,
        "source": "shelf",
        "model_version": "yolo-2024.06.1",
        "gallery_version": "gal-42",
        "detector_confidence": 0.33,
        "box": c.BoundingBox(x1=10.5, y1=20.0, x2=110.0, y2=220.25),
        "frame_width": 1920,
        "frame_height": 1080,
        "candidates": [
            c.SkuCandidate(sku_id="sku-123", score=0.51),
            c.SkuCandidate(sku_id="sku-456", score=0.49),
            c.SkuCandidate(sku_id="sku-789", score=0.01),
        ],
        "reasons": ["low_margin", "novelty"],
        "priority": 80,
        "margin": 0.02,
        "novelty": 1.7,
        "jpeg": JPEG,
    }
    fields.update(changes)
    return c.UncertainCrop(**fields)


def ack(**changes: Any) -> c.CropAck:
    fields: dict[str, Any] = {
        "crop_id": "01J0CROP0000000000000000AA",
        "status": "stored",
        "reason": None,
        "object_key": "crops/store-001/edge-01/01J0CROP0000000000000000AA.jpg",
        "acked_at": T0 + timedelta(seconds=2),
    }
    fields.update(changes)
    return c.CropAck(**fields)


def heartbeat(**changes: Any) -> c.Heartbeat:
    fields: dict[str, Any] = {
        "store_id": "store-001",
        "device_id": "edge-01",
        "sent_at": T0,
        "agent_version": "0.1.0",
        "uptime_s": 3600.5,
        "frames_per_s": 14.8,
        "stage_latency": {
            "decode": c.LatencyStats(p50_ms=2.0, p95_ms=3.5, count=900),
            "infer": c.LatencyStats(p50_ms=21.0, p95_ms=30.0, count=900),
            "route": c.LatencyStats(p50_ms=0.1, p95_ms=0.2, count=12),
        },
        "model_version": "yolo-2024.06.1",
        "gallery_version": "gal-42",
        "outbox_depth": 3,
        "outbox_bytes": 48_000,
        "outbox_dropped": 0,
        "crops_sent": 120,
        "crops_deduplicated": 4,
        "cpu_percent": 63.0,
        "memory_mb": 812.5,
    }
    fields.update(changes)
    return c.Heartbeat(**fields)


def snapshot(**changes: Any) -> c.ComplianceSnapshot:
    fields: dict[str, Any] = {
        "snapshot_id": "snap-0001",
        "store_id": "store-001",
        "device_id": "edge-01",
        "camera_id": "cam-2",
        "bay_id": "bay-07",
        "planogram_version": "pg-2024-05",
        "captured_at": T0,
        "model_version": "yolo-2024.06.1",
        "gallery_version": "gal-42",
        "slots": [
            c.SlotResult(
                shelf_row=0,
                slot_index=0,
                planned_sku="sku-123",
                status="correct",
                facings_planned=3,
                facings_found=3,
                found_sku="sku-123",
                boxes=[c.BoundingBox(x1=0, y1=0, x2=10, y2=10)],
            ),
            c.SlotResult(
                shelf_row=0,
                slot_index=1,
                planned_sku="sku-456",
                status="out_of_stock",
                facings_planned=2,
                facings_found=0,
            ),
        ],
        "unplanned": [
            c.UnplannedDetection(
                status="extra_unplanned",
                sku_id="sku-999",
                box=c.BoundingBox(x1=5, y1=5, x2=9, y2=9),
                score=0.8,
            ),
            c.UnplannedDetection(
                status="unknown_product", sku_id=None, box=c.BoundingBox(x1=1, y1=1, x2=2, y2=2), score=0.4
            ),
        ],
        "compliance_pct": 50.0,
        "availability_pct": 50.0,
        "image_jpeg": JPEG,
    }
    fields.update(changes)
    return c.ComplianceSnapshot(**fields)


def checkout(**changes: Any) -> c.CheckoutItem:
    fields: dict[str, Any] = {
        "event_id": "evt-1",
        "store_id": "store-001",
        "device_id": "till-03",
        "camera_id": "cam-top",
        "basket_id": "basket-77",
        "track_id": 5,
        "status": "resolved",
        "sku_id": "sku-123",
        "probability": 0.93,
        "candidates": [c.SkuCandidate(sku_id="sku-123", score=0.93)],
        "votes": 11,
        "first_seen": T0,
        "last_seen": T0 + timedelta(seconds=3),
        "reason": None,
    }
    fields.update(changes)
    return c.CheckoutItem(**fields)


def checkout_ack(**changes: Any) -> c.CheckoutAck:
    fields: dict[str, Any] = {
        "event_id": "evt-1",
        "status": "stored",
        "reason": None,
        "acked_at": T0 + timedelta(seconds=2),
    }
    fields.update(changes)
    return c.CheckoutAck(**fields)


def release(**changes: Any) -> c.ReleasePointer:
    fields: dict[str, Any] = {
        "artifact": "model",
        "name": "shelf-detector",
        "version": "2024.06.1",
        "url": "https://artifacts.example.com/models/shelf-detector-2024.06.1.onnx",
        "size_bytes": 12_345_678,
        "sha256": SHA,
        "signature": SIGNATURE,
        "key_id": "release-2024",
        "published_at": T0,
    }
    fields.update(changes)
    return c.ReleasePointer(**fields)


SAMPLES: dict[str, c.Message] = {
    "crop": crop(),
    "crop_full": crop(
        bay_id="bay-07", track_id=42, source="checkout", margin=None, novelty=None, candidates=[]
    ),
    "crop_ack": ack(),
    "crop_ack_rejected": ack(status="rejected", reason="invalid_image", object_key=None),
    "heartbeat": heartbeat(),
    "heartbeat_full": heartbeat(gpu_percent=40.0, temperature_c=61.5, faults=["camera cam-2 stalled"]),
    "compliance_snapshot": snapshot(),
    "compliance_snapshot_no_image": snapshot(image_jpeg=None, slots=[], unplanned=[]),
    "checkout_item": checkout(),
    "checkout_item_unresolved": checkout(status="unresolved", sku_id=None, candidates=[], reason="low votes"),
    "checkout_ack": checkout_ack(),
    "checkout_ack_duplicate": checkout_ack(event_id="a.b-c_1", status="duplicate"),
    "checkout_ack_rejected": checkout_ack(status="rejected", reason="topic_mismatch"),
    "release_pointer": release(),
    "release_pointer_gallery": release(
        artifact="gallery", min_agent_version="0.2.0", url="s3://bucket/g.faiss"
    ),
}

_DELETE = object()


def raw_payload(msg: c.Message, **changes: Any) -> bytes:
    """A valid message re-encoded as a plain map with ``changes`` applied (``_DELETE`` drops a key)."""
    data = msgspec.msgpack.decode(c.encode(msg))
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    return msgspec.msgpack.encode(data)


def decode_error(payload: bytes, **kwargs: Any) -> c.ContractError:
    with pytest.raises(c.ContractError) as excinfo:
        c.decode(payload, **kwargs)
    return excinfo.value


# --------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_every_message_type(name: str) -> None:
    msg = SAMPLES[name]
    payload = c.encode(msg)
    assert isinstance(payload, bytes)
    decoded = c.decode(payload)
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert c.decode(payload, expect=type(msg)) == msg
    assert c.decode(bytearray(payload)) == msg
    assert c.decode(memoryview(payload)) == msg
    normalised = c.encode(decoded)  # ints given for float fields come back as floats: same value
    assert c.encode(c.decode(normalised)) == normalised


def test_samples_cover_every_kind() -> None:
    assert {m.kind for m in SAMPLES.values()} == set(c.MESSAGE_TYPES) == set(c.SCHEMA_VERSION)


def test_payload_is_a_map_with_kind_and_schema_version_and_raw_jpeg() -> None:
    payload = c.encode(crop())
    data = msgspec.msgpack.decode(payload)
    assert data["kind"] == "crop"
    assert data["schema_version"] == c.SCHEMA_VERSION["crop"] == 1
    assert data["jpeg"] == JPEG
    assert JPEG in payload  # raw bytes, not base64
    assert base64.b64encode(JPEG) not in payload
    assert len(payload) < len(JPEG) + 700


def test_kind_is_available_on_class_and_instance() -> None:
    for kind, cls in c.MESSAGE_TYPES.items():
        assert cls.kind == kind == c.kind_of(cls)
    assert crop().kind == "crop" == c.kind_of(crop())
    assert c.UPLINK_CHANNELS == {
        "crop": "crop",
        "heartbeat": "heartbeat",
        "compliance_snapshot": "compliance",
        "checkout_item": "checkout",
    }


def test_non_utc_timestamps_round_trip_to_the_same_instant() -> None:
    local = datetime(2024, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    decoded = c.decode(c.encode(crop(captured_at=local)))
    assert decoded.captured_at == local
    assert decoded.captured_at.utcoffset() == timedelta(0)


def test_messages_are_immutable() -> None:
    msg = crop()
    with pytest.raises(AttributeError):
        msg.priority = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------------

ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=64).filter(lambda s: s not in {".", "..", "_fleet"})
crop_ids = st.text(alphabet=ID_ALPHABET.replace(".", ""), min_size=8, max_size=64)
versions = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
)
units = st.floats(min_value=0.0, max_value=1.0)
non_negative = st.floats(min_value=0.0, max_value=1e9)
counts = st.integers(min_value=0, max_value=2**63 - 1)
candidate_lists = st.lists(
    st.builds(c.SkuCandidate, sku_id=ids, score=units), max_size=20, unique_by=lambda cand: cand.sku_id
).map(lambda cands: sorted(cands, key=lambda cand: cand.score, reverse=True))


@st.composite
def crops(draw: st.DrawFn) -> c.UncertainCrop:
    width = draw(st.integers(min_value=1, max_value=8192))
    height = draw(st.integers(min_value=1, max_value=8192))
    x1 = draw(st.floats(min_value=0.0, max_value=float(width)))
    y1 = draw(st.floats(min_value=0.0, max_value=float(height)))
    x2 = draw(st.floats(min_value=x1, max_value=width + 1.0, exclude_min=True))
    y2 = draw(st.floats(min_value=y1, max_value=height + 1.0, exclude_min=True))
    return draw(
        st.builds(
            c.UncertainCrop,
            crop_id=crop_ids,
            store_id=ids,
            device_id=ids,
            camera_id=ids,
            captured_at=timestamps,
            source=st.sampled_from(c.SOURCES),
            model_version=versions,
            gallery_version=versions,
            detector_confidence=units,
            box=st.just(c.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)),
            frame_width=st.just(width),
            frame_height=st.just(height),
            candidates=candidate_lists,
            reasons=st.lists(st.sampled_from(c.UNCERTAINTY_REASONS), min_size=1, max_size=6, unique=True),
            priority=st.integers(min_value=0, max_value=100),
            margin=st.none() | units,
            novelty=st.none() | non_negative,
            bay_id=st.none() | ids,
            track_id=st.none() | counts,
            jpeg=st.sampled_from(JPEG_SAMPLES),
        )
    )


@st.composite
def checkout_items(draw: st.DrawFn) -> c.CheckoutItem:
    first_seen = draw(timestamps)
    resolved = draw(st.booleans())
    return draw(
        st.builds(
            c.CheckoutItem,
            event_id=ids,
            store_id=ids,
            device_id=ids,
            camera_id=ids,
            basket_id=ids,
            track_id=counts,
            status=st.just("resolved" if resolved else "unresolved"),
            sku_id=ids if resolved else st.none(),
            probability=units,
            candidates=candidate_lists,
            votes=counts,
            first_seen=st.just(first_seen),
            last_seen=st.just(first_seen)
            | st.timedeltas(timedelta(0), timedelta(hours=1)).map(first_seen.__add__),
            reason=st.none() | st.text(min_size=1, max_size=512),
        )
    )


latencies = st.tuples(non_negative, non_negative, counts).map(
    lambda t: c.LatencyStats(p50_ms=min(t[0], t[1]), p95_ms=max(t[0], t[1]), count=t[2])
)
heartbeats = st.builds(
    c.Heartbeat,
    store_id=ids,
    device_id=ids,
    sent_at=timestamps,
    agent_version=versions,
    uptime_s=non_negative,
    frames_per_s=non_negative,
    stage_latency=st.dictionaries(
        st.sampled_from(["decode", "pre", "infer", "post", "recognise", "route"])
        | st.from_regex(r"\A[a-z]\Z"),
        latencies,
        max_size=8,
    ),
    model_version=versions,
    gallery_version=versions,
    outbox_depth=counts,
    outbox_bytes=counts,
    outbox_dropped=counts,
    crops_sent=counts,
    crops_deduplicated=counts,
    cpu_percent=st.none() | non_negative,
    memory_mb=st.none() | non_negative,
    gpu_percent=st.none() | st.floats(min_value=0.0, max_value=100.0),
    temperature_c=st.none() | st.floats(min_value=-100.0, max_value=250.0),
    faults=st.lists(st.text(min_size=1, max_size=256), max_size=5),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=st.one_of(crops(), checkout_items(), heartbeats))
def test_property_round_trip(msg: c.Message) -> None:
    assert c.decode(c.encode(msg)) == msg


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=4096))
def test_property_decode_arbitrary_bytes_raises_only_contract_errors(payload: bytes) -> None:
    try:
        c.decode(payload)
    except c.ContractError as exc:
        assert exc.reason in REASONS.values()


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | timestamps,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(sorted(SAMPLES)),
    field=st.text(max_size=12)
    | st.sampled_from(["kind", "schema_version", "box", "jpeg", "candidates", "slots"]),
    value=msgpack_values,
    drop=st.booleans(),
)
def test_property_structured_garbage_raises_only_contract_errors(
    base: str, field: str, value: Any, drop: bool
) -> None:
    data = msgspec.msgpack.decode(c.encode(SAMPLES[base]))
    if drop:
        data.pop(field, None)
    else:
        data[field] = value
    try:
        decoded = c.decode(msgspec.msgpack.encode(data))
    except c.ContractError:
        return
    assert c.decode(c.encode(decoded)) == decoded


MUTATION_BASES = [c.encode(crop(jpeg=make_jpeg(8, 8))), c.encode(checkout()), c.encode(release())]


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_property_mutated_payloads_raise_contract_errors_or_decode_valid(data: st.DataObject) -> None:
    payload = bytearray(data.draw(st.sampled_from(MUTATION_BASES)))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = data.draw(st.integers(min_value=0, max_value=max(len(payload) - 1, 0)))
        if op == "flip" and payload:
            payload[at] ^= data.draw(st.integers(min_value=1, max_value=255))
        elif op == "truncate":
            del payload[at:]
        elif op == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del payload[at : at + data.draw(st.integers(min_value=1, max_value=8))]
    try:
        decoded = c.decode(bytes(payload))
    except c.ContractError:
        return
    assert isinstance(decoded, tuple(c.MESSAGE_TYPES.values()))
    assert c.decode(c.encode(decoded)) == decoded  # whatever decodes is a fully valid message


# --------------------------------------------------------------------------------------------------------
# Typed errors
# --------------------------------------------------------------------------------------------------------

REASONS: dict[type[c.ContractError], str] = {
    c.OversizeMessage: "oversize",
    c.MalformedMessage: "malformed",
    c.UnknownKind: "unknown_kind",
    c.UnsupportedSchemaVersion: "schema_version",
    c.InvalidImage: "invalid_image",
    c.InvalidTopic: "invalid_topic",
    c.TopicMismatch: "topic_mismatch",
}


@pytest.mark.parametrize(("cls", "reason"), REASONS.items())
def test_error_reason_codes_are_stable(cls: type[c.ContractError], reason: str) -> None:
    assert issubclass(cls, c.ContractError)
    err = cls("something is wrong")
    assert err.reason == reason
    assert err.detail == "something is wrong"
    assert reason in str(err) and "something is wrong" in str(err)


@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_schema_version(version: int) -> None:
    err = decode_error(raw_payload(crop(), schema_version=version))
    assert isinstance(err, c.UnsupportedSchemaVersion)
    assert err.reason == "schema_version"
    assert (err.kind, err.got, err.supported) == ("crop", version, 1)
    assert f"schema_version {version}" in err.detail and "supported: 1" in err.detail


def test_future_version_with_new_fields_is_a_version_error_not_malformed() -> None:
    payload = raw_payload(heartbeat(), schema_version=2, battery_pct=80.0, stage_latency=["new", "shape"])
    err = decode_error(payload)
    assert isinstance(err, c.UnsupportedSchemaVersion)
    assert err.got == 2


def test_unknown_field_at_the_current_version_is_malformed() -> None:
    err = decode_error(raw_payload(heartbeat(), battery_pct=80.0))
    assert isinstance(err, c.MalformedMessage)
    assert "battery_pct" in err.detail


@pytest.mark.parametrize(
    "field", ["crop_id", "store_id", "captured_at", "box", "candidates", "jpeg", "margin"]
)
def test_missing_field_names_the_field(field: str) -> None:
    err = decode_error(raw_payload(crop(), **{field: _DELETE}))
    assert isinstance(err, c.MalformedMessage)
    assert err.reason == "malformed"
    assert f"`{field}`" in err.detail


def test_missing_nested_field_names_the_path() -> None:
    err = decode_error(raw_payload(crop(), box={"x1": 1.0, "y1": 1.0, "x2": 2.0}))
    assert isinstance(err, c.MalformedMessage)
    assert "`y2`" in err.detail and err.path == "$.box"


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"box": {"x1": "ten", "y1": 1.0, "x2": 2.0, "y2": 2.0}}, "$.box.x1"),
        ({"priority": "high"}, "$.priority"),
        ({"priority": 101}, "$.priority"),
        ({"frame_width": 0}, "$.frame_width"),
        ({"jpeg": "not bytes"}, "$.jpeg"),
        ({"candidates": [{"sku_id": "a", "score": 1.5}]}, "$.candidates[0].score"),
        ({"detector_confidence": float("nan")}, "$.detector_confidence"),
        ({"source": "drone"}, "$.source"),
        ({"reasons": []}, "$.reasons"),
        ({"reasons": ["gut_feeling"]}, "$.reasons[0]"),
        ({"crop_id": "short"}, "$.crop_id"),
        ({"schema_version": "1"}, "$.schema_version"),
    ],
)
def test_wrong_type_or_value_names_the_path(changes: dict[str, Any], path: str) -> None:
    err = decode_error(raw_payload(crop(), **changes))
    assert isinstance(err, c.MalformedMessage)
    assert err.path == path
    assert path in err.detail


def test_unknown_kind() -> None:
    err = decode_error(raw_payload(crop(), kind="selfie"))
    assert isinstance(err, c.UnknownKind)
    assert err.reason == "unknown_kind" and err.kind == "selfie"


@pytest.mark.parametrize("kind", [_DELETE, 7, None])
def test_missing_or_non_string_kind_is_malformed(kind: Any) -> None:
    err = decode_error(raw_payload(crop(), kind=kind))
    assert isinstance(err, c.MalformedMessage)
    assert "kind" in err.detail


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # a never-used msgpack byte
        b'{"kind": "crop"}',  # JSON is not msgpack
        msgspec.msgpack.encode([1, 2, 3]),  # not a map
        msgspec.msgpack.encode("crop"),
        c.encode(ack())[:-3],  # truncated
        c.encode(ack()) + b"\x00",  # trailing data
        b"\x91" * 5000,  # deeply nested arrays
        b"\x81\xa1z" + b"\x91" * 5000,  # deeply nested inside a skipped field
        b"\x81\xa4kind\xdd\xff\xff\xff\xff",  # a 4-billion-element array header
    ],
)
def test_not_msgpack_or_not_a_map_is_malformed(payload: bytes) -> None:
    err = decode_error(payload)
    assert isinstance(err, c.MalformedMessage)
    assert err.reason == "malformed"


def test_non_bytes_payload_is_malformed() -> None:
    err = decode_error("a string")  # type: ignore[arg-type]
    assert isinstance(err, c.MalformedMessage)


def test_crop_acks_are_unchanged_by_the_checkout_ack() -> None:
    """Backwards compatibility: a crop ack has exactly the fields it always had, so devices that predate
    `CheckoutAck` (strict decoders) keep reading crop acks, and they never see a checkout ack on their
    ``down/ack`` topic."""
    assert set(msgspec.msgpack.decode(c.encode(ack()))) == {
        "kind",
        "schema_version",
        "crop_id",
        "status",
        "reason",
        "object_key",
        "acked_at",
    }
    assert c.SCHEMA_VERSION["crop_ack"] == 1
    assert c.checkout_ack_topic("s1", "d1") != c.ack_topic("s1", "d1")
    err = decode_error(c.encode(checkout_ack()), expect=c.CropAck)
    assert isinstance(err, c.MalformedMessage) and "checkout_ack" in err.detail
    # A crop id is not always an event id and back: the two acks cannot share one id field.
    assert decode_error(raw_payload(ack(), crop_id="evt.1")).reason == "malformed"


def test_expect_restricts_the_message_class() -> None:
    payload = c.encode(ack())
    assert isinstance(c.decode(payload, expect=c.CropAck), c.CropAck)
    err = decode_error(payload, expect=c.UncertainCrop)
    assert isinstance(err, c.MalformedMessage)
    assert "crop_ack" in err.detail
    with pytest.raises(TypeError):
        c.decode(payload, expect=c.SkuCandidate)  # type: ignore[type-var]


def test_oversize_payload_is_refused_before_parsing() -> None:
    garbage = b"\xc1" * (c.MAX_MESSAGE_BYTES + 1)  # would be malformed if it were parsed
    err = decode_error(garbage)
    assert isinstance(err, c.OversizeMessage)
    assert err.reason == "oversize"
    assert str(c.MAX_MESSAGE_BYTES) in err.detail
    assert isinstance(decode_error(b"\xc1" * c.MAX_MESSAGE_BYTES), c.MalformedMessage)  # at the limit: parsed


def test_max_bytes_can_be_overridden_per_call() -> None:
    payload = c.encode(crop())
    assert c.decode(payload, max_bytes=len(payload)) == crop()
    assert isinstance(decode_error(payload, max_bytes=len(payload) - 1), c.OversizeMessage)
    with pytest.raises(c.OversizeMessage):
        c.encode(crop(), max_bytes=len(payload) - 1)
    assert c.encode(crop(), max_bytes=len(payload)) == payload


def test_encode_refuses_a_message_over_max_message_bytes() -> None:
    slot = c.SlotResult(
        shelf_row=0,
        slot_index=0,
        planned_sku="s" * 64,
        status="wrong_shelf",
        facings_planned=1,
        facings_found=1,
    )
    slots = [msgspec.structs.replace(slot, shelf_row=i // 1000, slot_index=i % 1000) for i in range(4096)]
    image = make_noise_jpeg(700, 700)
    assert len(image) <= c.MAX_JPEG_BYTES  # every part is within its own limit ...
    big = snapshot(slots=slots, image_jpeg=image)
    assert len(msgspec.msgpack.encode(big)) > c.MAX_MESSAGE_BYTES  # ... but the whole is not
    with pytest.raises(c.OversizeMessage):
        c.encode(big)


def test_oversize_image() -> None:
    with pytest.raises(c.OversizeMessage, match=r"\$\.image_jpeg"):
        c.encode(snapshot(image_jpeg=make_noise_jpeg(800, 800)))  # over MAX_JPEG_BYTES
    big = make_jpeg(1024, 1024, quality=100)
    with pytest.raises(c.OversizeMessage, match=r"\$\.jpeg"):
        c.encode(crop(jpeg=big), max_image_bytes=len(big) - 1)
    payload = c.encode(crop(jpeg=big))
    assert isinstance(decode_error(payload, max_image_bytes=1000), c.OversizeMessage)


TRUNCATED_JPEG = JPEG[: len(JPEG) // 2]
BAD_IMAGES = {
    "png": PNG,
    "truncated": TRUNCATED_JPEG,
    "random_after_soi": b"\xff\xd8" + bytes(range(7, 250)) * 3 + b"\xff\xd9",
    "soi_eoi_only": b"\xff\xd8\xff\xd9",
    "empty": b"",
    "garbage_after_eoi": JPEG + b"\x00" * 8 + b"trailing",
    "too_much_padding": JPEG + b"\x00" * 64,
    "no_frame_header": b"\xff\xd8\xff\xe0\x00\x04ab\xff\xda\x00\x02\x00\xff\xd9",
}


def _zero_width_jpeg() -> bytes:
    data = bytearray(JPEG)
    at = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[at + 7 : at + 9] = b"\x00\x00"  # SOF: FF Cn, length(2), precision(1), height(2), width(2)
    return bytes(data)


BAD_IMAGES["zero_width"] = _zero_width_jpeg()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_invalid_image_is_refused_on_encode_and_decode(name: str) -> None:
    bad = BAD_IMAGES[name]
    with pytest.raises(c.InvalidImage):
        c.jpeg_dimensions(bad)
    for msg, field in [(crop(jpeg=bad), "jpeg"), (snapshot(image_jpeg=bad), "image_jpeg")]:
        with pytest.raises(c.InvalidImage) as excinfo:
            c.encode(msg)
        assert excinfo.value.reason == "invalid_image"
        assert f"$.{field}" in excinfo.value.detail
        err = decode_error(msgspec.msgpack.encode(msg))  # a sender that bypasses encode()
        assert isinstance(err, c.InvalidImage)


@pytest.mark.parametrize(
    ("jpeg", "size"),
    [
        (JPEG, (32, 24)),
        (make_jpeg(1, 1), (1, 1)),
        (make_jpeg(640, 480, progressive=True), (640, 480)),
        (make_jpeg(17, 33, mode="L"), (17, 33)),
        (make_jpeg(20, 10, mode="CMYK"), (20, 10)),
        (make_jpeg(40, 30, exif=True, optimize=True), (40, 30)),
        (JPEG + b"\x00\x00", (32, 24)),  # a little zero padding after EOI is tolerated
    ],
)
def test_jpeg_dimensions_of_real_jpegs(jpeg: bytes, size: tuple[int, int]) -> None:
    assert c.jpeg_dimensions(jpeg) == size
    assert c.jpeg_dimensions(bytearray(jpeg)) == size
    assert c.decode(c.encode(crop(jpeg=jpeg))).jpeg == jpeg


def test_naive_datetime_is_refused() -> None:
    naive = datetime(2024, 6, 1, 12, 0)
    with pytest.raises(c.MalformedMessage, match="timezone") as excinfo:
        c.encode(crop(captured_at=naive))
    assert excinfo.value.path == "$.captured_at"
    err = decode_error(msgspec.msgpack.encode(ack(acked_at=naive)))
    assert isinstance(err, c.MalformedMessage) and err.path == "$.acked_at"


CANDIDATE_DICTS = [{"sku_id": "a", "score": 0.2}, {"sku_id": "b", "score": 0.7}]


def test_unsorted_candidates_are_refused() -> None:
    unsorted = [c.SkuCandidate(sku_id="a", score=0.2), c.SkuCandidate(sku_id="b", score=0.7)]
    with pytest.raises(ValueError, match="sorted"):
        crop(candidates=unsorted)
    err = decode_error(raw_payload(crop(), candidates=CANDIDATE_DICTS))
    assert isinstance(err, c.MalformedMessage) and "sorted" in err.detail
    err = decode_error(raw_payload(checkout(), candidates=CANDIDATE_DICTS))
    assert isinstance(err, c.MalformedMessage) and "sorted" in err.detail


def test_duplicate_candidates_and_too_many_are_refused() -> None:
    dupes = [{"sku_id": "a", "score": 0.7}, {"sku_id": "a", "score": 0.2}]
    assert isinstance(decode_error(raw_payload(crop(), candidates=dupes)), c.MalformedMessage)
    many = [{"sku_id": f"s{i}", "score": 0.5} for i in range(21)]
    err = decode_error(raw_payload(crop(), candidates=many))
    assert isinstance(err, c.MalformedMessage) and err.path == "$.candidates"


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "resolved", "sku_id": None},
        {"status": "unresolved", "sku_id": "sku-123"},
        {"last_seen": T0 - timedelta(seconds=1)},
    ],
)
def test_checkout_item_cross_field_rules(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        checkout(**changes)
    err = decode_error(raw_payload(checkout(), **changes))
    assert isinstance(err, c.MalformedMessage)


@pytest.mark.parametrize(
    "signature",
    [
        base64.b64encode(bytes(63)).decode(),
        base64.b64encode(bytes(65)).decode(),
        "not base64 at all!",
        SIGNATURE[:-4],
    ],
)
def test_bad_signature_is_refused(signature: str) -> None:
    err = decode_error(raw_payload(release(), signature=signature))
    assert isinstance(err, c.MalformedMessage)
    assert "signature" in err.detail


@pytest.mark.parametrize("sha", [SHA.upper(), SHA[:-1], SHA + "0", "g" * 64, ""])
def test_bad_sha256_is_refused(sha: str) -> None:
    err = decode_error(raw_payload(release(), sha256=sha))
    assert isinstance(err, c.MalformedMessage) and err.path == "$.sha256"


@pytest.mark.parametrize("field", ["store_id", "device_id", "camera_id", "bay_id"])
@pytest.mark.parametrize("value", ["a/b", "+", "#", "store+1", "", "x" * 65, "..", "with space", "$SYS"])
def test_bad_identifiers_are_refused(field: str, value: str) -> None:
    err = decode_error(raw_payload(crop(bay_id="bay-1"), **{field: value}))
    assert isinstance(err, c.MalformedMessage)
    assert err.path == f"$.{field}"


def test_fleet_is_not_a_store_id() -> None:
    err = decode_error(raw_payload(heartbeat(), store_id=c.FLEET))
    assert isinstance(err, c.MalformedMessage) and err.path == "$.store_id"
    assert (
        c.decode(raw_payload(heartbeat(), device_id=c.FLEET)).device_id == c.FLEET
    )  # only stores reserve it


@pytest.mark.parametrize(
    ("factory", "changes"),
    [
        (crop, {"box": {"x1": 5.0, "y1": 5.0, "x2": 5.0, "y2": 9.0}}),  # zero width
        (crop, {"box": {"x1": 5.0, "y1": 9.0, "x2": 8.0, "y2": 2.0}}),  # upside down
        (crop, {"box": {"x1": 5.0, "y1": 5.0, "x2": 1922.0, "y2": 9.0}}),  # outside the frame
        (crop, {"reasons": ["novelty", "novelty"]}),
        (ack, {"status": "rejected", "reason": None}),
        (ack, {"status": "stored", "object_key": None}),
        (checkout_ack, {"status": "rejected", "reason": None}),
        (checkout_ack, {"event_id": "a/b"}),  # an event id is a topic-safe Identifier
        (checkout_ack, {"status": "received"}),
        (heartbeat, {"stage_latency": {"infer": {"p50_ms": 5.0, "p95_ms": 1.0, "count": 1}}}),
        (heartbeat, {"stage_latency": {"Bad Key": {"p50_ms": 1.0, "p95_ms": 1.0, "count": 1}}}),
        (heartbeat, {"outbox_depth": -1}),
        (snapshot, {"compliance_pct": 100.5}),
        (snapshot, {"slots": [msgspec.to_builtins(snapshot().slots[0])] * 2}),
        (snapshot, {"unplanned": [{"status": "unknown_product", "sku_id": "x", "box": [], "score": 0.1}]}),
        (release, {"size_bytes": 0}),
        (release, {"url": "ftp://example.com/m.onnx"}),
    ],
)
def test_other_constraints(factory: Any, changes: dict[str, Any]) -> None:
    err = decode_error(raw_payload(factory(), **changes))
    assert isinstance(err, c.MalformedMessage)


def test_encode_refuses_non_messages_and_unencodable_values() -> None:
    with pytest.raises(c.MalformedMessage):
        c.encode({"kind": "crop"})  # type: ignore[arg-type]
    with pytest.raises(c.MalformedMessage):
        c.encode(crop(priority=object()))
    with pytest.raises(c.MalformedMessage, match=r"\$\.priority"):
        c.encode(crop(priority=5.5))


def test_contract_errors_survive_pickling() -> None:
    import pickle

    err = c.UnsupportedSchemaVersion("crop v2", kind="crop", got=2, supported=1)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.reason, copy.detail, copy.got) == (
        c.UnsupportedSchemaVersion,
        "schema_version",
        "crop v2",
        2,
    )


# --------------------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------------------


def test_topic_builders() -> None:
    assert c.uplink_topic("s1", "d1", "crop") == "shelfloop/v1/s1/d1/up/crop"
    assert c.uplink_topic("s1", "d1", "heartbeat") == "shelfloop/v1/s1/d1/up/heartbeat"
    assert c.uplink_topic("s1", "d1", "compliance_snapshot") == "shelfloop/v1/s1/d1/up/compliance"
    assert c.uplink_topic("s1", "d1", "checkout_item") == "shelfloop/v1/s1/d1/up/checkout"
    assert c.ack_topic("s1", "d1") == "shelfloop/v1/s1/d1/down/ack"
    assert c.checkout_ack_topic("s1", "d1") == "shelfloop/v1/s1/d1/down/checkout_ack"
    assert c.release_topic("model") == "shelfloop/v1/_fleet/release/model"
    assert c.release_topic("gallery", store_id="s1") == "shelfloop/v1/s1/release/gallery"
    assert c.release_topic("model", store_id="s1", device_id="d1") == "shelfloop/v1/s1/d1/down/release/model"
    assert c.uplink_topic_for(heartbeat()) == "shelfloop/v1/store-001/edge-01/up/heartbeat"
    assert (
        c.shared_ingest_subscription()
        == c.INGEST_SHARED_SUBSCRIPTION
        == "$share/ingest/shelfloop/v1/+/+/up/#"
    )
    assert c.shared_ingest_subscription("workers-2") == "$share/workers-2/shelfloop/v1/+/+/up/#"


ALL_TOPICS = [
    (c.uplink_topic("s1", "d1", "crop"), c.TopicInfo("s1", "d1", "up", "crop"), "crop", "device"),
    (
        c.uplink_topic("s1", "d1", "heartbeat"),
        c.TopicInfo("s1", "d1", "up", "heartbeat"),
        "heartbeat",
        "device",
    ),
    (
        c.uplink_topic("s1", "d1", "compliance_snapshot"),
        c.TopicInfo("s1", "d1", "up", "compliance"),
        "compliance_snapshot",
        "device",
    ),
    (
        c.uplink_topic("s1", "d1", "checkout_item"),
        c.TopicInfo("s1", "d1", "up", "checkout"),
        "checkout_item",
        "device",
    ),
    (c.ack_topic("s1", "d1"), c.TopicInfo("s1", "d1", "down", "ack"), "crop_ack", "device"),
    (
        c.checkout_ack_topic("s1", "d1"),
        c.TopicInfo("s1", "d1", "down", "checkout_ack"),
        "checkout_ack",
        "device",
    ),
    (
        c.release_topic("model", "s1", "d1"),
        c.TopicInfo("s1", "d1", "down", "release", "model"),
        "release_pointer",
        "device",
    ),
    (
        c.release_topic("gallery", "s1"),
        c.TopicInfo("s1", None, "down", "release", "gallery"),
        "release_pointer",
        "store",
    ),
    (
        c.release_topic("model"),
        c.TopicInfo(None, None, "down", "release", "model"),
        "release_pointer",
        "fleet",
    ),
]


@pytest.mark.parametrize(("topic", "info", "kind", "scope"), ALL_TOPICS)
def test_parse_topic_round_trip(topic: str, info: c.TopicInfo, kind: str, scope: str) -> None:
    parsed = c.parse_topic(topic)
    assert parsed == info
    assert parsed.kind == kind
    assert parsed.scope == scope


@settings(max_examples=100, deadline=None)
@given(store=ids, device=ids, kind=st.sampled_from(sorted(c.UPLINK_CHANNELS)))
def test_property_uplink_topic_round_trip(store: str, device: str, kind: str) -> None:
    info = c.parse_topic(c.uplink_topic(store, device, kind))
    assert (info.store_id, info.device_id, info.direction, info.kind) == (store, device, "up", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "shelfloop",
        "shelfloop/v1",
        "shelfloop/v2/s1/d1/up/crop",
        "other/v1/s1/d1/up/crop",
        "/shelfloop/v1/s1/d1/up/crop",
        "shelfloop/v1/s1/d1/up/crop/",
        "shelfloop/v1/s1/d1/up/selfie",
        "shelfloop/v1/s1/d1/up",
        "shelfloop/v1/s1/d1/down/nack",
        "shelfloop/v1/s1/d1/down/release/firmware",
        "shelfloop/v1/s1/release/firmware",
        "shelfloop/v1/s1//up/crop",
        "shelfloop/v1//d1/up/crop",
        "shelfloop/v1/+/d1/up/crop",
        "shelfloop/v1/s1/d1/up/#",
        "shelfloop/v1/_fleet/d1/up/crop",
        "shelfloop/v1/_fleet/d1/down/ack",
        "shelfloop/v1/_fleet/d1/down/checkout_ack",
        "shelfloop/v1/s1/d1/down/ack/checkout",
        "shelfloop/v1/../d1/up/crop",
        "shelfloop/v1/s1/d1/sideways/crop",
        "$SYS/broker/uptime",
        "$share/ingest/shelfloop/v1/s1/d1/up/crop",
    ],
)
def test_parse_topic_rejects_malformed_topics(topic: str) -> None:
    with pytest.raises(c.InvalidTopic) as excinfo:
        c.parse_topic(topic)
    assert excinfo.value.reason == "invalid_topic"


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "..", "a b", "$x"])
def test_topic_builders_reject_bad_identifiers(bad: str) -> None:
    with pytest.raises(c.InvalidTopic):
        c.uplink_topic(bad, "d1", "crop")
    with pytest.raises(c.InvalidTopic):
        c.uplink_topic("s1", bad, "crop")
    with pytest.raises(c.InvalidTopic):
        c.ack_topic("s1", bad)
    with pytest.raises(c.InvalidTopic):
        c.checkout_ack_topic(bad, "d1")
    with pytest.raises(c.InvalidTopic):
        c.release_topic("model", store_id=bad)
    with pytest.raises(c.InvalidTopic):
        c.device_subscriptions("s1", bad)
    with pytest.raises(c.InvalidTopic):
        c.device_acl(bad, "d1", "user")
    with pytest.raises(c.InvalidTopic):
        c.shared_ingest_subscription(bad)


def test_topic_builders_reject_bad_kinds_and_scopes() -> None:
    with pytest.raises(c.InvalidTopic):
        c.uplink_topic("s1", "d1", "crop_ack")
    with pytest.raises(c.InvalidTopic):
        c.uplink_topic("s1", "d1", "compliance")  # a channel, not a kind
    with pytest.raises(c.InvalidTopic):
        c.uplink_topic(c.FLEET, "d1", "crop")
    with pytest.raises(c.InvalidTopic):
        c.release_topic("firmware")
    with pytest.raises(c.InvalidTopic):
        c.release_topic("model", device_id="d1")  # a device needs its store


def test_check_topic_matches_accepts_the_right_topics() -> None:
    for msg in [crop(), heartbeat(), snapshot(), checkout()]:
        info = c.check_topic_matches(c.uplink_topic_for(msg), msg)
        assert (info.store_id, info.device_id) == (msg.store_id, msg.device_id)
    c.check_topic_matches(c.ack_topic("store-001", "edge-01"), ack())
    c.check_topic_matches(c.checkout_ack_topic("store-001", "till-03"), checkout_ack())
    for topic in [
        c.release_topic("model"),
        c.release_topic("model", "s1"),
        c.release_topic("model", "s1", "d1"),
    ]:
        c.check_topic_matches(topic, release())


@pytest.mark.parametrize(
    ("topic", "msg"),
    [
        ("shelfloop/v1/store-001/edge-02/up/crop", crop()),  # another device of the same store
        ("shelfloop/v1/store-002/edge-01/up/crop", crop()),  # same device name, another store
        ("shelfloop/v1/store-001/edge-01/up/heartbeat", crop()),  # wrong channel for the kind
        ("shelfloop/v1/store-001/edge-01/up/crop", heartbeat()),
        ("shelfloop/v1/store-001/till-03/up/compliance", checkout()),
        ("shelfloop/v1/store-001/edge-01/up/crop", ack()),  # an ack on an uplink
        ("shelfloop/v1/store-001/edge-01/down/ack", crop()),
        ("shelfloop/v1/_fleet/release/gallery", release()),  # model pointer on the gallery topic
        ("shelfloop/v1/store-001/edge-01/down/ack", release()),
        ("shelfloop/v1/store-001/edge-01/down/ack", checkout_ack()),  # one topic carries one kind
        ("shelfloop/v1/store-001/edge-01/down/checkout_ack", ack()),
        ("shelfloop/v1/store-001/edge-01/up/checkout", checkout_ack()),
    ],
)
def test_check_topic_matches_catches_mismatches(topic: str, msg: c.Message) -> None:
    with pytest.raises(c.TopicMismatch) as excinfo:
        c.check_topic_matches(topic, msg)
    assert excinfo.value.reason == "topic_mismatch"


def test_check_topic_matches_rejects_invalid_topics() -> None:
    with pytest.raises(c.InvalidTopic):
        c.check_topic_matches("shelfloop/v1/store-001/edge-01/up/#", crop())


def test_device_subscriptions_cover_exactly_its_downlink() -> None:
    subs = c.device_subscriptions("s1", "d1")
    assert subs == ["shelfloop/v1/s1/d1/down/#", "shelfloop/v1/s1/release/+", "shelfloop/v1/_fleet/release/+"]

    def received(topic: str) -> bool:
        return any(mqtt.topic_matches_sub(sub, topic) for sub in subs)

    for topic in [
        c.ack_topic("s1", "d1"),
        c.checkout_ack_topic("s1", "d1"),
        *[c.release_topic(a, "s1", "d1") for a in c.ARTIFACTS],
    ]:
        assert received(topic)
    for artifact in c.ARTIFACTS:
        assert received(c.release_topic(artifact, "s1")) and received(c.release_topic(artifact))
    for topic in [
        c.ack_topic("s1", "d2"),
        c.ack_topic("s2", "d1"),
        c.checkout_ack_topic("s1", "d2"),
        c.release_topic("model", "s2"),
        c.release_topic("model", "s1", "d2"),
        c.uplink_topic("s1", "d1", "crop"),
        c.uplink_topic("s1", "release", "crop"),  # a device named like the release level
    ]:
        assert not received(topic), topic


def _acl_rules(acl: str) -> tuple[str, list[tuple[str, str]]]:
    lines = acl.strip().splitlines()
    user = lines[0].split(" ", 1)
    assert user[0] == "user"
    rules = []
    for line in lines[1:]:
        word, access, pattern = line.split(" ")
        assert word == "topic" and access in ("read", "write")
        rules.append((access, pattern))
    return user[1], rules


def test_device_acl_allows_only_the_devices_own_topics() -> None:
    acl = c.device_acl("s1", "d1", "edge-user-1")
    assert acl.endswith("\n")
    user, rules = _acl_rules(acl)
    assert user == "edge-user-1"
    writable = [p for a, p in rules if a == "write"]
    readable = [p for a, p in rules if a == "read"]

    def allowed(patterns: list[str], topic: str) -> bool:
        return any(mqtt.topic_matches_sub(p, topic) for p in patterns)

    for kind in c.UPLINK_CHANNELS:
        assert allowed(writable, c.uplink_topic("s1", "d1", kind))
        assert not allowed(writable, c.uplink_topic("s1", "d2", kind))
        assert not allowed(writable, c.uplink_topic("s2", "d1", kind))
        assert not allowed(readable, c.uplink_topic("s1", "d2", kind))
    assert not allowed(writable, c.ack_topic("s1", "d1")) and not allowed(
        writable, c.release_topic("model", "s1")
    )
    assert not allowed(writable, "shelfloop/v1/s1/d1/up")  # "up/#" would also match its parent level
    assert not allowed(writable, "shelfloop/v1/s1/d1/up/crop/extra")
    assert allowed(readable, c.ack_topic("s1", "d1"))
    assert allowed(readable, c.checkout_ack_topic("s1", "d1"))
    assert not allowed(writable, c.checkout_ack_topic("s1", "d1"))
    assert not allowed(readable, c.checkout_ack_topic("s1", "d2"))
    assert not allowed(readable, c.ack_topic("s1", "d2"))
    assert not allowed(readable, c.ack_topic("s2", "d1"))
    for artifact in c.ARTIFACTS:
        assert allowed(readable, c.release_topic(artifact, "s1", "d1"))
        assert allowed(readable, c.release_topic(artifact, "s1"))
        assert allowed(readable, c.release_topic(artifact))
        assert not allowed(readable, c.release_topic(artifact, "s2"))
        assert not allowed(readable, c.release_topic(artifact, "s1", "d2"))
    # A device named like the "release" level must not expose its traffic to the rest of the store.
    assert not allowed(readable, c.uplink_topic("s1", "release", "crop"))
    assert not allowed(readable, c.ack_topic("s1", "release"))
    # Every pattern stays inside this device's store (or the fleet release level).
    assert all(p.startswith(("shelfloop/v1/s1/", "shelfloop/v1/_fleet/release/")) for _, p in rules)


@pytest.mark.parametrize("username", ["", "a b", "evil\ntopic readwrite #", "x" * 129, "tab\tname"])
def test_device_acl_refuses_usernames_that_could_inject_rules(username: str) -> None:
    with pytest.raises(ValueError):
        c.device_acl("s1", "d1", username)
    with pytest.raises(ValueError):
        c.cloud_acl(username)


def test_cloud_acl_reads_uplinks_and_writes_downlinks() -> None:
    user, rules = _acl_rules(c.cloud_acl("cloud"))
    assert user == "cloud"
    assert ("read", "shelfloop/v1/+/+/up/#") in rules
    writable = [p for a, p in rules if a == "write"]
    for topic in [
        c.ack_topic("s1", "d1"),
        c.checkout_ack_topic("s1", "d1"),
        c.release_topic("model"),
        c.release_topic("model", "s1", "d1"),
    ]:
        assert any(mqtt.topic_matches_sub(p, topic) for p in writable)
    assert not any(mqtt.topic_matches_sub(p, c.uplink_topic("s1", "d1", "crop")) for p in writable)


# --------------------------------------------------------------------------------------------------------
# Identifiers, time, imports
# --------------------------------------------------------------------------------------------------------


def test_new_crop_id_is_a_sortable_valid_crop_id() -> None:
    ids_made = [c.new_crop_id() for _ in range(5000)]
    assert len(set(ids_made)) == len(ids_made)
    assert ids_made == sorted(ids_made)  # strictly increasing within a process, even in one millisecond
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids_made)
    decoded = c.decode(c.encode(crop(crop_id=ids_made[0])))
    assert decoded.crop_id == ids_made[0]
    # The first 10 characters are the millisecond timestamp.
    ms = 0
    for ch in ids_made[-1][:10]:
        ms = ms * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(ch)
    assert abs(ms / 1000 - datetime.now(UTC).timestamp()) < 60
    assert c.new_id() > ids_made[-1]


def test_utc_now_is_timezone_aware() -> None:
    now = c.utc_now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)


def test_contract_imports_nothing_heavy() -> None:
    code = (
        "import sys, shelfloop.contract; "
        "heavy = [m for m in ('numpy', 'pydantic', 'paho', 'PIL', 'cv2') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
