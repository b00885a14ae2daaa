"""Camera sources: RTSP/USB cameras, video files and image folders, through OpenCV.

Why non-blocking reads with back-off: one agent serves several cameras in one loop, and a camera that
disappears (cable pulled, RTSP server restarting) must not stall the others or the heartbeat. A live
source that fails is reopened with exponential back-off; a corrupt frame is skipped, counted and
reported, never passed to the models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from shelfloop import contract

__all__ = ["Frame", "FrameSource", "ImageFolderSource", "SourceStats", "VideoSource", "open_source"]

log = logging.getLogger("shelfloop.edge.sources")

IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass(frozen=True)
class Frame:
    """One decoded BGR frame with where and when it came from, and how long decoding took."""

    camera_id: str
    index: int
    image: np.ndarray
    captured_at: datetime
    decode_ms: float


@dataclass
class SourceStats:
    """What a source has been through; reported in the heartbeat's faults and logs."""

    frames: int = 0
    corrupt: int = 0
    reconnects: int = 0
    open_failures: int = 0


class FrameSource(Protocol):
    """What the agent needs from a camera: a non-blocking read, an end flag for finite sources, close."""

    camera_id: str
    stats: SourceStats

    def read(self) -> Frame | None: ...

    @property
    def exhausted(self) -> bool: ...

    def take_faults(self) -> list[str]: ...

    def close(self) -> None: ...


def _valid(image: Any) -> bool:
    return (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[2] == 3
        and image.shape[0] >= 8
        and image.shape[1] >= 8
        and image.dtype == np.uint8
    )


class _Faults:
    def __init__(self) -> None:
        self._faults: list[str] = []

    def fault(self, text: str) -> None:
        log.warning("%s", text)
        self._faults.append(text)
        del self._faults[:-16]

    def take_faults(self) -> list[str]:
        faults, self._faults = self._faults, []
        return faults


class ImageFolderSource(_Faults):
    """Images of a folder in name order (a test rig or an archive replay); ``loop`` starts over at the end."""

    def __init__(self, camera_id: str, folder: str | Path, *, loop: bool = False) -> None:
        super().__init__()
        self.camera_id = camera_id
        self.folder = Path(folder)
        self.loop = loop
        self.stats = SourceStats()
        self._paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self._next = 0
        if not self._paths:
            self.fault(f"camera {camera_id}: no images in {self.folder}")

    @property
    def exhausted(self) -> bool:
        return not self.loop and self._next >= len(self._paths)

    def read(self) -> Frame | None:
        import cv2

        while not self.exhausted and self._paths:
            if self._next >= len(self._paths):
                self._next = 0
            path = self._paths[self._next]
            self._next += 1
            start = time.perf_counter()
            data = np.fromfile(str(path), dtype=np.uint8) if path.exists() else np.zeros(0, np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
            ms = (time.perf_counter() - start) * 1000
            if not _valid(image):
                self.stats.corrupt += 1
                self.fault(f"camera {self.camera_id}: corrupt frame {path.name} skipped")
                continue
            self.stats.frames += 1
            return Frame(self.camera_id, self.stats.frames - 1, image, contract.utc_now(), ms)
        return None

    def close(self) -> None:
        self._paths = []


class VideoSource(_Faults):
    """An OpenCV capture: a video file (finite) or a live RTSP/USB camera (reopened with back-off)."""

    def __init__(
        self,
        camera_id: str,
        uri: str | int,
        *,
        live: bool,
        loop: bool = False,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_bad_reads: int = 5,
        opener: Callable[[str | int], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.camera_id = camera_id
        self.uri = uri
        self.live = live
        self.loop = loop
        self.stats = SourceStats()
        self._opener = opener or _cv2_open
        self._clock = clock
        self._backoff_min, self._backoff_max = backoff_min_s, backoff_max_s
        self._backoff = backoff_min_s
        self._retry_at = 0.0
        self._bad_reads = 0
        self._max_bad_reads = max_bad_reads
        self._cap: Any = None
        self._done = False

    @property
    def exhausted(self) -> bool:
        return self._done

    def _open(self) -> bool:
        if self._clock() < self._retry_at:
            return False
        cap = self._opener(self.uri)
        if cap is None or not cap.isOpened():
            self.stats.open_failures += 1
            self._schedule_retry(f"camera {self.camera_id}: cannot open {self._redacted()}")
            if not self.live:
                self._done = True
            return False
        self._cap = cap
        if self.stats.frames or self.stats.open_failures:
            self.stats.reconnects += 1
            log.info("camera %s: (re)opened %s", self.camera_id, self._redacted())
        self._backoff = self._backoff_min
        return True

    def _schedule_retry(self, why: str) -> None:
        self.fault(f"{why}; retry in {self._backoff:.1f} s")
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff_max, self._backoff * 2)

    def _drop(self) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = None

    def read(self) -> Frame | None:
        if self._done:
            return None
        if self._cap is None and not self._open():
            return None
        start = time.perf_counter()
        ok, image = self._cap.read()
        ms = (time.perf_counter() - start) * 1000
        if not ok:
            self._drop()
            if not self.live:
                if self.loop and self.stats.frames:
                    return None  # reopened from the start on the next read
                self._done = True
                return None
            self._schedule_retry(f"camera {self.camera_id}: stream lost")
            return None
        if not _valid(image):
            self.stats.corrupt += 1
            self._bad_reads += 1
            self.fault(f"camera {self.camera_id}: corrupt frame skipped")
            if self.live and self._bad_reads >= self._max_bad_reads:
                self._drop()
                self._bad_reads = 0
                self._schedule_retry(
                    f"camera {self.camera_id}: {self._max_bad_reads} corrupt frames in a row"
                )
            return None
        self._bad_reads = 0
        self.stats.frames += 1
        return Frame(self.camera_id, self.stats.frames - 1, image, contract.utc_now(), ms)

    def skip(self) -> None:
        """Drop one frame without decoding it: a live shelf camera read every few seconds would otherwise
        hand over a stale frame from its driver's buffer."""
        if self.live and self._cap is not None and not self._cap.grab():
            self._drop()
            self._schedule_retry(f"camera {self.camera_id}: stream lost")

    def _redacted(self) -> str:
        text = str(self.uri)
        if "@" in text and "://" in text:  # rtsp://user:password@host -> rtsp://***@host
            scheme, rest = text.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return text

    def close(self) -> None:
        self._drop()
        self._done = True


def _cv2_open(uri: str | int) -> Any:
    import cv2

    return cv2.VideoCapture(uri)


def open_source(camera_id: str, source: str, *, loop: bool = False) -> FrameSource:
    """Pick the source kind from the configured string: a folder, a USB index, a stream URL or a file."""
    path = Path(source)
    if path.is_dir():
        return ImageFolderSource(camera_id, path, loop=loop)
    if source.isdigit():
        return VideoSource(camera_id, int(source), live=True)
    if "://" in source:
        return VideoSource(camera_id, source, live=not source.startswith("file://"))
    return VideoSource(camera_id, source, live=False, loop=loop)
