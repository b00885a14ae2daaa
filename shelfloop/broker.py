"""A private Mosquitto on loopback, for the demo and the benchmarks (tests have their own fixture)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A free loopback port for a server that starts a moment later.

    Not one the kernel hands out (`bind(0)`): the kernel may give that same port, in between, to some
    process's outgoing connection as its ephemeral port, and the server then fails to bind. So the port
    is drawn outside the ephemeral range (Linux: ip_local_port_range) and checked free.
    """
    try:
        low, high = (int(v) for v in _EPHEMERAL_PORTS.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # the Linux default
    span = (10000, low) if low > 11000 else (high + 1, 65536)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(*span)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port in {span[0]}..{span[1] - 1}")


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
