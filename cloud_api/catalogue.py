"""The SKU catalogue: canonical SKUs, packaging variants, reference images, CSV/JSON import and export.

Every change appends a `CatalogueEvent`: retraining and gallery builds read the events to know which classes
appeared, changed or went away since their last run. The JSON shape is the synthetic world's
``catalogue.json`` (``{"catalogue_version", "skus": [...]}``); fields without a column of their own
(product line, form, family, dimensions, price, ...) are kept in ``attributes`` and exported back flat.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from cloud_api import models as m
from cloud_api.storage import ObjectStore, sha256_hex

__all__ = [
    "SKU_STATUSES",
    "CatalogueError",
    "ImportReport",
    "add_reference_image",
    "add_variant",
    "create_pending_sku",
    "export_csv",
    "export_json",
    "gtin_valid",
    "import_csv",
    "import_json",
    "record_event",
    "sku_to_json",
    "upsert_sku",
]

SKU_STATUSES: Final = ("new", "active", "discontinued")
COLUMNS: Final = ("sku_id", "gtin", "name", "brand", "category", "size", "flavour", "status")
CSV_FIELDS: Final = (*COLUMNS, "variants", "attributes")
_ID_RE: Final = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,64}$")
_VARIANT_RE: Final = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.~:-]{1,64}$")  # the sim writes "{sku}~promo"
_MAX_TEXT: Final = {"name": 256, "brand": 128, "category": 128, "size": 64, "flavour": 128}


class CatalogueError(ValueError):
    """Input that cannot go into the catalogue; ``problems`` names each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def gtin_valid(gtin: str) -> bool:
    """GTIN-8/12/13/14 with a correct check digit."""
    if not (isinstance(gtin, str) and gtin.isdigit() and len(gtin) in (8, 12, 13, 14)):
        return False
    digits = [int(c) for c in gtin]
    total = sum(d * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits[:-1])))
    return (10 - total % 10) % 10 == digits[-1]


def record_event(s: Session, actor: str, action: str, sku_id: str | None, data: dict[str, Any]) -> None:
    s.add(m.CatalogueEvent(actor=actor, action=action, sku_id=sku_id, data=data))


@dataclass
class ImportReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    variants: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": len(self.created),
            "updated": len(self.updated),
            "unchanged": len(self.unchanged),
            "variants": self.variants,
        }


def _normalise(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Split one input record into column values, variants and problems."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return {}, [], [f"{where}: not an object"]
    rec = dict(raw)
    sku_id = rec.pop("sku_id", None)
    if not isinstance(sku_id, str) or not _ID_RE.match(sku_id):
        problems.append(f"{where}: sku_id must be 1-64 chars of [A-Za-z0-9_.-]")
    name = rec.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: name is required")
    values: dict[str, Any] = {"sku_id": sku_id, "name": name}
    gtin = rec.pop("gtin", None)
    if gtin in ("", None):
        gtin = None
    elif not gtin_valid(str(gtin)):
        problems.append(f"{where}: gtin {gtin!r} is not a valid GTIN (length or check digit)")
    values["gtin"] = str(gtin) if gtin is not None else None
    for key, limit in _MAX_TEXT.items():
        if key == "name":
            continue
        val = rec.pop(key, "") or ""
        if not isinstance(val, str | int | float):
            problems.append(f"{where}: {key} must be text")
            continue
        values[key] = str(val)[:limit]
    if isinstance(name, str) and len(name) > _MAX_TEXT["name"]:
        problems.append(f"{where}: name is longer than {_MAX_TEXT['name']}")
    status = rec.pop("status", "active") or "active"
    if status not in SKU_STATUSES:
        problems.append(f"{where}: status must be one of {', '.join(SKU_STATUSES)}")
    values["status"] = status
    variants_raw = rec.pop("variants", []) or []
    variants: list[dict[str, Any]] = []
    if not isinstance(variants_raw, list):
        problems.append(f"{where}: variants must be a list")
        variants_raw = []
    for j, v in enumerate(variants_raw):
        vid = v.get("variant_id") if isinstance(v, dict) else None
        if not isinstance(vid, str) or not _VARIANT_RE.match(vid):
            problems.append(f"{where}.variants[{j}]: variant_id must be 1-64 chars of [A-Za-z0-9_.~:-]")
            continue
        vgtin = v.get("gtin") or None
        if vgtin is not None and not gtin_valid(str(vgtin)):
            problems.append(f"{where}.variants[{j}]: gtin {vgtin!r} is not a valid GTIN")
        variants.append({"variant_id": vid, "kind": str(v.get("kind") or "standard")[:32], "gtin": vgtin})
    rec.pop("reference_images", None)  # export-only: images are added with their bytes, not by key
    extra = rec.pop("attributes", None)
    attributes = dict(extra) if isinstance(extra, dict) else {}
    attributes.update(rec)  # everything else: product_line, form, family, width_mm, price, accent, ...
    try:
        json.dumps(attributes)
    except (TypeError, ValueError):
        problems.append(f"{where}: attributes must be JSON values")
    values["attributes"] = attributes
    return values, variants, problems


def upsert_sku(
    s: Session, raw: dict[str, Any], *, actor: str, report: ImportReport | None = None, where: str = "sku"
) -> str:
    """Create or update one SKU (and its variants) from a catalogue record; records the event."""
    values, variants, problems = _normalise(raw, where)
    if problems:
        raise CatalogueError(problems)
    report = report if report is not None else ImportReport()
    sku_id = values["sku_id"]
    sku = s.get(m.Sku, sku_id)
    if values["gtin"] is not None:
        holder = s.scalar(sa.select(m.Sku.sku_id).where(m.Sku.gtin == values["gtin"]))
        if holder is not None and holder != sku_id:
            raise CatalogueError([f"{where}: gtin {values['gtin']} already belongs to {holder}"])
    if sku is None:
        sku = m.Sku(**values)
        s.add(sku)
        s.flush()
        record_event(s, actor, "create", sku_id, _public(values))
        report.created.append(sku_id)
    else:
        changes = {k: v for k, v in values.items() if getattr(sku, k) != v}
        if changes:
            before = {k: getattr(sku, k) for k in changes}
            for k, v in changes.items():
                setattr(sku, k, v)
            action = "status" if set(changes) == {"status"} else "update"
            record_event(s, actor, action, sku_id, {"before": _public(before), "after": _public(changes)})
            report.updated.append(sku_id)
        else:
            report.unchanged.append(sku_id)
    for v in variants:
        if add_variant(s, sku_id, v["variant_id"], v["kind"], v["gtin"], actor=actor):
            report.variants += 1
    return sku_id


def _public(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != "sku_id"}


def add_variant(
    s: Session, sku_id: str, variant_id: str, kind: str = "standard", gtin: str | None = None, *, actor: str
) -> bool:
    """Map a packaging variant to its canonical SKU; True if it was new or moved to another SKU."""
    existing = s.get(m.PackagingVariant, variant_id)
    if existing is not None and (existing.sku_id, existing.kind, existing.gtin) == (sku_id, kind, gtin):
        return False
    if existing is None:
        s.add(m.PackagingVariant(variant_id=variant_id, sku_id=sku_id, kind=kind, gtin=gtin))
        action, data = "variant_add", {"variant_id": variant_id, "kind": kind, "gtin": gtin}
    else:
        data = {"variant_id": variant_id, "from_sku": existing.sku_id, "kind": kind, "gtin": gtin}
        existing.sku_id, existing.kind, existing.gtin = sku_id, kind, gtin
        action = "variant_update"
    s.flush()
    record_event(s, actor, action, sku_id, data)
    return True


def add_reference_image(
    s: Session,
    store: ObjectStore,
    sku_id: str,
    jpeg: bytes,
    *,
    actor: str,
    variant_id: str | None = None,
    object_key: str | None = None,
) -> str:
    """Attach a reference image (content-addressed, stored once) to a SKU; returns its object key."""
    if s.get(m.Sku, sku_id) is None:
        raise CatalogueError([f"unknown sku_id {sku_id!r}"])
    digest = sha256_hex(jpeg)
    key = object_key or f"catalogue/{sku_id}/{digest}.jpg"
    if object_key is None:
        store.put_if_absent(key, jpeg, "image/jpeg")
    exists = s.scalar(
        sa.select(m.ReferenceImage.id).where(
            m.ReferenceImage.sku_id == sku_id, m.ReferenceImage.object_key == key
        )
    )
    if exists is None:
        s.add(m.ReferenceImage(sku_id=sku_id, variant_id=variant_id, object_key=key, sha256=digest))
        s.flush()
        record_event(s, actor, "image_add", sku_id, {"object_key": key, "variant_id": variant_id})
    return key


def create_pending_sku(s: Session, details: dict[str, Any], *, actor: str, crop: m.Crop) -> str:
    """A ``new`` SKU proposed by annotation, with the crop as its first reference image."""
    sku_id = str(details.get("sku_id") or f"new-{crop.crop_id}")
    if s.get(m.Sku, sku_id) is not None:
        return sku_id
    record = {k: v for k, v in details.items() if k in ("brand", "category", "size", "flavour", "gtin")}
    record |= {"sku_id": sku_id, "name": str(details.get("name") or f"New product from crop {crop.crop_id}")}
    record |= {"status": "new", "attributes": {"source_crop": crop.crop_id}}
    upsert_sku(s, record, actor=actor, where="new_sku")
    s.add(m.ReferenceImage(sku_id=sku_id, object_key=crop.object_key, sha256=crop.sha256))
    record_event(s, actor, "image_add", sku_id, {"object_key": crop.object_key, "crop_id": crop.crop_id})
    return sku_id


# ---------------------------------------------------------------------------------------------------------
# Import / export


def _records_from_json(data: Any) -> list[Any]:
    if isinstance(data, dict) and isinstance(data.get("skus"), list):
        return data["skus"]
    if isinstance(data, list):
        return data
    raise CatalogueError(['expected {"skus": [...]} or a list of SKU objects'])


def _import(s: Session, records: list[Any], actor: str) -> ImportReport:
    report = ImportReport()
    problems: list[str] = []
    for i, rec in enumerate(records):
        try:
            with s.begin_nested():
                upsert_sku(s, rec, actor=actor, report=report, where=f"skus[{i}]")
        except CatalogueError as exc:
            problems.extend(exc.problems)
    if problems:
        raise CatalogueError(problems[:100])
    if report.created or report.updated or report.variants:
        record_event(s, actor, "import", None, report.as_dict())
    return report


def import_json(s: Session, data: Any, *, actor: str) -> ImportReport:
    """Import a catalogue document; all or nothing (the caller's transaction rolls back on error)."""
    return _import(s, _records_from_json(data), actor)


def import_csv(s: Session, text: str, *, actor: str) -> ImportReport:
    """Import CSV with the columns of `export_csv` (variants as ``id:kind;id:kind``, attributes as JSON)."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "sku_id" not in reader.fieldnames or "name" not in reader.fieldnames:
        raise CatalogueError(["CSV needs a header with at least sku_id and name"])
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, row in enumerate(reader):
        rec: dict[str, Any] = {k: v for k, v in row.items() if k in COLUMNS and v not in (None, "")}
        rec.setdefault("sku_id", row.get("sku_id") or "")
        rec.setdefault("name", row.get("name") or "")
        if row.get("attributes"):
            try:
                rec["attributes"] = json.loads(row["attributes"])
            except json.JSONDecodeError:
                problems.append(f"row {i + 2}: attributes is not JSON")
        if row.get("variants"):
            rec["variants"] = [
                {"variant_id": part.partition(":")[0], "kind": part.partition(":")[2] or "standard"}
                for part in row["variants"].split(";")
                if part
            ]
        records.append(rec)
    if problems:
        raise CatalogueError(problems)
    return _import(s, records, actor)


def sku_to_json(sku: m.Sku) -> dict[str, Any]:
    """One SKU in the catalogue.json shape (attributes flat), plus status and reference image keys."""
    out: dict[str, Any] = dict(sku.attributes)
    out |= {c: getattr(sku, c) for c in COLUMNS}
    out["variants"] = [
        {"variant_id": v.variant_id, "kind": v.kind} | ({"gtin": v.gtin} if v.gtin else {})
        for v in sku.variants
    ]
    out["reference_images"] = [img.object_key for img in sku.images]
    return out


def _all_skus(s: Session) -> list[m.Sku]:
    stmt = (
        sa.select(m.Sku)
        .options(selectinload(m.Sku.variants), selectinload(m.Sku.images))
        .order_by(m.Sku.sku_id)
    )
    return list(s.scalars(stmt))


def export_json(s: Session) -> dict[str, Any]:
    return {"catalogue_version": "1", "skus": [sku_to_json(x) for x in _all_skus(s)]}


def export_csv(s: Session) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for sku in _all_skus(s):
        row: dict[str, Any] = {c: getattr(sku, c) or "" for c in COLUMNS}
        row["variants"] = ";".join(f"{v.variant_id}:{v.kind}" for v in sku.variants)
        row["attributes"] = json.dumps(sku.attributes, sort_keys=True)
        writer.writerow(row)
    return buf.getvalue()
