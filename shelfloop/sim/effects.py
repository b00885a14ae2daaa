"""Camera and store-environment effects: lighting, perspective, blur, noise and JPEG.

Each one is a way real stores break models trained on clean images (see shared/seeds): warm and cold
lamps, window glare, dim fridges behind glass, hand-held or tilted cameras.
"""

from __future__ import annotations

import cv2
import numpy as np

LIGHTING = ("fluorescent", "warm", "cold", "window_glare", "dim_fridge")

_TINT = {
    "fluorescent": (1.0, 1.0, 1.0),
    "warm": (1.1, 0.98, 0.78),
    "cold": (0.84, 0.96, 1.12),
    "window_glare": (1.0, 1.0, 0.97),
    "dim_fridge": (0.8, 0.92, 1.12),
}


def apply_lighting(img: np.ndarray, lighting: str, rng: np.random.Generator) -> np.ndarray:
    """img: HxWx3 uint8 RGB. Returns the relit image as uint8."""
    h, w = img.shape[:2]
    f = img.astype(np.float32) / 255.0
    f *= np.array(_TINT[lighting], dtype=np.float32)[None, None, :]
    gain = {"dim_fridge": rng.uniform(0.45, 0.65), "warm": rng.uniform(0.85, 1.05)}.get(
        lighting, rng.uniform(0.9, 1.12)
    )
    f *= gain
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Uneven illumination: a broad soft gradient from the nearest lamp.
    lx, ly = rng.uniform(0, w), rng.uniform(-0.3 * h, 0.5 * h)
    dist = np.sqrt(((xx - lx) / w) ** 2 + ((yy - ly) / h) ** 2)
    f *= (1.12 - 0.35 * np.clip(dist, 0, 1.2))[..., None]
    if lighting == "window_glare":
        gx, gy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.05 * h, 0.6 * h)
        sx, sy = rng.uniform(0.08, 0.2) * w, rng.uniform(0.1, 0.3) * h
        blob = np.exp(-(((xx - gx) / sx) ** 2 + ((yy - gy) / sy) ** 2))
        f = f + rng.uniform(0.5, 0.9) * blob[..., None]
    if lighting == "dim_fridge":
        # Reflections on the glass door: soft diagonal streaks.
        for _ in range(int(rng.integers(2, 5))):
            x0 = rng.uniform(0, w)
            band = np.exp(-(((xx - x0 - 0.35 * yy) / rng.uniform(8, 30)) ** 2))
            f = f + rng.uniform(0.05, 0.15) * band[..., None]
    # Vignetting of a cheap wide lens.
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    f *= (1 - rng.uniform(0.1, 0.3) * r2 / 2)[..., None]
    return (np.clip(f, 0, 1) * 255).astype(np.uint8)


def fridge_door(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Door frame bars of a cooler: they hide parts of products, as in real cooler photos."""
    _h, w = img.shape[:2]
    out = img.copy()
    for x in sorted(rng.uniform(0.05, 0.95, int(rng.integers(1, 3))) * w):
        bw = int(rng.integers(max(6, w // 90), max(8, w // 45)))
        x0 = int(x) - bw // 2
        shade = np.linspace(70, 160, bw, dtype=np.float32)
        out[:, max(0, x0) : x0 + bw] = shade[None, : min(bw, w - max(0, x0)), None].astype(np.uint8)
    return out


def random_homography(w: int, h: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A camera that is not square to the shelf: jitter the corners by up to `strength` of the size."""
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(-strength, strength, (4, 2)) * np.float32([w, h])
    # Keystone: a camera mounted above or below shelf centre narrows the top or the bottom.
    k = rng.uniform(-strength, strength) * w
    dst = src + jitter.astype(np.float32) + np.float32([[k, 0], [-k, 0], [0, 0], [0, 0]])
    return cv2.getPerspectiveTransform(src, dst.astype(np.float32))


def warp(img: np.ndarray, hmat: np.ndarray, out_w: int, out_h: int, border=(40, 40, 40)) -> np.ndarray:
    return cv2.warpPerspective(
        img, hmat, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border
    )


def warp_boxes(boxes: np.ndarray, hmat: np.ndarray) -> np.ndarray:
    """Axis-aligned boxes (N,4 x1y1x2y2) through a homography, as the box around the warped corners."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    x1, y1, x2, y2 = boxes.T
    corners = np.stack(
        [np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x2, y2], 1), np.stack([x1, y2], 1)], 1
    ).astype(np.float32)
    warped = cv2.perspectiveTransform(corners.reshape(-1, 1, 2), hmat).reshape(-1, 4, 2)
    return np.concatenate([warped.min(1), warped.max(1)], 1)


def degrade(
    img: np.ndarray, rng: np.random.Generator, blur_p: float = 0.35, motion_p: float = 0.15
) -> np.ndarray:
    """Focus blur, motion blur and sensor noise."""
    out = img
    if rng.random() < blur_p:
        k = int(rng.choice([3, 5]))
        out = cv2.GaussianBlur(out, (k, k), rng.uniform(0.6, 1.6))
    if rng.random() < motion_p:
        n = int(rng.integers(5, 11))
        kern = np.zeros((n, n), np.float32)
        angle = rng.uniform(0, np.pi)
        c = (n - 1) / 2
        for t in np.linspace(-c, c, n * 2):
            kern[round(c + t * np.sin(angle)), round(c + t * np.cos(angle))] = 1
        out = cv2.filter2D(out, -1, kern / kern.sum())
    sigma = rng.uniform(1.5, 7.0)
    noise = rng.normal(0, sigma, out.shape).astype(np.float32)
    return np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def encode_jpeg(img_rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:  # pragma: no cover - OpenCV only fails here on an empty image
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
