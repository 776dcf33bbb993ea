"""Who published a model: an optional ed25519 signature over a registry version's manifest.

manifest.json pins every file of a version by sha256 and size, so a signature over its exact
bytes covers the whole version. The export job signs with a private key that only it mounts;
the loaders (server, refresh) hold the public key and refuse a version whose manifest is
unsigned or signed by another key (UntrustedModelError). A public key cannot sign, so a
compromised loader cannot publish. Without a verifying key nothing is checked.

    <root>/<model>/<version>/manifest.sig   {"algorithm": "ed25519", "key_id": "<16 hex>",
                                             "signature": "<base64 of 64 bytes>"}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), as openssl writes them:

    openssl genpkey -algorithm ed25519 -out signing.pem
    openssl pkey -in signing.pem -pubout -out verify.pem

Settings: `userembed.paths.model_signing_key()` / `model_verify_key()` (environment).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from userembed.errors import InvalidInputError, UntrustedModelError

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"


def key_id(public: Ed25519PublicKey) -> str:
    """Short name of a public key (sha256 of its raw bytes): says which key signed what."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"{what} {path}: cannot read it ({e.strerror})") from e


class ManifestSigner:
    """Signs manifests with an ed25519 private key (the export job's)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.key_id = key_id(key.public_key())

    @classmethod
    def from_pem(cls, path: str | Path) -> ManifestSigner:
        data = _read_pem(path, "signing key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"signing key {path}: not an unencrypted PEM key ({e})") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidInputError(f"signing key {path}: not an ed25519 private key")
        return cls(key)

    def sign(self, manifest_bytes: bytes) -> bytes:
        """The content of manifest.sig for these exact manifest bytes."""
        signature = base64.b64encode(self.key.sign(manifest_bytes)).decode()
        doc = {"algorithm": ALGORITHM, "key_id": self.key_id, "signature": signature}
        return (json.dumps(doc, indent=2) + "\n").encode()


class ManifestVerifier:
    """Checks manifests against one ed25519 public key (the loaders')."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key = key
        self.key_id = key_id(key)

    @classmethod
    def from_pem(cls, path: str | Path) -> ManifestVerifier:
        data = _read_pem(path, "verifying key")
        if b"PRIVATE KEY" in data:
            # Least privilege: a loader that holds the private key could sign what it loads.
            raise InvalidInputError(
                f"verifying key {path}: a private key; give the loaders the public key only "
                "(openssl pkey -in signing.pem -pubout)"
            )
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise InvalidInputError(f"verifying key {path}: not a PEM public key ({e})") from e
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidInputError(f"verifying key {path}: not an ed25519 public key")
        return cls(key)

    def verify(self, manifest_bytes: bytes, signature_file: bytes | None, where: str) -> None:
        """UntrustedModelError unless `signature_file` (manifest.sig, None when absent) is this
        key's signature of `manifest_bytes`."""
        if signature_file is None:
            raise UntrustedModelError(
                f"{where}: unsigned ({SIGNATURE_FILE} is missing; key {self.key_id} is required)"
            )
        try:
            doc = json.loads(signature_file)
            signature = base64.b64decode(doc["signature"], validate=True)
            algorithm, signer = doc["algorithm"], doc.get("key_id", "?")
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise UntrustedModelError(f"{where}: {SIGNATURE_FILE} is unreadable ({e})") from e
        if algorithm != ALGORITHM:
            raise UntrustedModelError(f"{where}: signed with {algorithm!r}, not {ALGORITHM}")
        try:
            self.key.verify(signature, manifest_bytes)
        except InvalidSignature as e:
            raise UntrustedModelError(
                f"{where}: the signature does not verify with key {self.key_id} "
                f"(signed by key {signer}, or the manifest changed after signing)"
            ) from e
