"""The model registry: versioned ONNX encoders with their manifests, on any fsspec filesystem.

Layout (root = `userembed.paths.registry_root()` by default: a local path or any fsspec URL):

    <root>/<model>/<version>/manifest.json     written last: a version exists once it is there
    <root>/<model>/<version>/manifest.sig      with a signing key: who published it (signing.py)
    <root>/<model>/<version>/<files>           ONNX file(s), external data, report.json, plots
    <root>/<model>/aliases/<alias>             text file holding one version id

Version ids sort by time: `20261128T193000Z-<6 hex>` (UTC second of publishing, then the first
hex digits of the fp32 ONNX file's sha256). `latest` is moved on every publish; other aliases
(`prod`, `canary`, ...) are moved with `set_alias`. Readers load with `load_verified`, which
checks the manifest and the sha256 and size of every file it hands out and refuses a corrupt
entry with one CorruptModelError. With a verifying key (`verify_key`, default
$USEREMBED_MODEL_VERIFY_KEY) every manifest read must carry that key's signature, else
UntrustedModelError (a CorruptModelError); with a signing key (`signing_key`, default
$USEREMBED_MODEL_SIGNING_KEY) `publish` signs. Light imports only (no torch, no onnx): the server
uses this.

    reg = Registry()                                   # or Registry("s3://bucket/models")
    m = reg.publish(manifest, staging_dir)             # -> manifest with version set
    reg.set_alias("supermoe", "prod", m.version)
    loaded = reg.load_verified("supermoe", "prod")     # -> LoadedModel
    ort.InferenceSession(loaded.session_source())
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import fsspec
from fsspec.implementations.local import LocalFileSystem

from userembed import paths
from userembed.errors import CorruptModelError, InvalidInputError, ModelNotFoundError
from userembed.items import ItemAttributeMap
from userembed.manifest import (
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    OnnxVariant,
    parse_manifest,
    sha256_file,
)
from userembed.signing import SIGNATURE_FILE, ManifestSigner, ManifestVerifier

logger = logging.getLogger(__name__)

# The model name every command defaults to (export --model-name, refresh, rollback, demo).
DEFAULT_MODEL = "supermoe"
LATEST = "latest"
ALIASES_DIR = "aliases"
VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
# Model names also appear in Redis keys (userembed.vectors): no braces, ':' or spaces.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_CHUNK = 1 << 20


def new_version_id(content_sha256: str, now: datetime | None = None, salt: int = 0) -> str:
    """`YYYYmmddTHHMMSSZ-<6 hex>`: sortable by time; the hex comes from the model content."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if salt:
        content_sha256 = hashlib.sha256(f"{content_sha256}:{salt}".encode()).hexdigest()
    return f"{now:%Y%m%dT%H%M%SZ}-{content_sha256[:6]}"


def check_model_name(name: str) -> str:
    if not MODEL_NAME_RE.match(name):
        raise InvalidInputError(
            f"model name {name!r} must match {MODEL_NAME_RE.pattern} (letters, digits, . _ -)"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias):
        raise InvalidInputError(f"alias {alias!r} must match {ALIAS_RE.pattern}")
    return alias


@dataclass(frozen=True)
class LoadedModel:
    """A verified registry entry, ready for onnxruntime.

    `onnx_path` is a local file beside its external data files (in place for a local registry,
    a download folder otherwise); `onnx_bytes` are the exact bytes whose sha256 was checked.
    """

    manifest: Manifest
    variant: OnnxVariant
    local_dir: Path
    onnx_path: Path
    onnx_bytes: bytes
    temporary: bool = False  # local_dir is a download folder made for this load

    def release(self) -> None:
        """Delete the download folder, if this load made one. Call it once the onnxruntime
        session exists: the session holds the model (and its external data) in memory."""
        if self.temporary:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    @property
    def model_name(self) -> str:
        return self.manifest.model_name

    @property
    def version(self) -> str:
        return self.manifest.version

    def items(self) -> ItemAttributeMap | None:
        """The verified item attribute map (userembed.items) of a model with item attributes,
        None without; read it before `release()`."""
        entry = self.manifest.item_attributes
        return None if entry is None else ItemAttributeMap.load(self.local_dir / entry.path)

    def session_source(self) -> bytes | str:
        """What to pass to `onnxruntime.InferenceSession`: the verified bytes when the model is
        one file; the local path when external data files must be found beside it."""
        return str(self.onnx_path) if self.variant.external_data else self.onnx_bytes


class Registry:
    """A model registry at `root` (local path or fsspec URL, e.g. `memory://reg`, `s3://b/m`).

    `verify_key` / `signing_key`: PEM paths (None: from the environment, "": none); an
    unreadable or wrong key fails here, at start, not at the first load."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        verify_key: str | None = None,
        signing_key: str | None = None,
        **storage_options: Any,
    ) -> None:
        self.root = str(root) if root is not None else paths.registry_root()
        self.fs, base = fsspec.core.url_to_fs(self.root, **storage_options)
        self._base = base.rstrip("/") or "/"
        self._local = isinstance(self.fs, LocalFileSystem)
        verify_key = paths.model_verify_key() if verify_key is None else verify_key
        signing_key = paths.model_signing_key() if signing_key is None else signing_key
        self.verifier = ManifestVerifier.from_pem(verify_key) if verify_key else None
        self.signer = ManifestSigner.from_pem(signing_key) if signing_key else None

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # --- paths ---------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self._base.rstrip("/"), *parts])

    def version_dir(self, model: str, version: str) -> str:
        return self._path(model, version)

    def _names(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(str(e).rstrip("/")).name for e in entries)

    # --- listing -------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Model names with at least one published version, sorted."""
        return [
            m
            for m in self._names(self._base)
            if MODEL_NAME_RE.match(m) and self._published_versions(m)
        ]

    def _published_versions(self, model: str) -> list[str]:
        return [
            v
            for v in self._names(self._path(model))
            if VERSION_RE.match(v) and self.fs.exists(self._path(model, v, MANIFEST_FILE))
        ]

    def list_versions(self, model: str) -> list[str]:
        """Published versions of `model`, oldest first (ids sort by publish time)."""
        versions = self._published_versions(check_model_name(model))
        if not versions:
            raise ModelNotFoundError(f"unknown model '{model}' in registry {self.root}")
        return versions

    def aliases(self, model: str) -> dict[str, str]:
        """alias -> version id."""
        out = {}
        for a in self._names(self._path(check_model_name(model), ALIASES_DIR)):
            if ALIAS_RE.match(a):
                out[a] = self._read_alias(model, a)
        return out

    def _read_alias(self, model: str, alias: str) -> str:
        return self.fs.cat_file(self._path(model, ALIASES_DIR, alias)).decode().strip()

    # --- references ----------------------------------------------------------------------

    def resolve(self, model: str, ref: str = LATEST) -> str:
        """An alias or a version id -> the version id; ModelNotFoundError when absent."""
        check_model_name(model)
        if VERSION_RE.match(ref):
            if not self.fs.exists(self._path(model, ref, MANIFEST_FILE)):
                self._raise_not_found(model, f"has no version '{ref}'")
            return ref
        check_alias(ref)
        try:
            version = self._read_alias(model, ref)
        except FileNotFoundError:
            self._raise_not_found(model, f"has no alias '{ref}'")
        if not VERSION_RE.match(version) or not self.fs.exists(
            self._path(model, version, MANIFEST_FILE)
        ):
            raise ModelNotFoundError(
                f"model '{model}': alias '{ref}' points to '{version}', which is not published"
            )
        return version

    def _raise_not_found(self, model: str, what: str) -> NoReturn:
        if not self._published_versions(model):
            raise ModelNotFoundError(f"unknown model '{model}' in registry {self.root}")
        raise ModelNotFoundError(f"model '{model}' {what} in registry {self.root}")

    def set_alias(self, model: str, alias: str, ref: str) -> str:
        """Point `alias` at `ref` (a version id or another alias); returns the version id."""
        version = self.resolve(model, ref)
        self._write_text(self._path(model, ALIASES_DIR, check_alias(alias)), version + "\n")
        logger.info("alias %s/%s -> %s", model, alias, version)
        return version

    def _write_text(self, path: str, text: str) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self._local:
            # Readers must never see a half-written alias: write beside it, then rename.
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, text.encode())  # one PUT: atomic on object stores

    # --- publish -------------------------------------------------------------------------

    def publish(
        self,
        manifest: Manifest,
        source_dir: str | os.PathLike[str],
        *,
        now: datetime | None = None,
        aliases: tuple[str, ...] = (LATEST,),
    ) -> Manifest:
        """Copy the files named by `manifest` from local `source_dir` into a new version.

        The files are checked against the manifest first (nothing corrupt gets published),
        manifest.json is written last, then `aliases` (default: latest) move to the new version.
        Returns the manifest as stored (version and created_at set).
        """
        model = check_model_name(manifest.model_name)
        src = Path(source_dir)
        problems = [p for e in manifest.all_files() if (p := _check_local(src, e))]
        if problems:
            raise CorruptModelError(f"refusing to publish {model}: " + "; ".join(problems))
        now = (now or datetime.now(UTC)).astimezone(UTC)
        content = manifest.variant("fp32").file.sha256
        salt = 0
        while True:
            version = new_version_id(content, now, salt)
            if not self.fs.exists(self._path(model, version)):
                break
            salt += 1  # same weights published twice within one second
        published = manifest.with_version(version, now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        vdir = self.version_dir(model, version)
        for e in manifest.all_files():
            target = f"{vdir}/{e.path}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(src / e.path), target)
        manifest_bytes = published.to_json().encode()
        if self.signer is not None:  # before the manifest: a version is complete once it is there
            self.fs.pipe_file(f"{vdir}/{SIGNATURE_FILE}", self.signer.sign(manifest_bytes))
        self.fs.pipe_file(f"{vdir}/{MANIFEST_FILE}", manifest_bytes)
        for a in aliases:
            self.set_alias(model, a, version)
        logger.info("published %s/%s (%d files)", model, version, len(manifest.all_files()))
        return published

    # --- reading -------------------------------------------------------------------------

    def read_manifest(self, model: str, ref: str = LATEST) -> Manifest:
        """The manifest of `ref`, validated (no file checks: see load_verified)."""
        version = self.resolve(model, ref)
        return self._read_manifest_at(model, version)

    def _read_manifest_at(self, model: str, version: str) -> Manifest:
        source = f"{self.root}/{model}/{version}/{MANIFEST_FILE}"
        data = self.fs.cat_file(self._path(model, version, MANIFEST_FILE))
        if self.verifier is not None:
            try:
                signature = self.fs.cat_file(self._path(model, version, SIGNATURE_FILE))
            except FileNotFoundError:
                signature = None
            self.verifier.verify(data, signature, f"model {model}/{version}")
        m = parse_manifest(data, source)
        if m.model_name != model or m.version != version:
            raise CorruptModelError(
                f"{source}: names {m.model_name}/{m.version}, but lies at {model}/{version}"
            )
        return m

    def load_verified(
        self,
        model: str,
        ref: str = LATEST,
        variant: str = "fp32",
        download_dir: str | os.PathLike[str] | None = None,
    ) -> LoadedModel:
        """Resolve, read the manifest, check sha256 and size of the variant's ONNX file, its
        external data and the attachments; return the verified model or raise ONE
        CorruptModelError listing every problem. Unknown model/ref: ModelNotFoundError.

        A local registry is verified in place; another filesystem is downloaded to
        `download_dir` while hashing (default: a new temporary folder, which
        `LoadedModel.release()` deletes, and a refused load deletes at once).
        """
        version = self.resolve(model, ref)
        m = self._read_manifest_at(model, version)
        v = m.variant(variant)
        vdir = self.version_dir(model, version)
        temporary = not self._local and download_dir is None
        if self._local:
            local_dir = Path(vdir)
        else:
            local_dir = Path(download_dir or tempfile.mkdtemp(prefix=f"userembed-{model}-"))
        problems: list[str] = []
        onnx_bytes = b""
        for e in (*v.files(), *m.attachments, *m.model_files()):
            remote = f"{vdir}/{e.path}"
            keep = e is v.file
            try:
                digest, size, data = self._hash_remote(remote, local_dir / e.path, keep)
            except FileNotFoundError:
                problems.append(f"{e.path} is missing")
                continue
            if size != e.size:
                problems.append(f"{e.path} has {size} bytes, manifest says {e.size}")
            elif digest != e.sha256:
                problems.append(f"{e.path} sha256 {digest[:12]}... != manifest {e.sha256[:12]}...")
            if keep:
                onnx_bytes = data
        if problems:
            if temporary:
                shutil.rmtree(local_dir, ignore_errors=True)
            raise CorruptModelError(
                f"model {model}/{version} ({variant}) is corrupt: " + "; ".join(problems)
            )
        n = len(v.files()) + len(m.attachments) + len(m.model_files())
        logger.info("loaded %s/%s %s (verified %d files)", model, version, variant, n)
        return LoadedModel(
            manifest=m,
            variant=v,
            local_dir=local_dir,
            onnx_path=local_dir / v.file.path,
            onnx_bytes=onnx_bytes,
            temporary=temporary,
        )

    def _hash_remote(self, remote: str, local: Path, keep: bool) -> tuple[str, int, bytes]:
        """Stream a file once: hash it, copy it to `local` unless the registry is local, and
        keep its bytes when asked (the main ONNX file)."""
        h = hashlib.sha256()
        size = 0
        kept: list[bytes] = []
        out = None
        if not self._local:
            local.parent.mkdir(parents=True, exist_ok=True)
            out = open(local, "wb")  # closed in finally
        try:
            with self.fs.open(remote, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if keep:
                        kept.append(chunk)
                    if out is not None:
                        out.write(chunk)
        finally:
            if out is not None:
                out.close()
        return h.hexdigest(), size, b"".join(kept)


def _check_local(base: Path, e: FileEntry) -> str | None:
    p = base / e.path
    if not p.is_file():
        return f"{e.path} is missing"
    if p.stat().st_size != e.size:
        return f"{e.path} has {p.stat().st_size} bytes, manifest says {e.size}"
    if sha256_file(p) != e.sha256:
        return f"{e.path} sha256 does not match the manifest"
    return None
