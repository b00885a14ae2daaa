"""Packshots: studio renders of each SKU's packaging, front and back, per packaging variant.

The look-alike difficulty is made here: every member of a brand family shares colours, layout, logo and
font; only the flavour word, its accent colour and the size text change.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shelfloop.sim.catalogue import Sku

PX_PER_MM = 3.0  # packshot resolution; scenes scale down from here

_FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu")]
_FONT_FILES = [
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerifCondensed-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
]
_BODY_FONT = "DejaVuSansCondensed.ttf"


@lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """System DejaVu fonts when present; otherwise Pillow's own scalable font is used for everything."""
    found = []
    for name in _FONT_FILES:
        for d in _FONT_DIRS:
            if (d / name).exists():
                found.append(str(d / name))
                break
    return tuple(found)


@lru_cache(maxsize=512)
def _font(index: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    paths = font_paths()
    size = max(6, int(size))
    if index < 0:
        for d in _FONT_DIRS:
            if (d / _BODY_FONT).exists():
                return ImageFont.truetype(str(d / _BODY_FONT), size)
    if paths:
        return ImageFont.truetype(paths[index % len(paths)], size)
    return ImageFont.load_default(size=size)


def _fit_font(draw: ImageDraw.ImageDraw, text: str, index: int, max_w: float, max_h: float):
    size = max(6, int(max_h))
    while size > 6:
        f = _font(index, size)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
        if x1 - x0 <= max_w and y1 - y0 <= max_h:
            return f
        size = int(size * 0.9)
    return _font(index, 6)


def _text(draw, centre, text, index, max_w, max_h, fill, stroke=0, stroke_fill=None):
    f = _fit_font(draw, text, index, max_w, max_h)
    draw.text(centre, text, font=f, fill=fill, anchor="mm", stroke_width=stroke, stroke_fill=stroke_fill)


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (20, 20, 20) if lum > 140 else (250, 250, 250)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _silhouette(form: str, w: int, h: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The pack's outline as a mask, and the label rectangle inside it."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if form == "box":
        d.rectangle([0, 0, w - 1, h - 1], fill=255)
        label = (0, int(h * 0.04), w, h)
    elif form == "carton":
        top = int(h * 0.16)
        d.rectangle([0, top, w - 1, h - 1], fill=255)
        d.polygon([(0, top), (w * 0.5, top * 0.35), (w - 1, top)], fill=255)
        d.rectangle([int(w * 0.08), 0, int(w * 0.92), int(top * 0.38)], fill=255)
        label = (0, top, w, h)
    elif form == "can":
        r = int(w * 0.12)
        d.rounded_rectangle([0, 0, w - 1, h - 1], radius=r, fill=255)
        label = (0, int(h * 0.1), w, int(h * 0.9))
    elif form == "bottle":
        cap_w, neck_w = w * 0.36, w * 0.42
        d.rectangle([(w - cap_w) / 2, 0, (w + cap_w) / 2, h * 0.07], fill=255)
        d.rectangle([(w - neck_w) / 2, h * 0.07, (w + neck_w) / 2, h * 0.2], fill=255)
        d.polygon(
            [((w - neck_w) / 2, h * 0.2), ((w + neck_w) / 2, h * 0.2), (w - 1, h * 0.33), (0, h * 0.33)],
            fill=255,
        )
        d.rounded_rectangle([0, h * 0.3, w - 1, h - 1], radius=int(w * 0.12), fill=255)
        label = (0, int(h * 0.45), w, int(h * 0.8))
    elif form == "pouch":
        d.rounded_rectangle([0, int(h * 0.02), w - 1, h - 1], radius=int(w * 0.08), fill=255)
        label = (0, int(h * 0.1), w, h)
    elif form == "jar":
        d.rounded_rectangle([w * 0.06, 0, w * 0.94, h * 0.2], radius=int(w * 0.04), fill=255)
        d.rounded_rectangle([0, h * 0.17, w - 1, h - 1], radius=int(w * 0.14), fill=255)
        label = (0, int(h * 0.36), w, int(h * 0.88))
    elif form == "cup":
        d.polygon([(0, 0), (w - 1, 0), (w * 0.88, h - 1), (w * 0.12, h - 1)], fill=255)
        label = (int(w * 0.06), int(h * 0.12), int(w * 0.94), int(h * 0.92))
    else:  # pragma: no cover - categories are fixed in catalogue.py
        raise ValueError(f"unknown form {form!r}")
    return m, label


def _shading(form: str, w: int, h: int) -> np.ndarray:
    """Per-pixel light factor: cylinders get a curved profile with a specular stripe, boxes a soft edge."""
    x = (np.arange(w, dtype=np.float32) + 0.5) / w
    if form in ("can", "bottle", "jar", "cup"):
        prof = 0.6 + 0.4 * np.sin(np.pi * x) + 0.35 * np.exp(-(((x - 0.3) / 0.05) ** 2))
    elif form == "pouch":
        prof = 0.8 + 0.2 * np.sin(np.pi * x) + 0.12 * np.exp(-(((x - 0.4) / 0.12) ** 2))
    else:
        prof = 1.0 - 0.18 * np.clip(1 - x / 0.06, 0, 1) - 0.25 * np.clip((x - 0.92) / 0.08, 0, 1)
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    vert = 1.0 - 0.08 * y
    return np.clip(prof[None, :] * vert[:, None], 0.0, 1.6)


def _starburst(draw, cx, cy, r, fill):
    pts = []
    for k in range(24):
        rr = r if k % 2 == 0 else r * 0.78
        a = math.pi * 2 * k / 24
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    draw.polygon(pts, fill=fill)


def _illustration(draw, box, accent, secondary, rng: np.random.Generator, form: str):
    """A hero image per flavour: fruit-like blobs in the accent colour with a highlight and a leaf."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if bw < 8 or bh < 8:
        return
    if form in ("can", "bottle"):
        # Wave stripes: the typical drinks label.
        for k in range(3):
            off = bh * (0.25 + 0.25 * k)
            pts = [
                (x0 + bw * t / 20, y0 + off + bh * 0.08 * math.sin(t / 20 * math.tau + k)) for t in range(21)
            ]
            draw.line(pts, fill=_mix(accent, (255, 255, 255), 0.25 * k), width=max(2, int(bh * 0.07)))
        return
    n = int(rng.integers(2, 5))
    for _ in range(n):
        r = bh * float(rng.uniform(0.18, 0.32))
        cx = x0 + bw * float(rng.uniform(0.25, 0.75))
        cy = y0 + bh * float(rng.uniform(0.45, 0.7))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_mix(accent, (0, 0, 0), 0.15))
        draw.ellipse(
            [cx - r * 0.55, cy - r * 0.6, cx - r * 0.1, cy - r * 0.2], fill=_mix(accent, (255, 255, 255), 0.5)
        )
    lx, ly = x0 + bw * 0.6, y0 + bh * 0.2
    draw.ellipse([lx, ly, lx + bw * 0.2, ly + bh * 0.16], fill=_mix(secondary, (40, 140, 40), 0.7))


def render_packshot(sku: Sku, variant_kind: str = "standard", view: str = "front") -> Image.Image:
    """RGBA studio image of one pack; deterministic per (SKU, variant, view)."""
    return _render_cached(sku, variant_kind, view).copy()


@lru_cache(maxsize=1024)
def _render_cached(sku: Sku, variant_kind: str, view: str) -> Image.Image:
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(f"{sku.family}|{variant_kind}")) % (2**32)
    rng = np.random.default_rng(seed)  # same seed for the whole family: siblings share the artwork
    w, h = int(sku.width_mm * PX_PER_MM), int(sku.height_mm * PX_PER_MM)
    st = sku.style
    primary, secondary = st.primary, st.secondary
    layout = st.layout
    if variant_kind == "redesign":
        primary, secondary = _mix(secondary, (255, 255, 255), 0.15), primary
        layout = (layout + 2) % 4
    elif variant_kind == "seasonal":
        primary = _mix(primary, (200, 30, 40), 0.45)
    mask, (lx0, ly0, lx1, ly1) = _silhouette(sku.form, w, h)
    img = Image.new("RGB", (w, h), primary)
    d = ImageDraw.Draw(img)
    text_col = _contrast(primary)

    # Form-specific body outside the label: caps, lids, glass, metal rims.
    if sku.form == "bottle":
        liquid = _mix(sku.accent, (200, 230, 245), 0.6) if sku.category == "water" else sku.accent
        d.rectangle([0, 0, w, h], fill=liquid)
        d.rectangle([0, 0, w, int(h * 0.07)], fill=secondary)
        for k in range(6):
            xx = int(w * (0.34 + 0.05 * k))
            d.line([(xx, 0), (xx, int(h * 0.07))], fill=_mix(secondary, (0, 0, 0), 0.3), width=2)
    elif sku.form == "can":
        metal = (190, 192, 196)
        d.rectangle([0, 0, w, int(h * 0.1)], fill=metal)
        d.rectangle([0, int(h * 0.9), w, h], fill=metal)
    elif sku.form == "jar":
        d.rectangle([0, 0, w, h], fill=(60, 35, 20) if sku.category == "coffee" else (230, 220, 200))
        d.rectangle([0, 0, w, int(h * 0.2)], fill=secondary)
        for k in range(1, 6):
            yy = int(h * 0.2 * k / 6)
            d.line([(0, yy), (w, yy)], fill=_mix(secondary, (0, 0, 0), 0.25), width=2)
    elif sku.form == "carton":
        d.rectangle([0, 0, w, int(h * 0.16)], fill=_mix(primary, (255, 255, 255), 0.55))
    elif sku.form == "cup":
        d.rectangle([0, 0, w, int(h * 0.1)], fill=(225, 225, 230))
    elif sku.form == "pouch":
        for k in range(int(w / 10)):
            d.line(
                [(k * 10, int(h * 0.02)), (k * 10 + 5, int(h * 0.07))],
                fill=_mix(primary, (0, 0, 0), 0.3),
                width=2,
            )

    lw, lh = lx1 - lx0, ly1 - ly0
    d.rectangle([lx0, ly0, lx1, ly1], fill=primary)
    if view == "back":
        _back_label(d, sku, (lx0, ly0, lx1, ly1), primary, text_col)
    else:
        _front_label(d, sku, (lx0, ly0, lx1, ly1), primary, secondary, text_col, layout, rng)
        if variant_kind == "promo":
            r = min(lw, lh) * 0.2
            _starburst(d, lx1 - r * 1.05, ly0 + r * 1.1, r, (250, 215, 0))
            _text(d, (lx1 - r * 1.05, ly0 + r * 1.1), "+20%", 0, r * 1.3, r * 0.6, (200, 0, 0))
        elif variant_kind == "seasonal":
            for _ in range(40):
                sx, sy = float(rng.uniform(lx0, lx1)), float(rng.uniform(ly0, ly1))
                s = lw * 0.012
                d.ellipse([sx - s, sy - s, sx + s, sy + s], fill=(255, 255, 255))
            _text(
                d, (lx0 + lw / 2, ly1 - lh * 0.05), "LIMITED EDITION", 0, lw * 0.8, lh * 0.05, (255, 255, 255)
            )

    arr = np.asarray(img, dtype=np.float32) * _shading(sku.form, w, h)[..., None]
    rgba = np.dstack([np.clip(arr, 0, 255).astype(np.uint8), np.asarray(mask)])
    return Image.fromarray(rgba, "RGBA")


def _front_label(d, sku: Sku, box, primary, secondary, text_col, layout: int, rng) -> None:
    x0, y0, x1, y1 = box
    lw, lh = x1 - x0, y1 - y0
    st = sku.style
    cx = x0 + lw / 2
    # Row positions (fractions of the label height) by layout: logo, product, flavour band, art, size.
    rows = [
        (0.12, 0.3, 0.45, (0.55, 0.92), 0.94),
        (0.62, 0.78, 0.12, (0.22, 0.55), 0.94),
        (0.15, 0.86, 0.32, (0.42, 0.8), 0.06),
        (0.85, 0.12, 0.26, (0.36, 0.72), 0.95),
    ][layout % 4]
    logo_y, prod_y, band_y, (art0, art1), size_y = (y0 + lh * r if isinstance(r, float) else r for r in rows)
    if sku.form == "box":
        d.rectangle([x0, y0, x1, y0 + lh * 0.05], fill=secondary)
    _illustration(
        d,
        (x0 + lw * 0.05, y0 + lh * art0, x1 - lw * 0.05, y0 + lh * art1),
        sku.accent,
        secondary,
        rng,
        sku.form,
    )
    # Brand logo: identical on every sibling.
    lh_logo = lh * 0.13
    if st.logo_shape == "ellipse":
        d.ellipse(
            [x0 + lw * 0.08, logo_y - lh_logo * 0.75, x1 - lw * 0.08, logo_y + lh_logo * 0.75],
            fill=secondary,
            outline=text_col,
            width=max(1, int(lw * 0.012)),
        )
        _text(d, (cx, logo_y), sku.brand, st.font, lw * 0.7, lh_logo, _contrast(secondary))
    elif st.logo_shape == "banner":
        d.polygon(
            [
                (x0, logo_y - lh_logo * 0.6),
                (x1, logo_y - lh_logo * 0.75),
                (x1, logo_y + lh_logo * 0.55),
                (x0, logo_y + lh_logo * 0.7),
            ],
            fill=secondary,
        )
        _text(d, (cx, logo_y), sku.brand.upper(), st.font, lw * 0.85, lh_logo * 0.9, _contrast(secondary))
    elif st.logo_shape == "circle":
        r = min(lw * 0.3, lh_logo * 1.1)
        d.ellipse([cx - r, logo_y - r, cx + r, logo_y + r], fill=secondary, outline=text_col, width=2)
        _text(d, (cx, logo_y), sku.brand[0], st.font, r * 1.3, r * 1.3, _contrast(secondary))
        _text(d, (cx, logo_y + r * 1.25), sku.brand, st.font, lw * 0.8, lh * 0.045, text_col)
    else:
        _text(
            d,
            (cx, logo_y),
            sku.brand,
            st.font,
            lw * 0.9,
            lh_logo * 1.1,
            text_col,
            stroke=max(1, int(lw * 0.008)),
            stroke_fill=secondary,
        )
    _text(d, (cx, prod_y), sku.product_line, st.font, lw * 0.85, lh * 0.07, text_col)
    # The flavour band: the small accent that separates siblings.
    bh = lh * 0.075
    d.rounded_rectangle(
        [x0 + lw * 0.1, band_y - bh / 2, x1 - lw * 0.1, band_y + bh / 2], radius=int(bh / 3), fill=sku.accent
    )
    _text(d, (cx, band_y), sku.flavour, -1, lw * 0.72, bh * 0.8, _contrast(sku.accent))
    _text(d, (x1 - lw * 0.2, size_y), sku.size, -1, lw * 0.3, lh * 0.045, text_col)


def _back_label(d, sku: Sku, box, primary, text_col) -> None:
    """Back of pack: ingredients, nutrition table and a barcode; what a checkout camera often sees."""
    x0, y0, x1, y1 = box
    lw, lh = x1 - x0, y1 - y0
    _text(d, (x0 + lw / 2, y0 + lh * 0.08), sku.brand, sku.style.font, lw * 0.6, lh * 0.07, text_col)
    panel = [x0 + lw * 0.08, y0 + lh * 0.16, x1 - lw * 0.08, y0 + lh * 0.62]
    d.rectangle(panel, fill=(248, 248, 244))
    rows = 7
    for k in range(rows):
        yy = panel[1] + (panel[3] - panel[1]) * (k + 0.5) / rows
        d.line([(panel[0] + 4, yy + 6), (panel[2] - 4, yy + 6)], fill=(120, 120, 120), width=1)
        tw = (panel[2] - panel[0]) * (0.35 + 0.1 * ((k * 7) % 4))
        d.line([(panel[0] + 6, yy), (panel[0] + 6 + tw, yy)], fill=(60, 60, 60), width=max(1, int(lh * 0.01)))
    # EAN-like barcode from the GTIN digits.
    bx0, by0, bx1, by1 = x0 + lw * 0.2, y0 + lh * 0.7, x1 - lw * 0.2, y0 + lh * 0.92
    d.rectangle([bx0 - 4, by0 - 4, bx1 + 4, by1 + 4], fill=(255, 255, 255))
    bits = "".join(format((int(c) * 37 + i) % 128, "07b") for i, c in enumerate(sku.gtin))
    bw = (bx1 - bx0) / len(bits)
    for i, b in enumerate(bits):
        if b == "1":
            d.rectangle([bx0 + i * bw, by0, bx0 + (i + 1) * bw, by1 - lh * 0.03], fill=(0, 0, 0))
    _text(d, ((bx0 + bx1) / 2, by1 - lh * 0.012), sku.gtin, -1, bx1 - bx0, lh * 0.025, (0, 0, 0))
