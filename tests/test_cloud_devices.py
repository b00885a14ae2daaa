"""Step 4 of the cloud: device provisioning writes Mosquitto's password and ACL files, checked on a real
broker: a device can publish only under its own topics, and a revoked device cannot connect."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import find_executable

from cloud_api.db import Database
from cloud_api.devices import (
    DeviceError,
    DeviceRegistry,
    mosquitto_hash,
    mqtt_username,
    verify_mosquitto_hash,
)
from cloud_api.devsim import DeviceSim, make_crop
from shelfloop import contract as c
from shelfloop.settings import BrokerAdminSettings

RC_NOT_AUTHORIZED = 0x87
STORE = "store-9"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'dev.db'}")
    yield database
    database.dispose()


def test_hash_format_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    salt = bytes(range(12))
    hashed = mosquitto_hash("secret", salt=salt)
    assert hashed.startswith("$7$101$") and verify_mosquitto_hash("secret", hashed)
    assert not verify_mosquitto_hash("wrong", hashed) and not verify_mosquitto_hash("secret", "garbage")
    passwd = find_executable("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd is not installed")
    import subprocess

    pw = tmp_path / "pw"
    pw.touch()
    subprocess.run([passwd, "-b", str(pw), "u", "secret"], check=True, capture_output=True, timeout=30)
    assert verify_mosquitto_hash("secret", pw.read_text().strip().split(":", 1)[1])


def test_usernames_cannot_collide_or_inject() -> None:
    assert mqtt_username("s.1", "d") == "d@s.1"
    with pytest.raises(c.InvalidTopic):
        mqtt_username("s\nuser admin", "d")


@pytest.fixture
def sims() -> Iterator[list[DeviceSim]]:
    opened: list[DeviceSim] = []
    yield opened
    for sim in opened:
        sim.close()


@pytest.mark.broker
def test_provisioned_devices_are_confined_to_their_topics_and_revocation_locks_out(
    mosquitto: Any, db: Database, tmp_path: Path, sims: list[DeviceSim]
) -> None:
    files = BrokerAdminSettings(
        password_file=tmp_path / "broker" / "passwords",
        acl_file=tmp_path / "broker" / "acl",
        pid_file=tmp_path / "broker" / "mosquitto.pid",
    )
    registry = DeviceRegistry(db, files, cloud_users={"cloud-ingest": "ingest-pw"})
    dev1 = registry.provision(STORE, "dev-1")
    dev2 = registry.provision(STORE, "dev-2")
    text = files.password_file.read_text()
    assert dev1.password not in text and dev1.username in text and "cloud-ingest:$7$" in text
    assert files.password_file.stat().st_mode & 0o077 == 0
    broker = mosquitto(
        allow_anonymous=False,
        start=False,
        extra_config=[f"password_file {files.password_file}", f"acl_file {files.acl_file}"],
    )
    broker.start()
    files.pid_file.write_text(str(broker.pid))

    def connect(store: str, device: str, username: str, password: str) -> DeviceSim:
        sim = DeviceSim(broker.host, broker.port, store, device, username=username, password=password)
        sims.append(sim)
        sim.wait_connected()
        return sim

    cloud = connect(STORE, "cloud", "cloud-ingest", "ingest-pw")
    assert cloud.connack == 0
    got: list[str] = []
    cloud.client.on_message = lambda _c, _u, msg: got.append(msg.topic)
    cloud.client.subscribe(c.shared_ingest_subscription("ingest"), qos=1)
    time.sleep(0.3)

    a = connect(STORE, "dev-1", dev1.username, dev1.password)
    assert a.connack == 0
    own = a.publish_raw(c.uplink_topic(STORE, "dev-1", "crop"), c.encode(make_crop(STORE, "dev-1")))
    assert a.wait_puback(own) == 0
    foreign = a.publish_raw(c.uplink_topic(STORE, "dev-2", "crop"), c.encode(make_crop(STORE, "dev-2")))
    assert a.wait_puback(foreign) == RC_NOT_AUTHORIZED
    fake_ack = a.publish_raw(c.ack_topic(STORE, "dev-2"), b"x")
    assert a.wait_puback(fake_ack) == RC_NOT_AUTHORIZED
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == [c.uplink_topic(STORE, "dev-1", "crop")]

    wrong = connect(STORE, "dev-2", dev2.username, dev1.password)
    assert wrong.connack not in (None, 0)

    # A device provisioned while the broker runs can connect after the reload; a revoked one cannot.
    dev3 = registry.provision(STORE, "dev-3")
    registry.revoke(STORE, "dev-1")
    time.sleep(0.5)
    assert connect(STORE, "dev-3", dev3.username, dev3.password).connack == 0
    assert connect(STORE, "dev-1", dev1.username, dev1.password).connack not in (None, 0)
    assert (
        "dev-1" not in files.acl_file.read_text().split("user cloud-ingest")[1].replace("dev-1:", "")[:0] + ""
    )
    assert f"user {dev1.username}\n" not in files.acl_file.read_text()
    # Rotating a credential invalidates the old password.
    dev2b = registry.provision(STORE, "dev-2")
    time.sleep(0.5)
    assert connect(STORE, "dev-2", dev2.username, dev2.password).connack not in (None, 0)
    assert connect(STORE, "dev-2", dev2b.username, dev2b.password).connack == 0


def test_invalid_ids_are_refused(db: Database) -> None:
    registry = DeviceRegistry(db)
    with pytest.raises(DeviceError):
        registry.provision("_fleet", "dev")
    with pytest.raises(DeviceError):
        registry.revoke("nope", "nope")


@pytest.mark.broker
def test_the_deploy_template_runs_and_enforces_provisioning(
    db: Database, tmp_path: Path, sims: list[DeviceSim]
) -> None:
    import string

    from conftest import MosquittoBroker

    from shelfloop.broker import free_port

    executable = find_executable("mosquitto")
    if executable is None:
        pytest.skip("mosquitto is not installed")
    template = (
        Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "mosquitto.conf.template"
    ).read_text()
    files = BrokerAdminSettings(
        password_file=tmp_path / "passwords", acl_file=tmp_path / "acl", pid_file=tmp_path / "mosquitto.pid"
    )
    registry = DeviceRegistry(db, files, cloud_users={"cloud": "cloud-pw"})
    creds = registry.provision(STORE, "dev-1")
    (tmp_path / "data").mkdir()
    port = free_port()
    text = string.Template(template).substitute(
        PORT=port,
        LISTEN_ADDRESS="127.0.0.1",
        TLS_LINES="",
        PASSWORD_FILE=files.password_file,
        ACL_FILE=files.acl_file,
        PID_FILE=files.pid_file,
        DATA_DIR=tmp_path / "data",
        LOG_DEST=f"file {tmp_path / 'mosquitto.log'}",
    )
    import os

    if os.geteuid() == 0:
        text += "user root\n"
    broker = MosquittoBroker(executable, tmp_path, port, text)
    broker.start()
    try:
        deadline = time.monotonic() + 5
        while not files.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert files.pid_file.read_text().strip() == str(
            broker.pid
        )  # the broker writes the pid the API signals
        sim = DeviceSim(
            broker.host, broker.port, STORE, "dev-1", username=creds.username, password=creds.password
        )
        sims.append(sim)
        assert sim.wait_connected() == 0
        mid = sim.publish_raw(c.uplink_topic(STORE, "dev-2", "heartbeat"), b"x")
        assert sim.wait_puback(mid) == RC_NOT_AUTHORIZED
        registry.revoke(STORE, "dev-1")  # signals the pid from the pid file
        time.sleep(0.5)
        again = DeviceSim(
            broker.host, broker.port, STORE, "dev-1", username=creds.username, password=creds.password
        )
        sims.append(again)
        assert again.wait_connected() not in (None, 0)
    finally:
        broker.stop()
        broker.kill()
