"""A private Mosquitto on loopback, for the demo and the benchmarks (tests have their own fixture)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_executable() -> str:
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if exe is None:
        raise RuntimeError("mosquitto is not installed (make demo / deploy/setup.sh installs it)")
    return exe


@contextmanager
def private_mosquitto(workdir: Path, persistence: bool = True) -> Iterator[int]:
    """Start Mosquitto on a free 127.0.0.1 port with its files in `workdir`; yields the port."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        "message_size_limit 1048576",
        f"log_dest file {workdir / 'mosquitto.log'}",
    ]
    if persistence:
        lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 1"]
    if os.geteuid() == 0:
        lines.append("user root")  # as root Mosquitto would switch to a user that cannot write workdir
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [mosquitto_executable(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        if not wait_port(port, 10):
            raise RuntimeError(f"mosquitto did not start; see {workdir / 'mosquitto.log'}")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
