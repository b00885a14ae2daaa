"""Typed settings: defaults < config file (YAML or TOML) < environment (SHELFLOOP_SECTION__KEY).

Validated once at start; a bad file fails with every bad key named, never halfway through a run.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "SHELFLOOP_CONFIG"
_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    keepalive_s: int = Field(30, ge=5, le=3600)
    max_message_bytes: int = Field(1_048_576, ge=1024)


class StorageSettings(_Section):
    """Object storage: a local directory (embedded default) or any S3 server through the minio client."""

    backend: Literal["local", "s3"] = "local"
    local_dir: Path = Path("var/objects")
    endpoint: str = "127.0.0.1:9000"
    access_key: str | None = None
    secret_key: SecretStr | None = None
    bucket: str = "shelfloop"
    secure: bool = False
    region: str | None = None


class DatabaseSettings(_Section):
    """SQLite is the embedded default; PostgreSQL (postgresql+psycopg://...) in production."""

    url: str = "sqlite:///var/shelfloop.db"


class CameraSettings(_Section):
    camera_id: str = Field(pattern=_ID)
    source: str  # RTSP URL, USB index ("0"), video file or image folder
    role: Literal["shelf", "checkout"]
    bay_id: str | None = Field(None, pattern=_ID)
    interval_s: float = Field(5.0, gt=0)


class EdgeOutboxSettings(_Section):
    """Bounds of the on-device crop store (drop policy when full: lowest priority, then oldest)."""

    max_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_count: int = Field(50_000, ge=1)
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0)


class EdgeUplinkSettings(_Section):
    """How crops are sent: the window awaiting the cloud's ack, and resend back-off."""

    max_inflight: int = Field(32, ge=1, le=1000)
    ack_timeout_s: float = Field(10.0, gt=0)
    max_backoff_s: float = Field(300.0, gt=0)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, le=2**32 - 1)
    drain_on_stop_s: float = Field(5.0, ge=0)


class EdgeRoutingSettings(_Section):
    """Which crops go to annotation: thresholds, quotas per device and de-duplication."""

    detector_band: tuple[float, float] = (0.25, 0.5)
    min_margin: float = Field(0.10, ge=0, le=1)
    min_probability: float = Field(0.60, ge=0, le=1)
    novelty_threshold: float = Field(0.35, ge=0)
    min_track_agreement: float = Field(0.60, ge=0, le=1)
    audit_rate: float = Field(0.0, ge=0, le=1)
    per_minute: int = Field(10, ge=0)
    per_hour: int = Field(100, ge=0)
    per_day: int = Field(1000, ge=0)
    dedup_similarity: float = Field(0.95, ge=-1, le=1)
    dedup_iou: float = Field(0.5, ge=0, le=1)
    dedup_window_s: float = Field(3600.0, ge=0)


class EdgeCheckoutSettings(_Section):
    """Tracking and SKU voting at checkout counters: an item below these is unresolved, never billed."""

    iou_threshold: float = Field(0.3, gt=0, le=1)
    max_lost_frames: int = Field(15, ge=0)
    min_votes: int = Field(3, ge=1)
    min_agreement: float = Field(0.6, ge=0, le=1)
    min_probability: float = Field(0.5, ge=0, le=1)


class EdgeSettings(_Section):
    store_id: str = Field("store-001", pattern=_ID)
    device_id: str = Field("edge-001", pattern=_ID)
    data_dir: Path = Path("var/edge")
    backend: Literal["onnxruntime", "tensorrt", "openvino"] = "onnxruntime"
    # What the detector computes in; None: the backend's default (onnxruntime and openvino fp32,
    # tensorrt fp16). openvino bf16 needs a CPU with AVX512-BF16 or AMX.
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = None
    cameras: list[CameraSettings] = []
    model_bundle: Path | None = None  # None: the shipped baseline (models/baseline/model)
    gallery: Path | None = None  # None: the shipped baseline gallery
    planogram: Path | None = None  # planogram JSON with the bays the shelf cameras face
    catalogue: Path | None = None  # catalogue JSON: SKU ids, packaging variants, pack sizes
    trusted_keys: list[Path] = []  # extra ed25519 public keys for bundles and galleries
    heartbeat_s: float = Field(30.0, gt=0)
    snapshot_max_side: int = Field(640, ge=64, le=4096)
    json_logs: bool = True
    outbox: EdgeOutboxSettings = EdgeOutboxSettings()
    uplink: EdgeUplinkSettings = EdgeUplinkSettings()
    routing: EdgeRoutingSettings = EdgeRoutingSettings()
    checkout: EdgeCheckoutSettings = EdgeCheckoutSettings()

    @model_validator(mode="after")
    def _backend_computes_in_precision(self) -> EdgeSettings:
        from models.backends import check_precision
        from models.errors import BackendUnavailable

        try:
            check_precision(self.backend, self.precision)
        except BackendUnavailable as exc:
            raise ValueError(str(exc)) from exc
        return self


class BrokerAdminSettings(_Section):
    """Where the cloud writes the Mosquitto password and ACL files it owns, and how it tells the broker.

    Unset paths mean device provisioning only records credentials in the database.
    """

    password_file: Path | None = None
    acl_file: Path | None = None
    pid_file: Path | None = None  # SIGHUP goes to the pid written here after every change


class QueueSettings(_Section):
    """The annotation queue: leases, retries, consensus and gold tasks."""

    lease_s: float = Field(300.0, gt=0, le=86_400)
    max_attempts: int = Field(3, ge=1, le=100)
    consensus_k: int = Field(1, ge=1, le=10)
    gold_rate: float = Field(0.0, ge=0.0, le=1.0)


class CloudSettings(_Section):
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    ingest_group: str = Field("ingest", pattern=_ID)
    # A stable id gives the worker a persistent MQTT session: unacked uplinks are redelivered after a crash.
    ingest_client_id: str = Field("shelfloop-ingest-0", pattern=_ID)
    session_expiry_s: int = Field(3600, ge=0, le=2**32 - 1)
    ingest_metrics_host: str = "127.0.0.1"
    ingest_metrics_port: int | None = Field(None, ge=1, le=65535)  # Prometheus /metrics of the worker
    image_check: Literal["full", "structural"] = "full"
    token_ttl_s: int = Field(12 * 3600, ge=60)
    bootstrap_admin: str | None = Field(None, pattern=_ID)
    bootstrap_admin_password: SecretStr | None = None
    json_logs: bool = True
    broker: BrokerAdminSettings = BrokerAdminSettings()
    queue: QueueSettings = QueueSettings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHELFLOOP_", env_nested_delimiter="__", extra="forbid")

    mqtt: MqttSettings = MqttSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    edge: EdgeSettings = EdgeSettings()
    cloud: CloudSettings = CloudSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return init_settings, env_settings, _FileSource(settings_cls)


class ConfigError(ValueError):
    """The configuration is unusable; `problems` lists each bad key with what is wrong."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"invalid configuration ({source}):\n" + "\n".join(f"  - {p}" for p in problems))


_CONFIG_FILE: Path | None = None


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(_CONFIG_FILE) if _CONFIG_FILE else {}


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            str(path), [f"not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}"]
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections (mqtt, storage, ...)"])
    return data


def load_settings(path: str | Path | None = None) -> Settings:
    """Settings from defaults, the config file (argument or $SHELFLOOP_CONFIG) and the environment."""
    global _CONFIG_FILE
    chosen = path or os.environ.get(CONFIG_ENV)
    _CONFIG_FILE = Path(chosen) if chosen else None
    source = f"{_CONFIG_FILE} + environment" if _CONFIG_FILE else "environment"
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None
    finally:
        _CONFIG_FILE = None


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{key}: {err['msg']}{shown}"
