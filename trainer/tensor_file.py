"""Reading the trainer's torch files (a run's model.pt, its checkpoints) without running code.

`torch.load` unpickles. With `weights_only=True` its unpickler builds tensors and plain
containers (dict, list, tuple, str, numbers) and nothing else, so a file planted in the shared
workspace cannot run code in the next training or export job (issue #29). The writers keep to
that: configs go in as `to_dict()` dicts, sharded tables as their local shard tensors
(trainer/checkpoint.py).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from userembed.errors import UnsafeFileError

logger = logging.getLogger(__name__)


def load_tensor_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict saved at `path`; UnsafeFileError when it holds anything but tensors and plain
    data (a pickle that names a class or a function), which is refused unread."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: refused to load ({_reason(e)})") from e
    if not isinstance(blob, dict):
        raise UnsafeFileError(f"{path}: refused to load (a {type(blob).__name__}, not a dict)")
    return blob


def _reason(e: pickle.UnpicklingError) -> str:
    """torch's one line that says what the file asked for, out of its long message."""
    lines = [s.strip() for s in str(e).splitlines()]
    found = next((s for s in lines if "nsupported" in s), "").split(" was not an allowed")[0]
    what = f": {found}" if found else ""
    return f"it holds more than tensors and plain data{what}"
