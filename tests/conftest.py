"""Shared pytest fixtures.

``mosquitto``: a factory that starts real Mosquitto brokers on 127.0.0.1 for tests that need one
(mark them ``@pytest.mark.broker``). Each broker gets its own temp dir with its config, persistence
database, optional password/ACL files and a log; brokers can be stopped, killed and restarted on the same
port (for outage tests) and are all terminated at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from models.loader import BASELINE_MODEL
from retrain.quantize import STORAGE as QDQ_INT8
from shelfloop.broker import free_port

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin", "/opt/homebrew/sbin")


def shipped_recognizer_in_int8() -> bool:
    """Whether the shipped bundle computes its recognizer in int8 (`retrain bundle --recognizer-storage
    qdq-int8`): the parity tolerances and backend labels that hold for it follow from that."""
    manifest = BASELINE_MODEL / "manifest.json"
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text())["weights"]["recognizer"]["storage"] == QDQ_INT8


def find_executable(name: str) -> str | None:
    """Find ``name`` on PATH or in the sbin dirs that are often missing from a non-root PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One Mosquitto process with a fixed host/port that can be stopped, killed and started again."""

    def __init__(self, executable: str, workdir: Path, port: int, config_text: str) -> None:
        self.executable = executable
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.stderr_path = workdir / "mosquitto.stderr"
        self.config_path.write_text(config_text)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections on its port."""
        if self.running:
            return
        deadline = time.monotonic() + timeout
        # The port may still be held briefly by the previous process after a restart.
        while _port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
            )
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode} on start:\n{self.diagnostics()}"
                )
            if _port_open(self.host, self.port):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"mosquitto did not listen on {self.host}:{self.port} in {timeout}s:\n{self.diagnostics()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto writes its persistence database before exiting."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Crash the broker (SIGKILL): only what autosave already wrote survives."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, timeout: float = 10.0) -> None:
        """Graceful stop then start on the same port (clients can reconnect to the same address)."""
        self.stop(timeout=timeout)
        self.start(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def diagnostics(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        config = self.config_path.read_text()
        return f"--- config ---\n{config}--- stderr ---\n{stderr}--- log ---\n{self.log_text()}"

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.host}:{self.port}, running={self.running})"


MosquittoFactory = Callable[..., MosquittoBroker]


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoFactory]:
    """Factory for real Mosquitto brokers; skips the test when Mosquitto is not installed.

    ``mosquitto(allow_anonymous=True, users=None, acl=None, message_size_limit=None, max_packet_size=None,
    extra_config=(), start=True)``: ``users`` maps username -> password (hashed with ``mosquitto_passwd
    -b``), ``acl`` is the text of an ``acl_file``. Persistence is on (``autosave_interval 1``) so retained
    and queued messages survive ``restart()``.
    """
    executable = find_executable("mosquitto")
    if executable is None:
        pytest.skip("mosquitto is not installed (looked on PATH and in /usr/sbin, /usr/local/sbin)")
    brokers: list[MosquittoBroker] = []

    def make(
        *,
        allow_anonymous: bool = True,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        message_size_limit: int | None = None,
        max_packet_size: int | None = None,
        extra_config: Sequence[str] = (),
        start: bool = True,
    ) -> MosquittoBroker:
        workdir = tmp_path_factory.mktemp("mosquitto")
        persistence_dir = workdir / "data"
        persistence_dir.mkdir()
        port = free_port()
        lines = [
            f"listener {port} 127.0.0.1",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {persistence_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            f"log_dest file {workdir / 'mosquitto.log'}",
            "log_type all",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto would switch to the "mosquitto" user, which cannot write into pytest's
            # private temp dirs; "root" means "do not change user".
            lines.append("user root")
        if message_size_limit is not None:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        if users:
            passwd = find_executable("mosquitto_passwd")
            if passwd is None:
                pytest.skip("mosquitto_passwd is not installed")
            password_file = workdir / "passwords"
            password_file.touch(mode=0o600)
            for username, password in users.items():
                subprocess.run(
                    [passwd, "-b", str(password_file), username, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            lines.append(f"password_file {password_file}")
        if acl is not None:
            acl_file = workdir / "acl"
            acl_file.write_text(acl)
            acl_file.chmod(0o600)
            lines.append(f"acl_file {acl_file}")
        lines.extend(extra_config)
        broker = MosquittoBroker(executable, workdir, port, "\n".join(lines) + "\n")
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        try:
            broker.stop(timeout=5)
        finally:
            broker.kill()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL: a fresh database on a real server per test session.


def _pg_reachable(host: str, port: int) -> bool:
    return _port_open(host, port)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a new, empty database on a real PostgreSQL server, dropped afterwards.

    The server is $SHELFLOOP_TEST_POSTGRES (host:port, user postgres, trust auth) or the local one on
    127.0.0.1:5432, started with pg_ctlcluster when it is installed but down. Without a server the tests
    skip, except in CI (CI=true), where that is a failure.
    """
    psycopg = pytest.importorskip("psycopg", reason="the cloud extra (psycopg) is not installed")
    host, _, port_s = os.environ.get("SHELFLOOP_TEST_POSTGRES", "127.0.0.1:5432").partition(":")
    port = int(port_s or 5432)
    if (
        not _pg_reachable(host, port)
        and find_executable("pg_ctlcluster")
        and Path("/etc/postgresql").is_dir()
    ):
        for version in sorted(p.name for p in Path("/etc/postgresql").iterdir()):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                capture_output=True,
                timeout=60,
            )
        deadline = time.monotonic() + 15
        while not _pg_reachable(host, port) and time.monotonic() < deadline:
            time.sleep(0.2)
    if not _pg_reachable(host, port):
        message = f"no PostgreSQL server on {host}:{port}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    name = f"shelfloop_test_{os.getpid()}_{int(time.time())}"
    admin = f"host={host} port={port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------------------------------------
# A small synthetic world, generated once per session (all three splits, both scenes).


@pytest.fixture(scope="session")
def small_spec():
    from shelfloop.sim.generate import WorldSpec

    return WorldSpec(seed=11, skus=30, novel=5, bays=6, shelf_images=20, checkout_images=20)


@pytest.fixture(scope="session")
def small_world(small_spec, tmp_path_factory) -> Path:
    from shelfloop.sim.generate import generate

    out = tmp_path_factory.mktemp("world") / "w"
    generate(out, small_spec, workers=2)
    return out


# ---------------------------------------------------------------------------------------------------------
# Cloud: an S3 server on loopback (moto) and a fresh PostgreSQL database per test.


class S3Endpoint:
    """Where a test's S3 server listens; code under test reaches it only through the minio client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.endpoint = f"{host}:{port}"
        self.access_key, self.secret_key, self.region = "testing", "testing-secret", "us-east-1"

    def storage_settings(self, bucket: str = "shelfloop") -> dict[str, object]:
        """Keyword arguments for `shelfloop.settings.StorageSettings` (backend s3)."""
        return {
            "backend": "s3",
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "bucket": bucket,
            "secure": False,
            "region": self.region,
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """moto's S3 server in this process on 127.0.0.1 (a free port), stopped at the end of the session."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        deadline = time.monotonic() + 10
        while not _port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield S3Endpoint("127.0.0.1", port)
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """A further fresh, empty database on the same PostgreSQL server as ``postgres_url``, for one test."""
    import psycopg
    import sqlalchemy as sa

    url = sa.engine.make_url(postgres_url)
    name = f"{url.database}_{int(time.monotonic() * 1000) % 10**9}_{os.urandom(3).hex()}"
    admin = f"host={url.host} port={url.port} user={url.username} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
