"""Where the platform keeps its local state (data, Feast registry, model registry, runs).

Everything lives under one workspace folder, `$USEREMBED_HOME` (default: `./var`), so a demo
run is one folder to inspect or delete. Production points the pieces elsewhere with their own
environment variables (REDIS_URL, USEREMBED_REGISTRY_ROOT, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

# File names of a built data set: raw tables under data_dir(), Feast offline tables under
# offline_dir() (userembed.snapshots writes them, feature_repo/ and the refresh read them).
EVENTS_FILE = "events.parquet"
USERS_FILE = "users.parquet"
LABELS_FILE = "labels.parquet"
BEHAVIOR_FILE = "behavior.parquet"
PROFILE_FILE = "profile.parquet"
ITEMS_FILE = "items.parquet"  # optional (userembed.items): absent when the build had none

REPO_ROOT = Path(__file__).resolve().parent.parent
FEATURE_REPO = Path(os.environ.get("USEREMBED_FEATURE_REPO", REPO_ROOT / "feature_repo"))


def home() -> Path:
    return Path(os.environ.get("USEREMBED_HOME", Path.cwd() / "var")).resolve()


def data_dir() -> Path:
    """Raw tables + spec.json of the current data set (`userembed data build`)."""
    return home() / "data"


def runs_dir() -> Path:
    """Training runs, one folder each (trainer.run_dir.RunDir)."""
    return home() / "runs"


def offline_dir() -> Path:
    """Parquet files of the Feast offline store (profile.parquet, behavior.parquet)."""
    return Path(os.environ.get("USEREMBED_OFFLINE_DIR", home() / "offline"))


def registry_root() -> str:
    """Model registry root: a local path or any fsspec URL."""
    return os.environ.get("USEREMBED_REGISTRY_ROOT", str(home() / "models"))


def similar_root() -> Path:
    """Where the refresh stores and the server loads the similar-users indexes
    (userembed.similar_index)."""
    return Path(os.environ.get("USEREMBED_SIMILAR_ROOT", home() / "similar"))


def redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def model_signing_key() -> str:
    """PEM file of the ed25519 key the export signs manifests with; empty: unsigned
    (userembed.signing). Only the trainer/export job mounts it."""
    return os.environ.get("USEREMBED_MODEL_SIGNING_KEY", "")


def model_verify_key() -> str:
    """PEM file of the ed25519 public key a loader requires on every manifest; empty: no
    check (userembed.signing)."""
    return os.environ.get("USEREMBED_MODEL_VERIFY_KEY", "")
