"""A synthetic product catalogue that is hard the way real ones are.

SKUs come in brand families whose members differ only by a flavour word, a size or a small colour
accent; some SKUs carry packaging variants (promo, seasonal, redesign) that must map back to the
canonical SKU; and a pool of out-of-catalogue products stands in for new or foreign items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Form factor and physical size (width, height in mm) per category; sizes grow with the pack size.
CATEGORIES: dict[str, dict] = {
    "cereal": {"form": "box", "sizes": [("375 g", 180, 260), ("500 g", 195, 285), ("750 g", 215, 320)]},
    "pasta": {"form": "box", "sizes": [("500 g", 120, 215), ("1 kg", 140, 250)]},
    "juice": {"form": "carton", "sizes": [("1 L", 95, 240), ("1.5 L", 100, 285)]},
    "milk": {"form": "carton", "sizes": [("500 ml", 72, 180), ("1 L", 95, 240)]},
    "soda": {"form": "can", "sizes": [("330 ml", 66, 122), ("500 ml", 66, 168)]},
    "water": {"form": "bottle", "sizes": [("500 ml", 66, 205), ("1.5 L", 90, 310)]},
    "snacks": {"form": "pouch", "sizes": [("150 g", 150, 215), ("200 g", 170, 245)]},
    "coffee": {"form": "jar", "sizes": [("100 g", 80, 125), ("200 g", 92, 160)]},
    "yoghurt": {"form": "cup", "sizes": [("150 g", 75, 85), ("500 g", 110, 115)]},
}

FLAVOURS: dict[str, list[str]] = {
    "cereal": ["Honey", "Chocolate", "Original", "Berry", "Nut Crunch", "Cinnamon"],
    "pasta": ["Spaghetti", "Penne", "Fusilli", "Farfalle", "Rigatoni"],
    "juice": ["Orange", "Apple", "Multifruit", "Pineapple", "Grape", "Orange No Pulp"],
    "milk": ["Whole", "Semi Skimmed", "Skimmed", "Lactose Free", "Oat"],
    "soda": ["Cola", "Zero", "Lemon", "Orange", "Cherry", "Ginger"],
    "water": ["Still", "Sparkling", "Lemon", "Lightly Sparkling"],
    "snacks": ["Salted", "Paprika", "Sour Cream", "Cheese", "BBQ", "Salt & Vinegar"],
    "coffee": ["Classic", "Gold", "Decaf", "Espresso", "Mild"],
    "yoghurt": ["Natural", "Strawberry", "Vanilla", "Peach", "Blueberry", "Greek"],
}

# Accent colours that flavour words evoke (RGB); unlisted flavours draw a random accent.
FLAVOUR_ACCENTS: dict[str, tuple[int, int, int]] = {
    "Honey": (236, 170, 40),
    "Chocolate": (110, 60, 30),
    "Berry": (150, 30, 90),
    "Orange": (245, 130, 20),
    "Apple": (120, 190, 50),
    "Grape": (110, 40, 130),
    "Cola": (150, 20, 20),
    "Zero": (20, 20, 20),
    "Lemon": (245, 225, 40),
    "Cherry": (190, 20, 50),
    "Strawberry": (225, 40, 70),
    "Vanilla": (245, 230, 180),
    "Peach": (250, 170, 120),
    "Blueberry": (60, 70, 170),
    "Paprika": (210, 60, 30),
    "Cheese": (250, 200, 40),
    "Sparkling": (60, 150, 230),
    "Still": (90, 180, 230),
    "Gold": (200, 160, 60),
    "Decaf": (40, 120, 70),
    "Whole": (30, 80, 170),
    "Skimmed": (120, 170, 220),
    "Oat": (190, 160, 110),
}

SYLLABLES = [
    "nor",
    "vik",
    "sun",
    "bru",
    "ala",
    "mon",
    "tek",
    "ri",
    "ka",
    "lo",
    "vel",
    "sto",
    "mar",
    "len",
    "fi",
    "ora",
    "del",
    "qui",
    "zen",
    "pa",
    "tor",
    "ela",
    "gro",
    "bel",
    "ni",
    "sa",
    "lu",
    "ver",
]

PRODUCT_WORDS: dict[str, list[str]] = {
    "cereal": ["Crunchy Oats", "Corn Flakes", "Muesli", "Rice Pops", "Granola"],
    "pasta": ["Pasta di Grano", "Semola", "Bronze Cut"],
    "juice": ["Fresh Juice", "100% Juice", "Nectar"],
    "milk": ["Fresh Milk", "Farm Milk", "Dairy"],
    "soda": ["Fizz", "Soda", "Pop"],
    "water": ["Spring Water", "Mineral Water", "Aqua"],
    "snacks": ["Crisps", "Chips", "Kettle Chips"],
    "coffee": ["Instant Coffee", "Roast", "Coffee"],
    "yoghurt": ["Yoghurt", "Creamy", "Bio"],
}

VARIANT_KINDS = ["promo", "seasonal", "redesign"]


@dataclass(frozen=True)
class BrandStyle:
    """How a brand dresses its packs: shared by every SKU of a family, which is what makes them look alike."""

    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    text: tuple[int, int, int]
    layout: int  # which label layout the family uses (0..3)
    logo_shape: str  # "ellipse" | "banner" | "plain" | "circle"
    font: int  # index into the font list


@dataclass(frozen=True)
class PackagingVariant:
    """Another look of the same product (promo, seasonal, redesign): counts as its canonical SKU."""

    variant_id: str
    sku_id: str
    kind: str  # "standard" for the canonical look, else one of VARIANT_KINDS


@dataclass(frozen=True)
class Sku:
    sku_id: str
    gtin: str
    name: str
    brand: str
    product_line: str
    category: str
    form: str
    size: str
    flavour: str
    family: str
    width_mm: int
    height_mm: int
    price: float
    style: BrandStyle
    accent: tuple[int, int, int]
    variants: tuple[PackagingVariant, ...] = field(default=())
    in_catalogue: bool = True

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("style")
        d.pop("in_catalogue")
        d["variants"] = [{"variant_id": v.variant_id, "kind": v.kind} for v in self.variants]
        d["accent"] = list(self.accent)
        return d


@dataclass
class Catalogue:
    skus: list[Sku]
    novel: list[Sku]  # out-of-catalogue products: never listed in catalogue.json

    def by_id(self) -> dict[str, Sku]:
        return {s.sku_id: s for s in [*self.skus, *self.novel]}

    def families(self) -> dict[str, list[Sku]]:
        out: dict[str, list[Sku]] = {}
        for s in self.skus:
            out.setdefault(s.family, []).append(s)
        return out


def gtin13(body12: str) -> str:
    """GTIN-13 with its check digit, so catalogue imports that validate GTINs accept ours."""
    total = sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body12))
    return body12 + str((10 - total % 10) % 10)


def _slug(text: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def _brand_name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        n = int(rng.integers(2, 4))
        name = "".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), n)).capitalize()
        if 4 <= len(name) <= 10 and name not in taken:
            taken.add(name)
            return name


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))  # type: ignore[return-value]


def _style(rng: np.random.Generator, n_fonts: int) -> BrandStyle:
    primary = _colour(rng, 20, 240)
    secondary = _colour(rng, 0, 256)
    lum = 0.299 * primary[0] + 0.587 * primary[1] + 0.114 * primary[2]
    text = (25, 25, 25) if lum > 150 else (250, 250, 245)
    return BrandStyle(
        primary=primary,
        secondary=secondary,
        text=text,
        layout=int(rng.integers(0, 4)),
        logo_shape=str(rng.choice(["ellipse", "banner", "plain", "circle"])),
        font=int(rng.integers(0, max(1, n_fonts))),
    )


def _family_skus(
    rng: np.random.Generator,
    brand: str,
    category: str,
    style: BrandStyle,
    n: int,
    next_gtin: list[int],
    in_catalogue: bool,
) -> list[Sku]:
    spec = CATEGORIES[category]
    product = str(rng.choice(PRODUCT_WORDS[category]))
    flavours = list(FLAVOURS[category])
    rng.shuffle(flavours)
    sizes = spec["sizes"]
    combos = [(f, s) for f in flavours for s in sizes]
    # Prefer distinct flavours first, then the same flavour in another size: both are look-alikes.
    combos.sort(key=lambda c: (sizes.index(c[1]) > 0, flavours.index(c[0])))
    out = []
    for flavour, (size, w, h) in combos[:n]:
        accent = FLAVOUR_ACCENTS.get(flavour) or _colour(rng, 30, 230)
        sku_id = _slug(f"{brand}-{category}-{flavour}-{size.replace(' ', '')}")
        gtin = gtin13(f"{next_gtin[0]:012d}")
        next_gtin[0] += int(rng.integers(1, 50))
        base_price = {
            "cereal": 3.2,
            "pasta": 1.3,
            "juice": 2.1,
            "milk": 1.1,
            "soda": 0.9,
            "water": 0.7,
            "snacks": 1.8,
            "coffee": 5.5,
            "yoghurt": 1.0,
        }[category]
        price = round(base_price * (1 + 0.45 * sizes.index((size, w, h))) * float(rng.uniform(0.85, 1.3)), 2)
        out.append(
            Sku(
                sku_id=sku_id,
                gtin=gtin,
                name=f"{brand} {product} {flavour} {size}",
                brand=brand,
                product_line=product,
                category=category,
                form=spec["form"],
                size=size,
                flavour=flavour,
                family=_slug(f"{brand}-{category}"),
                width_mm=w,
                height_mm=h,
                price=price,
                style=style,
                accent=accent,
                in_catalogue=in_catalogue,
            )
        )
    return out


def make_catalogue(
    rng: np.random.Generator, n_skus: int, n_novel: int, n_fonts: int, variant_rate: float = 0.2
) -> Catalogue:
    """Build `n_skus` SKUs in look-alike families, plus `n_novel` products the catalogue does not know."""
    taken: set[str] = set()
    categories = list(CATEGORIES)
    next_gtin = [int(rng.integers(400_000_000_000, 499_000_000_000))]
    skus: list[Sku] = []
    cat_i = 0
    while len(skus) < n_skus:
        category = categories[cat_i % len(categories)]
        cat_i += 1
        brand = _brand_name(rng, taken)
        # Families of 2..6 members: the look-alike siblings a shelf camera must tell apart.
        n = min(int(rng.integers(2, 7)), n_skus - len(skus))
        skus.extend(_family_skus(rng, brand, category, _style(rng, n_fonts), n, next_gtin, True))
    # Packaging variants of some SKUs (promo flash, seasonal art, redesign) map to the canonical SKU.
    with_variants = []
    for s in skus:
        variants = [PackagingVariant(s.sku_id, s.sku_id, "standard")]
        if rng.random() < variant_rate:
            kind = str(rng.choice(VARIANT_KINDS))
            variants.append(PackagingVariant(f"{s.sku_id}~{kind}", s.sku_id, kind))
        with_variants.append(_replace_variants(s, tuple(variants)))
    novel: list[Sku] = []
    while len(novel) < n_novel:
        category = categories[int(rng.integers(0, len(categories)))]
        brand = _brand_name(rng, taken)
        fam = _family_skus(rng, brand, category, _style(rng, n_fonts), 1, next_gtin, False)
        novel.extend(_replace_variants(s, (PackagingVariant(s.sku_id, s.sku_id, "standard"),)) for s in fam)
    return Catalogue(skus=with_variants, novel=novel[:n_novel])


def _replace_variants(s: Sku, variants: tuple[PackagingVariant, ...]) -> Sku:
    d = {k: getattr(s, k) for k in s.__dataclass_fields__}
    d["variants"] = variants
    return Sku(**d)
