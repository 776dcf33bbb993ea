"""What a command or a benchmark printed: every one ends with one JSON object on its last line."""

from __future__ import annotations

import json
from typing import Any


def last_json(printed: str) -> Any:
    """The JSON object on the last non-empty line of `printed`."""
    return json.loads(printed.strip().splitlines()[-1])
