"""The part of the SKU catalogue that compliance needs, read from the catalogue JSON both sides share
(the cloud's `/catalogue` export and a synthetic world's `catalogue.json` have the same shape).

Compliance needs three things from it: which SKU ids exist (a planogram naming another is an error), which
packaging variants count as which canonical SKU, and brand, category and pack dimensions per SKU (share
of shelf, and telling size variants apart on the shelf).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planograms.metrics import SkuInfo
from planograms.schema import PlanogramError


@dataclass(frozen=True)
class CatalogueView:
    known_skus: list[str]
    variants: dict[str, str]  # packaging variant id -> canonical SKU id
    info: dict[str, SkuInfo]

    @classmethod
    def from_json(cls, doc: Any, source: str = "catalogue") -> CatalogueView:
        skus = doc.get("skus") if isinstance(doc, dict) else None
        if not isinstance(skus, list):
            raise PlanogramError([f"{source}: expected an object with a list under 'skus'"])
        errors: list[str] = []
        known: list[str] = []
        variants: dict[str, str] = {}
        info: dict[str, SkuInfo] = {}
        for n, s in enumerate(skus):
            if not isinstance(s, dict) or not isinstance(s.get("sku_id"), str):
                errors.append(f"{source}: skus[{n}] has no 'sku_id'")
                continue
            sku = s["sku_id"]
            known.append(sku)
            for v in s.get("variants") or []:
                if isinstance(v, dict) and isinstance(v.get("variant_id"), str):
                    variants[v["variant_id"]] = sku
            width, height = s.get("width_mm"), s.get("height_mm")
            sized = all(isinstance(x, int | float) and x > 0 for x in (width, height))
            info[sku] = SkuInfo(
                brand=str(s.get("brand") or "unknown"),
                category=str(s.get("category") or "unknown"),
                width_mm=float(width) if sized else None,
                height_mm=float(height) if sized else None,
            )
        if errors:
            raise PlanogramError(errors)
        return cls(known, variants, info)

    @classmethod
    def load(cls, path: str | Path) -> CatalogueView:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise PlanogramError([f"{path}: cannot read the catalogue ({exc.strerror or exc})"]) from exc
        except ValueError as exc:
            raise PlanogramError([f"{path}: not valid JSON ({exc})"]) from exc
        return cls.from_json(doc, str(path))
