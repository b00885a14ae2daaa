"""Object storage behind one small interface: a local directory (embedded default) or S3 via ``minio``.

Crops are stored under content-addressed keys (`crop_key`), so writing is *create if absent*: a
redelivered message rewrites the same key with the same bytes, and the key doubles as the database's
idempotency key.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Protocol

from shelfloop import contract
from shelfloop.settings import StorageSettings

__all__ = [
    "LocalObjectStore",
    "ObjectConflict",
    "ObjectNotFound",
    "ObjectStore",
    "S3ObjectStore",
    "crop_key",
    "make_object_store",
    "sha256_hex",
]


class ObjectNotFound(KeyError):
    """No object under that key."""


class ObjectConflict(RuntimeError):
    """A content-addressed key already holds *different* bytes: corruption or a hash collision."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crop_key(store_id: str, device_id: str, jpeg: bytes) -> str:
    """``crops/{store}/{device}/{sha256}.jpg``; ids go through the contract's topic-level checks first."""
    contract.ack_topic(store_id, device_id)  # raises InvalidTopic for ids that could escape the prefix
    return f"crops/{store_id}/{device_id}/{sha256_hex(jpeg)}.jpg"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


def _check_digest(key: str, data: bytes) -> str:
    """A content-addressed key must end with the SHA-256 of its bytes; anything else is a caller bug."""
    digest = sha256_hex(data)
    if digest not in key.rsplit("/", 1)[-1]:
        raise ValueError(f"{key!r} does not name the SHA-256 of its data ({digest})")
    return digest


class ObjectStore(Protocol):
    """What the cloud needs from object storage."""

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Store ``data`` unless ``key`` exists; True if this call created it.

        An existing object with the same bytes is success (returns False); different bytes raise
        `ObjectConflict`, because for content-addressed keys that can only mean corruption.
        """
        ...

    def put_content_addressed(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """Store ``data`` under a key that names its SHA-256: rewriting the same bytes is harmless, so no
        existence check (a round trip per crop on S3) is needed."""
        ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def check(self) -> None:
        """Raise if the store is unreachable (readiness probe)."""
        ...


class LocalObjectStore:
    """Objects as files under one directory; writes go through a temp file and an atomic link."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic create-if-absent: fails if the key exists
            except FileExistsError:
                if path.read_bytes() != data:
                    raise ObjectConflict(f"{key} exists with different content") from None
                return False
            return True
        finally:
            os.unlink(tmp)

    def put_content_addressed(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        _check_digest(key, data)
        self.put_if_absent(key, data, content_type)  # a local existence check costs nothing

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"{self.root} is not writable")


class S3ObjectStore:
    """Any S3 server through the official ``minio`` client.

    Create-if-absent is stat-then-put: minio-py's ``put_object`` cannot send ``If-None-Match: *`` (it
    rewrites unknown headers to ``x-amz-meta-*``). The race between stat and put is harmless for
    content-addressed keys (two writers put identical bytes); the stat compares size and SHA-256 (kept in
    the object's metadata) so a different object under the same key is reported, not overwritten silently.
    """

    _SHA_META = "sha256"

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
    ) -> None:
        from minio import Minio

        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        self.bucket = bucket
        if create_bucket and not self.client.bucket_exists(bucket):
            from minio.error import S3Error

            try:
                self.client.make_bucket(bucket)
            except S3Error as exc:  # another process created it in between
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _stat(self, key: str) -> object | None:
        from minio.error import S3Error

        try:
            return self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                return None
            raise

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        _check_key(key)
        digest = sha256_hex(data)
        stat = self._stat(key)
        if stat is not None:
            meta = {k.lower(): v for k, v in (getattr(stat, "metadata", None) or {}).items()}
            stored_sha = meta.get(f"x-amz-meta-{self._SHA_META}")
            if getattr(stat, "size", None) != len(data) or (stored_sha is not None and stored_sha != digest):
                raise ObjectConflict(f"{key} exists with different content")
            return False
        self._put(key, data, content_type, digest)
        return True

    def put_content_addressed(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        self._put(_check_key(key), data, content_type, _check_digest(key, data))

    def _put(self, key: str, data: bytes, content_type: str, digest: str) -> None:
        """One PUT, with the SHA-256 kept in the object's metadata for later conflict checks."""
        self.client.put_object(
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={self._SHA_META: digest},
        )

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, _check_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        return self._stat(_check_key(key)) is not None

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, _check_key(key))

    def check(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise OSError(f"bucket {self.bucket} does not exist")


def make_object_store(settings: StorageSettings) -> ObjectStore:
    """The object store the settings name."""
    if settings.backend == "s3":
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        return S3ObjectStore(
            settings.endpoint,
            settings.access_key,
            secret,
            settings.bucket,
            secure=settings.secure,
            region=settings.region,
        )
    return LocalObjectStore(settings.local_dir)
