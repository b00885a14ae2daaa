"""Release updates: retained `ReleasePointer`s -> download -> verify -> prepare -> canary -> swap (or not).

Why this order: a device must never trade a working model for a broken one. The artifact is fetched
beside the running one, checked against the pointer (size, sha256, the bundle's own signature) and
against our trusted keys (`models.bundle.verify_bundle`), loaded (on a GPU that builds the TensorRT
engine) while the old pipeline keeps serving, run on a few recent frames, and only then swapped in as a
whole `Pipeline`. A gallery update swaps the recognizer's gallery on the loaded network: no new weights,
no restart. After a swap the agent watches the next frames and rolls back on errors. Every outcome is
logged and reported in the heartbeat's faults when it is a failure.

The pointer's ``signature`` is the bundle's ``manifest.sig`` (ed25519 over the manifest) and ``key_id``
the manifest's signing key, so the pointer is bound to exactly one signed bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from shelfloop import contract

__all__ = ["ActiveRelease", "ReleaseManager", "UpdateOutcome", "read_active", "resolve_pointer"]

log = logging.getLogger("shelfloop.edge.updates")

_SCOPE_RANK: Final = {"device": 3, "store": 2, "fleet": 1}
_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class UpdateOutcome:
    """What became of one release pointer."""

    artifact: str
    version: str
    status: Literal["activated", "current", "rejected", "waiting", "rolled_back"]
    detail: str = ""


@dataclass(frozen=True)
class ActiveRelease:
    """The verified artifacts the agent runs, persisted so a restart keeps the last good release."""

    model_path: str | None = None
    model_version: str | None = None
    gallery_path: str | None = None
    gallery_version: str | None = None


def read_active(data_dir: Path) -> ActiveRelease:
    path = Path(data_dir) / "releases" / "active.json"
    try:
        return ActiveRelease(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return ActiveRelease()


def _write_active(data_dir: Path, active: ActiveRelease) -> None:
    path = Path(data_dir) / "releases" / "active.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(active.__dict__, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new record, never half of one


def resolve_pointer(pointers: dict[str, contract.ReleasePointer]) -> contract.ReleasePointer | None:
    """The most specific pointer wins: device over store over fleet."""
    if not pointers:
        return None
    return pointers[max(pointers, key=lambda scope: _SCOPE_RANK.get(scope, 0))]


class ReleaseManager:
    """Receives pointers (from the uplink's thread) and applies them on its own worker thread.

    ``load_model(path) -> models.loader.ModelBundle``, ``load_gallery(path, embedder) -> Gallery``;
    ``canary_frames()`` gives recent frames; ``swap(pipeline)`` installs a pipeline in the agent.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        current: Callable[[], Any],
        swap: Callable[[Any], None],
        load_model: Callable[[Path], Any],
        load_gallery: Callable[[Path, Any], Any],
        make_pipeline: Callable[[Any, Any], Any],
        canary_frames: Callable[[], Sequence[np.ndarray]],
        run_pipeline: Callable[[Any, np.ndarray], Any],
        report: Callable[[str], None],
        trusted_keys: dict[str, bytes] | None = None,
        download_timeout_s: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._current, self._swap = current, swap
        self._load_model, self._load_gallery = load_model, load_gallery
        self._make_pipeline = make_pipeline
        self._canary_frames, self._run_pipeline = canary_frames, run_pipeline
        self._report = report
        self._timeout = download_timeout_s
        self.trusted_keys = trusted_keys
        self._pointers: dict[str, dict[str, contract.ReleasePointer]] = {"model": {}, "gallery": {}}
        self._failed: set[tuple[str, str]] = set()  # (artifact, version) already refused: not retried
        self._queue: queue.Queue[bool | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.active = read_active(self.data_dir)
        self.outcomes: list[UpdateOutcome] = []
        self._loaded_model: Any = None  # the ModelBundle behind the current pipeline, when known

    # -- intake ---------------------------------------------------------------------------------------

    def on_pointer(self, topic: str, pointer: contract.ReleasePointer) -> None:
        """Uplink callback (network thread): record the pointer, let the worker apply it."""
        try:
            info = contract.parse_topic(topic)
        except contract.ContractError:
            self._report(f"release pointer on an unexpected topic {topic}")
            return
        if info.artifact != pointer.artifact:
            self._report(f"release pointer for {pointer.artifact} on the {info.artifact} topic ignored")
            return
        with self._lock:
            self._pointers[pointer.artifact][info.scope] = pointer
        self._queue.put(True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="release-updates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(30)

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            while not self._queue.empty():  # several pointers at once (retained on subscribe): one pass
                if self._queue.get_nowait() is None:
                    return
            try:
                self.apply_pending()
            except Exception as exc:  # an update must never take the agent down
                log.exception("release update failed")
                self._report(f"release update failed: {type(exc).__name__}: {exc}")

    # -- applying -------------------------------------------------------------------------------------

    def apply_pending(self) -> list[UpdateOutcome]:
        """Bring the pipeline to the effective pointers; returns what happened to each artifact."""
        with self._lock:
            model_ptr = resolve_pointer(self._pointers["model"])
            gallery_ptr = resolve_pointer(self._pointers["gallery"])
        current = self._current()
        outcomes: list[UpdateOutcome] = []
        want_model = model_ptr is not None and model_ptr.version != current.model_version
        want_gallery = gallery_ptr is not None and gallery_ptr.version != current.gallery_version
        for ptr, wanted in ((model_ptr, want_model), (gallery_ptr, want_gallery)):
            if ptr is not None and not wanted:
                outcomes.append(UpdateOutcome(ptr.artifact, ptr.version, "current"))
        if want_model and (model_ptr.artifact, model_ptr.version) in self._failed:  # type: ignore[union-attr]
            want_model = False
        if want_gallery and (gallery_ptr.artifact, gallery_ptr.version) in self._failed:  # type: ignore[union-attr]
            want_gallery = False
        if not (want_model or want_gallery):
            return self._record(outcomes)
        fetched: dict[str, Path] = {}
        for ptr, wanted in ((model_ptr, want_model), (gallery_ptr, want_gallery)):
            if not wanted or ptr is None:
                continue
            try:
                fetched[ptr.artifact] = self.fetch(ptr)
            except Exception as exc:
                self._failed.add((ptr.artifact, ptr.version))
                return self._record([*outcomes, self._reject(ptr, f"download/verify failed: {exc}")])
        return self._record([*outcomes, *self._prepare_and_swap(model_ptr, gallery_ptr, fetched)])

    def _prepare_and_swap(
        self,
        model_ptr: contract.ReleasePointer | None,
        gallery_ptr: contract.ReleasePointer | None,
        fetched: dict[str, Path],
    ) -> list[UpdateOutcome]:
        from models.errors import GalleryMismatch

        current = self._current()
        main = model_ptr if "model" in fetched else gallery_ptr
        assert main is not None
        try:
            bundle = self._load_model(fetched["model"]) if "model" in fetched else self._current_bundle()
        except Exception as exc:
            self._failed.add(("model", model_ptr.version))  # type: ignore[union-attr]
            return [self._reject(main, f"model does not load: {exc}")]
        gallery_path = fetched.get("gallery") or (
            Path(self.active.gallery_path) if self.active.gallery_path else None
        )
        try:
            gallery = self._load_gallery(gallery_path, bundle.embedder) if gallery_path else None
            if gallery is None:
                gallery = current.recognizer.gallery
                gallery.check_compatible(bundle.embedder.fingerprint)
        except GalleryMismatch as exc:
            outcome = UpdateOutcome(
                main.artifact, main.version, "waiting", f"needs a matching gallery: {exc}"
            )
            self._report(f"release {main.artifact} {main.version} waits: {outcome.detail}")
            return [outcome]
        except Exception as exc:
            ptr = gallery_ptr if "gallery" in fetched else main
            self._failed.add((ptr.artifact, ptr.version))
            return [self._reject(ptr, f"gallery does not load: {exc}")]
        candidate = self._make_pipeline(bundle, gallery)
        problem = self.canary(current, candidate)
        if problem is not None:
            for art, path in fetched.items():
                ptr = model_ptr if art == "model" else gallery_ptr
                self._failed.add((art, ptr.version))  # type: ignore[union-attr]
                shutil.rmtree(path, ignore_errors=True)
            return [self._reject(main, f"canary failed: {problem}")]
        self._swap(candidate)
        self._loaded_model = bundle
        self.active = ActiveRelease(
            model_path=str(fetched["model"]) if "model" in fetched else self.active.model_path,
            model_version=candidate.model_version,
            gallery_path=str(fetched["gallery"]) if "gallery" in fetched else self.active.gallery_path,
            gallery_version=candidate.gallery_version,
        )
        _write_active(self.data_dir, self.active)
        out = []
        for art in fetched:
            ptr = model_ptr if art == "model" else gallery_ptr
            out.append(UpdateOutcome(art, ptr.version, "activated"))  # type: ignore[union-attr]
            log.info("release %s %s activated", art, ptr.version)  # type: ignore[union-attr]
        return out

    def _current_bundle(self) -> Any:
        if self._loaded_model is not None:
            return self._loaded_model
        current = self._current()

        class _Loaded:  # the running detector + embedder, for a gallery-only update
            detector = current.detector
            embedder = current.recognizer.embedder
            version = current.model_version

        return _Loaded()

    def canary(self, current: Any, candidate: Any) -> str | None:
        """Run both pipelines on recent frames; None when the candidate is fit to serve."""
        frames = list(self._canary_frames())[:5]
        if not frames:
            return None  # nothing seen yet: verification and loading are all we can check
        old_boxes = new_boxes = 0
        for image in frames:
            try:
                new = self._run_pipeline(candidate, image)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            if len(new) and not np.all(np.isfinite(new.xyxy)):
                return "non-finite boxes"
            new_boxes += len(new)
            # The old pipeline failing is no reason to refuse the new one.
            with contextlib.suppress(Exception):
                old_boxes += len(self._run_pipeline(current, image))
        if old_boxes >= 2 * len(frames) and new_boxes < 0.25 * old_boxes:
            return f"found {new_boxes} products where the running model found {old_boxes}"
        return None

    def rolled_back(self, model_version: str, gallery_version: str, why: str) -> None:
        """The agent reverted a swapped-in pipeline after errors: never try that release again."""
        self._failed.add(("model", model_version))
        self._failed.add(("gallery", gallery_version))
        self._record([UpdateOutcome("model", model_version, "rolled_back", why)])
        self._report(f"release {model_version}/{gallery_version} rolled back: {why}")

    def _reject(self, ptr: contract.ReleasePointer, why: str) -> UpdateOutcome:
        self._report(f"release {ptr.artifact} {ptr.version} rejected: {why}")
        return UpdateOutcome(ptr.artifact, ptr.version, "rejected", why)

    def _record(self, outcomes: list[UpdateOutcome]) -> list[UpdateOutcome]:
        self.outcomes = [*self.outcomes[-31:], *outcomes]
        return outcomes

    # -- download and verification --------------------------------------------------------------------

    def fetch(self, ptr: contract.ReleasePointer) -> Path:
        """Download to the releases folder, check size, sha256 and binding to the pointer, unpack."""
        from models.bundle import verify_bundle
        from models.loader import default_trusted_keys

        releases = self.data_dir / "releases"
        releases.mkdir(parents=True, exist_ok=True)
        archive = releases / f"{ptr.artifact}-{_safe(ptr.version)}.tar.gz"
        part = archive.with_suffix(".part")
        digest = hashlib.sha256()
        size = 0
        with self._open(ptr.url) as src, part.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > ptr.size_bytes:
                    raise ValueError(f"larger than the announced {ptr.size_bytes} bytes")
                digest.update(chunk)
                dst.write(chunk)
        if size != ptr.size_bytes:
            part.unlink(missing_ok=True)
            raise ValueError(f"{size} bytes, the pointer says {ptr.size_bytes}")
        if digest.hexdigest() != ptr.sha256:
            part.unlink(missing_ok=True)
            raise ValueError("sha256 does not match the pointer")
        os.replace(part, archive)
        target = releases / f"{ptr.artifact}-{_safe(ptr.version)}"
        verified = verify_bundle(archive, self.trusted_keys or default_trusted_keys(), ptr.artifact, target)
        archive.unlink(missing_ok=True)
        sig = (verified.path / "manifest.sig").read_text().strip()
        if sig != ptr.signature or verified.manifest.get("key_id") != ptr.key_id:
            shutil.rmtree(verified.path, ignore_errors=True)
            raise ValueError("the bundle's signature or key is not the one the pointer names")
        if str(verified.manifest.get("version")) != ptr.version:
            shutil.rmtree(verified.path, ignore_errors=True)
            raise ValueError(f"bundle version {verified.manifest.get('version')} is not {ptr.version}")
        return verified.path

    def _open(self, url: str) -> Any:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "file":
            return open(urllib.request.url2pathname(parsed.path), "rb")
        if parsed.scheme in ("http", "https"):
            return urllib.request.urlopen(url, timeout=self._timeout)
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r} (file, http, https)")


def _safe(version: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in version)[:100]
