"""Signed, versioned artefacts: model bundles and SKU galleries.

A bundle is a directory (or a .tar.gz of one) holding its files, `manifest.json` (name, kind, version,
input spec, thresholds, calibration, training data, metrics, and the sha256 and size of every file) and
`manifest.sig` (an ed25519 signature of the manifest bytes). The loader verifies the signature against
trusted keys and every file against the manifest before anything is used: a tampered, truncated or
unsigned bundle is refused with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.errors import BundleError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT_VERSION = 1


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    except ImportError as exc:  # pragma: no cover - cryptography is in the edge and cloud extras
        raise BundleError("the cryptography package is needed to verify bundles") from exc
    return InvalidSignature, serialization, Ed25519PrivateKey, Ed25519PublicKey


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_signing_key(private_path: Path) -> str:
    """Write a new ed25519 private key (PEM) and its public key (`.pub`, base64); returns the key id."""
    _, serialization, priv_cls, _ = _crypto()
    priv = priv_cls.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(
        priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private_path.with_suffix(".pub").write_text(base64.b64encode(raw).decode() + "\n")
    return key_id(raw)


def load_public_keys(paths: list[Path]) -> dict[str, bytes]:
    """Trusted keys by key id, from `.pub` files (base64 of the raw 32-byte ed25519 key)."""
    keys = {}
    for p in paths:
        try:
            raw = base64.b64decode(Path(p).read_text().strip(), validate=True)
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read public key {p}: {exc}") from exc
        if len(raw) != 32:
            raise BundleError(f"{p} is not an ed25519 public key")
        keys[key_id(raw)] = raw
    return keys


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _private_key(path: Path):
    _, serialization, _, _ = _crypto()
    priv = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    return priv, priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_key_of(private_key_path: Path) -> dict[str, bytes]:
    """The public half of a signing key, in the form `verify_bundle` takes trusted keys."""
    _, raw = _private_key(private_key_path)
    return {key_id(raw): raw}


def sign_bundle(directory: Path, manifest: dict, private_key_path: Path) -> dict:
    """Hash every file in `directory`, write the manifest and its signature. Returns the manifest."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE):
            files[rel] = {"sha256": _sha256(p), "size": p.stat().st_size}
    if not files:
        raise BundleError(f"{directory} holds no files to bundle")
    for required in ("name", "kind", "version"):
        if required not in manifest:
            raise BundleError(f"manifest needs {required!r}")
    priv, raw = _private_key(private_key_path)
    full = {**manifest, "format_version": FORMAT_VERSION, "files": files, "key_id": key_id(raw)}
    body = json.dumps(full, indent=2, sort_keys=True).encode() + b"\n"
    (directory / MANIFEST).write_bytes(body)
    (directory / SIGNATURE).write_text(base64.b64encode(priv.sign(body)).decode() + "\n")
    return full


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: dict

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.manifest['name']} {self.version} has no file {name!r}")
        return self.path / name


def verify_bundle(
    path: Path, trusted_keys: dict[str, bytes], kind: str | None = None, extract_to: Path | None = None
) -> VerifiedBundle:
    """Verify a bundle directory or .tar.gz; raises BundleError naming what is wrong."""
    invalid_signature, _, _, pub_cls = _crypto()
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        path = _extract(path, extract_to)
    if not path.is_dir():
        raise BundleError(f"bundle {path} not found")
    try:
        body = (path / MANIFEST).read_bytes()
        sig = base64.b64decode((path / SIGNATURE).read_text().strip(), validate=True)
    except FileNotFoundError as exc:
        raise BundleError(
            f"{path}: missing {Path(exc.filename).name}: unsigned or incomplete bundle"
        ) from exc
    except ValueError as exc:
        raise BundleError(f"{path}: signature file is not base64") from exc
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise BundleError(f"{path}: manifest is not valid JSON") from exc
    kid = manifest.get("key_id")
    if kid not in trusted_keys:
        raise BundleError(f"{path}: signed by key {kid!r}, which is not trusted here")
    try:
        pub_cls.from_public_bytes(trusted_keys[kid]).verify(sig, body)
    except invalid_signature:
        raise BundleError(f"{path}: bad signature: the manifest was changed after signing") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')} is not supported")
    if kind is not None and manifest.get("kind") != kind:
        raise BundleError(f"{path}: expected a {kind} bundle, got {manifest.get('kind')!r}")
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{path}: file {rel} is missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise BundleError(
                f"{path}: {rel} is {size} bytes, the manifest says {meta['size']} (truncated or tampered)"
            )
        if _sha256(f) != meta["sha256"]:
            raise BundleError(f"{path}: {rel} does not match its sha256 (tampered or corrupt)")
    return VerifiedBundle(path, manifest)


def pack_bundle(directory: Path, archive: Path) -> Path:
    """A .tar.gz of a signed bundle directory, for download by devices."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(Path(directory).rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(directory).as_posix())
    return archive


def _extract(archive: Path, target: Path | None) -> Path:
    out = Path(target) if target else Path(tempfile.mkdtemp(prefix="bundle-"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(out, filter="data")  # refuses absolute paths, links out, devices
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive}: not a readable bundle archive ({exc})") from exc
    return out
