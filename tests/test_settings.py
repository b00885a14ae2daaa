"""Configuration: file + environment, validated at start, every bad key named."""

from __future__ import annotations

import pytest

from shelfloop.settings import ConfigError, load_settings


def test_defaults_are_the_embedded_setup(monkeypatch):
    monkeypatch.delenv("SHELFLOOP_CONFIG", raising=False)
    s = load_settings()
    assert s.database.url.startswith("sqlite:///")
    assert s.storage.backend == "local"
    assert s.mqtt.port == 1883


def test_yaml_file_then_environment_override(tmp_path, monkeypatch):
    cfg = tmp_path / "shelfloop.yaml"
    cfg.write_text(
        "mqtt:\n  host: broker.local\n  port: 8883\nedge:\n  store_id: s-42\n  cameras:\n"
        "    - {camera_id: cam-1, source: rtsp://cam/1, role: shelf, bay_id: bay-01}\n"
    )
    monkeypatch.setenv("SHELFLOOP_MQTT__PORT", "1884")
    s = load_settings(cfg)
    assert s.mqtt.host == "broker.local" and s.mqtt.port == 1884
    assert s.edge.store_id == "s-42" and s.edge.cameras[0].role == "shelf"


def test_toml_file_and_config_env_var(tmp_path, monkeypatch):
    cfg = tmp_path / "shelfloop.toml"
    cfg.write_text('[storage]\nbackend = "s3"\nendpoint = "127.0.0.1:9100"\nbucket = "crops"\n')
    monkeypatch.setenv("SHELFLOOP_CONFIG", str(cfg))
    s = load_settings()
    assert s.storage.backend == "s3" and s.storage.bucket == "crops"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtt:\n  prot: 1883\n", "mqtt.prot: unknown key"),
        ("mqtt:\n  port: not-a-port\n", "mqtt.port:"),
        ("mqtt:\n  port: 70000\n", "mqtt.port:"),
        ("storage:\n  backend: ftp\n", "storage.backend:"),
        ("edge:\n  cameras:\n    - {camera_id: c1, source: '0', role: aisle}\n", "edge.cameras.0.role:"),
        ("edge:\n  device_id: 'dev/1'\n", "edge.device_id:"),
        ("edge:\n  backend: onnxruntime\n  precision: bf16\n", "edge: Value error, backend 'onnxruntime'"),
        ("edge:\n  backend: openvino\n  precision: int8\n", "edge: Value error, backend 'openvino'"),
        ("shelves: 3\n", "shelves: unknown key"),
    ],
)
def test_bad_keys_are_named(tmp_path, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mqtt:\n  port: x\nstorage:\n  backend: ftp\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert len(err.value.problems) == 2


def test_broken_files_get_a_clear_error(tmp_path):
    bad_yaml = tmp_path / "a.yaml"
    bad_yaml.write_text("mqtt: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad_yaml)
    bad_toml = tmp_path / "a.toml"
    bad_toml.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad_toml)
    not_mapping = tmp_path / "b.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(not_mapping)
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.yaml")


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.delenv("SHELFLOOP_CONFIG", raising=False)
    monkeypatch.setenv("SHELFLOOP_CLOUD__API_PORT", "zero")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.problems[0].startswith("cloud.api_port:")
