"""Request and response bodies. Constraints live here so bad input is a 422, never a 500 deeper down."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# 1-64 of [A-Za-z0-9_.-] but not "." or ".." (written without look-ahead: pydantic's regex engine has none).
ID_PATTERN = (
    r"^(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,62}|\.\.[A-Za-z0-9_.-]{1,62})$"
)
VARIANT_PATTERN = (
    r"^(?:[A-Za-z0-9_~:-][A-Za-z0-9_.~:-]{0,63}|\.[A-Za-z0-9_~:-][A-Za-z0-9_.~:-]{0,62}"
    r"|\.\.[A-Za-z0-9_.~:-]{1,62})$"
)
Ident = Annotated[str, StringConstraints(pattern=ID_PATTERN, min_length=1, max_length=64)]
VariantId = Annotated[str, StringConstraints(pattern=VARIANT_PATTERN)]
CropIdStr = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
Text = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00]*$")]
Secret = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]
Gtin = Annotated[str, StringConstraints(pattern=r"^[0-9]{8}$|^[0-9]{12,14}$")]
Scalar = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00]*$")] | int | float | bool | None
Details = Annotated[
    dict[Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")], Scalar], Field(max_length=20)
]
Role = Literal["annotator", "reviewer", "merchandiser", "admin"]
Outcome = Literal["sku", "new_sku", "not_a_product", "unreadable", "skip"]
ReviewOutcome = Literal["sku", "new_sku", "not_a_product", "unreadable"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(_In):
    username: Ident
    password: Secret


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime
    role: Role


class UserIn(_In):
    username: Ident
    password: Annotated[str, StringConstraints(min_length=8, max_length=256, pattern=r"^[^\x00]*$")]
    role: Role


class UserOut(BaseModel):
    id: int
    username: str
    role: str
    active: bool


class VariantIn(_In):
    variant_id: VariantId
    kind: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")] = "standard"
    gtin: Gtin | None = None


class SkuIn(_In):
    """A SKU record; ``attributes`` carries category-specific fields (product line, form, dimensions...)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]
    gtin: Gtin | None = None
    brand: Text = ""
    category: Text = ""
    size: Annotated[str, StringConstraints(max_length=64, pattern=r"^[^\x00]*$")] = ""
    flavour: Text = ""
    status: Literal["new", "active", "discontinued"] = "active"
    attributes: Annotated[
        dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,64}$")], Scalar], Field(max_length=64)
    ] = {}
    variants: Annotated[list[VariantIn], Field(max_length=64)] = []


class CatalogueDoc(BaseModel):
    """The synthetic world's catalogue.json shape (records are validated one by one on import)."""

    catalogue_version: str | None = None
    skus: Annotated[list[dict[str, Any]], Field(max_length=100_000)]


class ImportOut(BaseModel):
    created: int
    updated: int
    unchanged: int
    variants: int


class CatalogueEventOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    sku_id: str | None
    data: dict[str, Any]


class StoreIn(_In):
    store_id: Ident
    name: Text = ""


class StoreOut(BaseModel):
    store_id: str
    name: str


class DeviceIn(_In):
    store_id: Ident
    device_id: Ident


class DeviceOut(BaseModel):
    store_id: str
    device_id: str
    mqtt_username: str
    status: str
    last_seen_at: datetime | None


class DeviceCredentialsOut(BaseModel):
    """The password is shown once, here; only its hash is stored."""

    store_id: str
    device_id: str
    mqtt_username: str
    mqtt_password: str
    broker_reloaded: bool


class LeaseOut(BaseModel):
    task_id: int
    token: int
    expires_at: datetime
    crop_id: str
    image_url: str
    store_id: str
    device_id: str
    source: str
    width: int
    height: int
    priority: int
    suggestions: list[dict[str, Any]]


class TokenIn(_In):
    token: Annotated[int, Field(ge=1, le=2**62)]


class CompleteIn(_In):
    token: Annotated[int, Field(ge=1, le=2**62)]
    outcome: Outcome
    sku_id: Ident | None = None
    details: Details = {}


class ReviewIn(_In):
    outcome: ReviewOutcome
    sku_id: Ident | None = None
    details: Details = {}


class CompleteOut(BaseModel):
    task_id: int
    status: str
    label: str
    final_label: str | None
    created_sku: str | None


class GoldIn(_In):
    crop_id: CropIdStr
    outcome: ReviewOutcome
    sku_id: Ident | None = None


class AnnotationOut(BaseModel):
    annotator: str
    outcome: str
    sku_id: str | None
    label: str
    created_at: datetime


class ReviewTaskOut(BaseModel):
    task_id: int
    crop_id: str
    image_url: str
    suggestions: list[dict[str, Any]]
    annotations: list[AnnotationOut]


class DeadLetterOut(BaseModel):
    id: int
    reason: str
    detail: str
    topic: str
    payload_size: int
    payload_key: str | None
    crop_id: str | None
    received_at: datetime
    replayed_at: datetime | None
    replay_result: str | None


class ReplayOut(BaseModel):
    id: int
    status: str
    reason: str | None
    crop_id: str | None
    object_key: str | None


class CropOut(BaseModel):
    crop_id: str
    object_key: str
    store_id: str
    device_id: str
    camera_id: str
    captured_at: datetime
    received_at: datetime
    source: str
    width: int
    height: int
    priority: int
    reasons: list[str]
    candidates: list[dict[str, Any]]
    image_url: str
