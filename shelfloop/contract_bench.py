"""`shelfloop bench contract`: what the wire format costs a device and the cloud per uncertain crop.

Baseline, measured in the same run on the same messages: JSON text with the JPEG in base64 (what most
MQTT pipelines send), encoded with the standard library and with no schema validation at all, so any
advantage shown by the contract is not bought by checking less.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from datetime import UTC, datetime

import cv2
import numpy as np

from shelfloop import contract


def _jpeg_of_size(target: int, seed: int = 0) -> bytes:
    """A real JPEG close to `target` bytes: textured noise at a quality picked by bisection."""
    rng = np.random.default_rng(seed)
    side = max(32, int((target / 0.6) ** 0.5))
    img = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (3, 3), 0)
    lo, hi, best = 5, 98, b""
    while lo <= hi:
        q = (lo + hi) // 2
        data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
        best = data
        if len(data) > target:
            hi = q - 1
        else:
            lo = q + 1
    return best


def _crop(jpeg: bytes) -> contract.UncertainCrop:
    return contract.UncertainCrop(
        crop_id=contract.new_crop_id(),
        store_id="store-001",
        device_id="edge-001",
        camera_id="cam-1",
        captured_at=datetime.now(UTC),
        source="shelf",
        model_version="det-1.0.0+rec-1.0.0",
        gallery_version="gallery-1",
        detector_confidence=0.41,
        box=contract.BoundingBox(x1=10, y1=20, x2=110, y2=220),
        frame_width=1280,
        frame_height=960,
        candidates=[contract.SkuCandidate(sku_id=f"sku-{i}", score=0.5 / (i + 1)) for i in range(5)],
        reasons=["low_margin", "novelty"],
        priority=60,
        margin=0.04,
        novelty=0.3,
        bay_id="bay-01",
        jpeg=jpeg,
    )


def _json_baseline_encode(msg: contract.UncertainCrop) -> bytes:
    d = {f: getattr(msg, f) for f in msg.__struct_fields__}
    d["kind"] = msg.kind
    d["captured_at"] = msg.captured_at.isoformat()
    d["box"] = {"x1": msg.box.x1, "y1": msg.box.y1, "x2": msg.box.x2, "y2": msg.box.y2}
    d["candidates"] = [{"sku_id": c.sku_id, "score": c.score} for c in msg.candidates]
    d["jpeg"] = base64.b64encode(msg.jpeg).decode()
    return json.dumps(d).encode()


def _json_baseline_decode(payload: bytes) -> dict:
    d = json.loads(payload)
    d["jpeg"] = base64.b64decode(d["jpeg"])
    contract.jpeg_dimensions(d["jpeg"])
    return d


def _time_per_op(fn, items, repeats: int = 5) -> list[float]:
    per_op = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        per_op.append((time.perf_counter() - t0) / len(items) * 1e6)
    return per_op


def run(n: int = 2000, crop_bytes: int = 30 * 1024) -> dict:
    jpeg = _jpeg_of_size(crop_bytes)
    msgs = [_crop(jpeg) for _ in range(n)]
    packed = [contract.encode(m) for m in msgs]
    texts = [_json_baseline_encode(m) for m in msgs]
    enc_c = statistics.median(_time_per_op(contract.encode, msgs))
    dec_c = statistics.median(_time_per_op(contract.decode, packed))
    enc_j = statistics.median(_time_per_op(_json_baseline_encode, msgs))
    dec_j = statistics.median(_time_per_op(_json_baseline_decode, texts))
    size_c, size_j = len(packed[0]), len(texts[0])
    figures = {
        "jpeg_bytes": len(jpeg),
        "messages": n,
        "contract": {"bytes": size_c, "encode_us": round(enc_c, 2), "decode_us": round(dec_c, 2)},
        "json_base64": {"bytes": size_j, "encode_us": round(enc_j, 2), "decode_us": round(dec_j, 2)},
        "size_ratio": round(size_c / size_j, 3),
        "encode_speedup": round(enc_j / enc_c, 2),
        "decode_speedup": round(dec_j / dec_c, 2),
    }
    lines = [
        f"uncertain crop with a {len(jpeg) / 1024:.1f} KiB JPEG, {n} messages, median of 5 passes",
        f"{'':22s}{'bytes':>10s}{'encode us':>12s}{'decode us':>12s}",
        f"{'contract (msgpack)':22s}{size_c:>10d}{enc_c:>12.1f}{dec_c:>12.1f}   (encode validates too)",
        f"{'baseline json+base64':22s}{size_j:>10d}{enc_j:>12.1f}{dec_j:>12.1f}   (no schema validation)",
        f"size ratio contract/baseline: {figures['size_ratio']:.3f}; "
        f"speed-up encode x{figures['encode_speedup']}, decode x{figures['decode_speedup']}",
    ]
    return {"figures": figures, "lines": lines}
