"""The model manifest: what a registry entry holds and how to check it (`manifest.json`).

The manifest is the contract between the trainer and the server (no shared Python objects):
it names the ONNX file of every variant with its sha256 and size (and those of its external
data files), the encoder's input and output names, the vector's dim/dtype/normalisation, the
input rules (`userembed.features.InputSpec`), the task names, the evaluation metrics, the
training config and the export's parity figures. Light imports only (json, hashlib): the server
reads it without torch or onnx.

Example: see docs/registry.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from userembed.errors import CorruptModelError
from userembed.features import LONG_TERM_INPUT, PROFILE_INPUT, InputSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

USER_VECTOR_OUTPUT = "user_vector"
TASK_SCORES_OUTPUT = "task_scores"
VARIANTS: tuple[str, ...] = ("fp32", "fp16", "int8")
NORMALIZATIONS: tuple[str, ...] = ("l2", "none")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """sha256 of a local file, read in 1 MiB chunks (tables can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_relpath(path: str) -> str:
    """A manifest path must stay inside its version folder: relative, posix, no '..'."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path:
        raise ValueError(f"path {path!r} must be relative to the version folder, without '..'")
    return path


@dataclass(frozen=True)
class FileEntry:
    """One file of a registry entry, relative to the version folder."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, base_dir: str | Path, relpath: str) -> FileEntry:
        """Hash a local file `base_dir/relpath` into an entry."""
        full = Path(base_dir) / check_relpath(relpath)
        return cls(path=relpath, sha256=sha256_file(full), size=full.stat().st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class OnnxVariant:
    """One ONNX file of the encoder (fp32 always; fp16/int8 optional)."""

    name: str  # "fp32" | "fp16" | "int8"
    file: FileEntry
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # "user_vector" first, "task_scores" optional
    external_data: tuple[FileEntry, ...] = ()  # tables stored beside the .onnx (> 2 GB protobuf)

    def files(self) -> tuple[FileEntry, ...]:
        return (self.file, *self.external_data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file.to_dict(),
            "external_data": [e.to_dict() for e in self.external_data],
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }


@dataclass(frozen=True)
class VectorSpec:
    dim: int
    dtype: str = "float32"
    normalization: str = "l2"  # "l2": unit vectors, cosine == dot product; "none"


@dataclass(frozen=True)
class Manifest:
    """Everything a registry entry says about itself. `version` and `created_at` are set on
    publish (`Registry.publish`); a manifest built by the exporter may leave them empty."""

    model_name: str
    vector: VectorSpec
    input_spec: InputSpec
    variants: tuple[OnnxVariant, ...]
    version: str = ""
    created_at: str = ""  # UTC ISO 8601, e.g. 2026-11-28T19:30:00Z
    task_names: tuple[str, ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)  # from the evaluation report
    training_config: Mapping[str, Any] = field(default_factory=dict)
    parity: Mapping[str, Any] = field(default_factory=dict)  # export checks, per variant
    attachments: tuple[FileEntry, ...] = ()  # report.json, plots
    format_version: int = FORMAT_VERSION
    # The item attribute map (userembed.items) of a model with item attributes: versioned
    # with the model, read by the server and the refresh; None (absent key) without them.
    item_attributes: FileEntry | None = None

    def variant(self, name: str = "fp32") -> OnnxVariant:
        for v in self.variants:
            if v.name == name:
                return v
        have = ", ".join(v.name for v in self.variants)
        raise CorruptModelError(f"model {self.ref}: no ONNX variant '{name}' (has: {have})")

    @property
    def ref(self) -> str:
        return f"{self.model_name}/{self.version or '<unpublished>'}"

    def all_files(self) -> tuple[FileEntry, ...]:
        out: list[FileEntry] = []
        for v in self.variants:
            out.extend(v.files())
        out.extend(self.attachments)
        out.extend(self.model_files())
        return tuple(out)

    def model_files(self) -> tuple[FileEntry, ...]:
        """Files beside the ONNX variants that computing a vector needs (the item attribute
        map); a loader verifies them with the variant it loads."""
        return (self.item_attributes,) if self.item_attributes is not None else ()

    def with_version(self, version: str, created_at: str | None = None) -> Manifest:
        return replace(self, version=version, created_at=created_at or utc_now_iso())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_name": self.model_name,
            "version": self.version,
            "created_at": self.created_at,
            "vector": {
                "dim": self.vector.dim,
                "dtype": self.vector.dtype,
                "normalization": self.vector.normalization,
            },
            "input_spec": self.input_spec.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
            "task_names": list(self.task_names),
            "metrics": dict(self.metrics),
            "training_config": dict(self.training_config),
            "parity": dict(self.parity),
            "attachments": [a.to_dict() for a in self.attachments],
            # Only with item attributes: a manifest without them stays as it was.
            **(
                {"item_attributes": self.item_attributes.to_dict()}
                if self.item_attributes is not None
                else {}
            ),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "manifest") -> Manifest:
        """Parse and validate; any problem raises CorruptModelError naming the key."""
        return _parse(d, source)


def single_onnx_manifest(
    model_name: str,
    directory: str | Path,
    input_spec: InputSpec,
    dim: int,
    *,
    filename: str = "encoder.onnx",
    normalization: str = "none",
) -> Manifest:
    """A minimal manifest for one fp32 ONNX file in `directory` (hashed now): outputs
    `user_vector` only. For hand-built encoders (tests, benchmarks); the exporter writes the
    full manifest (tasks, metrics, parity, variants)."""
    return Manifest(
        model_name=model_name,
        vector=VectorSpec(dim=dim, normalization=normalization),
        input_spec=input_spec,
        variants=(
            OnnxVariant(
                name="fp32",
                file=FileEntry.of(directory, filename),
                inputs=tuple(f.name for f in input_spec.sequence_features)
                + (PROFILE_INPUT,)
                + ((LONG_TERM_INPUT,) if input_spec.long_term else ()),
                outputs=("user_vector",),
            ),
        ),
    )


def parse_manifest(text: str | bytes, source: str = "manifest") -> Manifest:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{source}: not valid JSON ({e})") from e
    return _parse(d, source)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a local `manifest.json` (or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    try:
        text = p.read_bytes()
    except FileNotFoundError as e:
        raise CorruptModelError(f"{p}: manifest missing") from e
    return parse_manifest(text, str(p))


def save_manifest(manifest: Manifest, directory: str | Path) -> Path:
    p = Path(directory) / MANIFEST_FILE
    p.write_text(manifest.to_json())
    return p


# --- validation -------------------------------------------------------------------------------


class _Checker:
    """Reads typed keys from a dict; errors name the key path (`variants[0].file.sha256`)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> CorruptModelError:
        return CorruptModelError(f"{self.source}: '{where}' {problem}")

    def get(self, d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(d, Mapping):
            raise self.fail(where.rsplit(".", 1)[0] or where, "is not an object")
        if key not in d:
            raise self.fail(where, "is missing")
        v = d[key]
        # bool is an int in Python: refuse it where a count is expected.
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise self.fail(where, f"must be {names}, got {type(v).__name__}")
        return v

    def file(self, d: Any, where: str) -> FileEntry:
        path = self.get(d, "path", str, f"{where}.path")
        try:
            check_relpath(path)
        except ValueError as e:
            raise self.fail(f"{where}.path", str(e)) from e
        sha = self.get(d, "sha256", str, f"{where}.sha256")
        if not _SHA256.match(sha):
            raise self.fail(f"{where}.sha256", "must be 64 lowercase hex digits")
        size = self.get(d, "size", int, f"{where}.size")
        if size < 0:
            raise self.fail(f"{where}.size", "must be >= 0")
        return FileEntry(path=path, sha256=sha, size=size)

    def names(self, d: Any, key: str, where: str) -> tuple[str, ...]:
        items = self.get(d, key, list, where)
        if not all(isinstance(x, str) and x for x in items):
            raise self.fail(where, "must be a list of non-empty strings")
        return tuple(items)


def _parse(d: Any, source: str) -> Manifest:
    c = _Checker(source)
    fv = c.get(d, "format_version", int, "format_version")
    if fv != FORMAT_VERSION:
        raise c.fail("format_version", f"is {fv}; this reader understands {FORMAT_VERSION}")
    model_name = c.get(d, "model_name", str, "model_name")
    if not model_name:
        raise c.fail("model_name", "is empty")
    version = c.get(d, "version", str, "version")
    created_at = c.get(d, "created_at", str, "created_at")

    vec = c.get(d, "vector", dict, "vector")
    dim = c.get(vec, "dim", int, "vector.dim")
    if dim <= 0:
        raise c.fail("vector.dim", "must be > 0")
    dtype = c.get(vec, "dtype", str, "vector.dtype")
    norm = c.get(vec, "normalization", str, "vector.normalization")
    if norm not in NORMALIZATIONS:
        raise c.fail("vector.normalization", f"must be one of {NORMALIZATIONS}")

    spec_d = c.get(d, "input_spec", dict, "input_spec")
    try:
        input_spec = InputSpec.from_dict(spec_d)
    except (KeyError, TypeError, ValueError) as e:
        raise c.fail("input_spec", f"is invalid ({type(e).__name__}: {e})") from e

    variants: list[OnnxVariant] = []
    for i, vd in enumerate(c.get(d, "variants", list, "variants")):
        w = f"variants[{i}]"
        name = c.get(vd, "name", str, f"{w}.name")
        if name not in VARIANTS:
            raise c.fail(f"{w}.name", f"must be one of {VARIANTS}")
        ext = c.get(vd, "external_data", list, f"{w}.external_data")
        outputs = c.names(vd, "outputs", f"{w}.outputs")
        if not outputs or outputs[0] != USER_VECTOR_OUTPUT:
            raise c.fail(f"{w}.outputs", f"must start with '{USER_VECTOR_OUTPUT}'")
        variants.append(
            OnnxVariant(
                name=name,
                file=c.file(c.get(vd, "file", dict, f"{w}.file"), f"{w}.file"),
                inputs=c.names(vd, "inputs", f"{w}.inputs"),
                outputs=outputs,
                external_data=tuple(
                    c.file(e, f"{w}.external_data[{j}]") for j, e in enumerate(ext)
                ),
            )
        )
    names = [v.name for v in variants]
    if "fp32" not in names:
        raise c.fail("variants", "has no 'fp32' variant")
    if len(set(names)) != len(names):
        raise c.fail("variants", f"repeats a variant name: {names}")

    attachments = tuple(
        c.file(a, f"attachments[{i}]")
        for i, a in enumerate(c.get(d, "attachments", list, "attachments"))
    )
    if input_spec.item_attributes and "item_attributes" not in d:
        raise c.fail("item_attributes", "is missing: the input spec reads item attributes")
    return Manifest(
        format_version=fv,
        model_name=model_name,
        version=version,
        created_at=created_at,
        vector=VectorSpec(dim=dim, dtype=dtype, normalization=norm),
        input_spec=input_spec,
        variants=tuple(variants),
        task_names=c.names(d, "task_names", "task_names"),
        metrics=c.get(d, "metrics", dict, "metrics"),
        training_config=c.get(d, "training_config", dict, "training_config"),
        parity=c.get(d, "parity", dict, "parity"),
        attachments=attachments,
        item_attributes=(
            c.file(d["item_attributes"], "item_attributes") if "item_attributes" in d else None
        ),
    )
