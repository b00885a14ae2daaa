"""Telemetry: per-stage latency percentiles, frame rate, process CPU and memory, structured logs.

Why /proc and not psutil: the edge install stays small, and /proc is all a Linux device needs; where a
value is unreadable (another OS, a locked-down container) the heartbeat says None rather than guessing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import numpy as np

from shelfloop import contract

__all__ = ["STAGES", "JsonLogFormatter", "ResourceMonitor", "StageTimer", "configure_logging"]

STAGES: Final = ("decode", "pre", "infer", "post", "recognise", "track", "route", "compliance")
"""Pipeline stages with their own latency line in the heartbeat."""


class StageTimer:
    """Recent latencies per stage in bounded windows (the soak test checks that memory stays flat)."""

    def __init__(self, window: int = 1000) -> None:
        self._samples: dict[str, deque[float]] = {}
        self._window = window

    def add(self, stage: str, ms: float) -> None:
        self._samples.setdefault(stage, deque(maxlen=self._window)).append(float(ms))

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - start) * 1000)

    def last(self, stage: str) -> float:
        """The latest sample of a stage (0 when it has none): the benchmark's per-frame view."""
        samples = self._samples.get(stage)
        return samples[-1] if samples else 0.0

    def stages(self) -> list[str]:
        return list(self._samples)

    def percentiles(self, stage: str) -> tuple[float, float, int]:
        samples = self._samples.get(stage)
        if not samples:
            return 0.0, 0.0, 0
        arr = np.fromiter(samples, np.float64, len(samples))
        p50, p95 = np.percentile(arr, [50, 95])
        return float(p50), float(max(p50, p95)), len(arr)

    def stats(self) -> dict[str, contract.LatencyStats]:
        out: dict[str, contract.LatencyStats] = {}
        for stage in self._samples:
            p50, p95, n = self.percentiles(stage)
            out[stage] = contract.LatencyStats(p50_ms=round(p50, 3), p95_ms=round(p95, 3), count=n)
        return out

    def reset(self) -> None:
        self._samples.clear()


class ResourceMonitor:
    """CPU share since the last call and resident memory of this process, from /proc."""

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, float] | None = None
        self.cpu_percent()

    def _cpu_seconds(self) -> float | None:
        try:
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self._ticks
        except (OSError, IndexError, ValueError):
            return None

    def cpu_percent(self) -> float | None:
        cpu, now = self._cpu_seconds(), time.monotonic()
        if cpu is None:
            return None
        last, self._last = self._last, (cpu, now)
        if last is None or now <= last[1]:
            return 0.0
        return max(0.0, 100.0 * (cpu - last[0]) / (now - last[1]))

    @staticmethod
    def memory_mb() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            return None
        return None

    @staticmethod
    def open_files() -> int | None:
        try:
            return len(os.listdir("/proc/self/fd"))
        except OSError:
            return None

    @staticmethod
    def gpu_percent() -> float | None:
        """GPU load where the kernel exposes it (Jetson: 0..1000 in /sys/devices/gpu.0/load)."""
        for path in ("/sys/devices/gpu.0/load", "/sys/devices/platform/gpu.0/load"):
            try:
                return min(100.0, max(0.0, int(Path(path).read_text().strip()) / 10.0))
            except (OSError, ValueError):
                continue
        return None

    @staticmethod
    def temperature_c() -> float | None:
        """The first thermal zone (SoC temperature on Jetson and Raspberry Pi), where readable."""
        try:
            value = int(Path("/sys/class/thermal/thermal_zone0/temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            return None
        return value if -100.0 <= value <= 250.0 else None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: what a fleet's log shipper can index without parsing prose."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: int = logging.INFO, json_logs: bool = True) -> None:
    handler = logging.StreamHandler()
    if json_logs:
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
