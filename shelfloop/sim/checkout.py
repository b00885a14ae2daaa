"""Checkout scenes: products at close range on a counter, at any angle, often in a hand.

Here a wrong SKU is a billing error, so the scenes carry what makes checkout hard: arbitrary rotation,
the back of the pack, hand occlusion, several items at once and products the catalogue does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from shelfloop.sim import effects
from shelfloop.sim.catalogue import Catalogue, Sku
from shelfloop.sim.packshot import render_packshot

CHECKOUT_W, CHECKOUT_H = 960, 720
SKIN_TONES = [(241, 194, 160), (224, 172, 130), (198, 134, 94), (141, 85, 54), (92, 58, 38)]


@dataclass
class CheckoutItem:
    sku: Sku
    variant: str
    view: str  # "front" | "back"
    box: tuple[float, float, float, float]
    in_catalogue: bool
    occlusion: float = 0.0


def _counter(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # conveyor belt: dark rubber with ribs
        base = np.full((h, w, 3), rng.uniform(35, 60), np.float32)
        base += (6 * np.sin(yy / rng.uniform(3, 6)))[..., None]
    elif kind == 1:  # wooden counter
        tone = np.array([150, 105, 65], np.float32) * rng.uniform(0.8, 1.15)
        grain = 12 * np.sin(xx / 7 + 3 * np.sin(yy / 60)) + 6 * np.sin(xx / 2.3)
        base = tone[None, None, :] + grain[..., None]
    else:  # brushed steel scanning tray
        base = np.full((h, w, 3), rng.uniform(150, 190), np.float32)
        base += (rng.normal(0, 6, (1, w)) * np.ones((h, 1)))[..., None]
    base += rng.normal(0, 3, base.shape).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


def _hand(rng: np.random.Generator, size: float) -> Image.Image:
    """A hand seen from above: palm, four fingers and a thumb, shaded."""
    s = int(size)
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    tone = SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))]
    dark = tuple(int(c * 0.8) for c in tone)
    d.ellipse([s * 0.25, s * 0.45, s * 0.75, s * 0.95], fill=(*tone, 255))
    for k in range(4):
        x = s * (0.3 + 0.12 * k)
        length = s * (0.32 + 0.06 * (1 - abs(k - 1.5) / 1.5))
        d.line(
            [(x, s * 0.58), (x + s * 0.01 * (k - 1.5), s * 0.58 - length)],
            fill=(*tone, 255),
            width=int(s * 0.09),
        )
        d.ellipse(
            [x - s * 0.045, s * 0.58 - length - s * 0.045, x + s * 0.045, s * 0.58 - length + s * 0.045],
            fill=(*tone, 255),
        )
        d.line(
            [(x, s * 0.5 - length * 0.55), (x + s * 0.03, s * 0.5 - length * 0.55)],
            fill=(*dark, 255),
            width=2,
        )
    d.line([(s * 0.28, s * 0.75), (s * 0.08, s * 0.5)], fill=(*tone, 255), width=int(s * 0.11))
    d.rectangle([s * 0.32, s * 0.9, s * 0.68, s], fill=(*tone, 255))
    return img.filter(ImageFilter.GaussianBlur(1.2))


def render_checkout(rng: np.random.Generator, catalogue: Catalogue, unknown_rate: float) -> dict:
    """One checkout frame with 1-4 items. Returns the RGB image and per-item labels in pixels."""
    w, h = CHECKOUT_W, CHECKOUT_H
    canvas = Image.fromarray(_counter(rng, w, h)).convert("RGBA")
    items: list[CheckoutItem] = []
    masks: list[np.ndarray] = []
    areas: list[int] = []  # in-frame pixels of each item before anything covered it
    n = int(rng.choice([1, 1, 2, 2, 3, 4]))
    for _ in range(n):
        novel = bool(catalogue.novel) and rng.random() < unknown_rate
        pool = catalogue.novel if novel else catalogue.skus
        sku = pool[int(rng.integers(0, len(pool)))]
        kinds = [v.kind for v in sku.variants]
        variant = str(rng.choice(kinds)) if len(kinds) > 1 and rng.random() < 0.4 else "standard"
        view = "back" if rng.random() < 0.25 else "front"
        target_h = h * float(rng.uniform(0.3, 0.62)) * (sku.height_mm / 250) ** 0.5
        sprite = render_packshot(sku, variant, view)
        scale = target_h / sprite.height
        sprite = sprite.resize(
            (max(8, int(sprite.width * scale)), max(8, int(sprite.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=2.0,
        )
        sprite = sprite.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR, expand=True)
        alpha = np.asarray(sprite.getchannel("A")) > 16
        ys, xs = np.nonzero(alpha)
        for _attempt in range(25):  # keep items apart enough that each stays recognisable
            px = int(rng.integers(-sprite.width // 6, max(1, w - sprite.width * 5 // 6)))
            py = int(rng.integers(-sprite.height // 6, max(1, h - sprite.height * 5 // 6)))
            m = np.zeros((h, w), bool)
            _paste_mask(m, alpha, px, py)
            if not m.any():
                continue
            if all((m & o).sum() < 0.25 * min(m.sum(), o.sum()) for o in masks):
                break
        shadow = sprite.getchannel("A").filter(ImageFilter.GaussianBlur(6)).point(lambda a: int(a * 0.45))
        canvas.paste((0, 0, 0, 255), (px + 8, py + 10), shadow)
        canvas.alpha_composite(sprite, (max(0, px), max(0, py)), (max(0, -px), max(0, -py)))
        # A later item lying over an earlier one hides part of it.
        for o in masks:
            o &= ~m
        masks.append(m)
        areas.append(int(m.sum()))
        box = (px + xs.min(), py + ys.min(), px + xs.max() + 1, py + ys.max() + 1)
        items.append(CheckoutItem(sku, variant, view, tuple(float(v) for v in box), not novel))
    if items and rng.random() < 0.55:  # a hand holding one of the items
        k = int(rng.integers(0, len(items)))
        b = items[k].box
        size = float(rng.uniform(0.45, 0.75)) * max(b[2] - b[0], b[3] - b[1])
        hand = _hand(rng, size).rotate(float(rng.uniform(0, 360)), expand=True)
        hx = int(rng.uniform(b[0] - size * 0.4, b[2] - size * 0.4))
        hy = int(rng.uniform(b[1] - size * 0.4, b[3] - size * 0.4))
        hm = np.zeros((h, w), bool)
        _paste_mask(hm, np.asarray(hand.getchannel("A")) > 64, hx, hy)
        canvas.alpha_composite(hand, (max(0, hx), max(0, hy)), (max(0, -hx), max(0, -hy)))
        for o in masks:
            o &= ~hm
    rgb = np.asarray(canvas.convert("RGB"))
    lighting = str(rng.choice(["fluorescent", "warm", "cold", "window_glare"], p=[0.4, 0.25, 0.25, 0.1]))
    rgb = effects.apply_lighting(rgb, lighting, rng)
    rgb = effects.degrade(rgb, rng, blur_p=0.3, motion_p=0.3)
    for item, m, area in zip(items, masks, areas, strict=True):
        x1, y1, x2, y2 = item.box
        item.occlusion = float(np.clip(1 - m.sum() / max(1, area), 0, 1))
        item.box = (max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2))
    return {"image": rgb, "lighting": lighting, "items": items}


def _paste_mask(dst: np.ndarray, src: np.ndarray, x: int, y: int) -> None:
    h, w = dst.shape
    sh, sw = src.shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + sw), min(h, y + sh)
    if x1 <= x0 or y1 <= y0:
        return
    dst[y0:y1, x0:x1] |= src[y0 - y : y1 - y, x0 - x : x1 - x]
