"""User ids: one canonical spelling per user, the only form any key is built from.

A user id is an int64 >= 0 (the Feast entity key, userembed.schema). Where it travels as text
(gRPC requests, the CLI, Redis vector keys `ue:<model>:<ev>:{<user_id>}`) only its canonical
decimal form is accepted: ASCII digits 0-9, no sign, no spaces, no `_`, no leading zeros ("0"
itself is fine). Other spellings of the same number ("042", "+42", " 42", "4_2", full-width
"４２") are refused, not normalised: each would otherwise be its own Redis key (issue #21), and
Python's `int()` alone accepts them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from userembed.errors import InvalidInputError

MAX_USER_ID = 2**63 - 1
_MAX_DIGITS = len(str(MAX_USER_ID))  # 19


def parse_user_id(text: str) -> int:
    """The user id `text` spells; InvalidInputError unless it is the canonical decimal form."""
    n = len(text)
    # the hot path (every id of every request): one int() and no exception when valid
    if 0 < n <= _MAX_DIGITS and text.isascii() and text.isdigit() and (n == 1 or text[0] != "0"):
        value = int(text)
        if value <= MAX_USER_ID:
            return value
    if text.isascii() and text.isdigit() and text[0] != "0":
        raise InvalidInputError(f"user id {text!r} is outside 0..2^63-1")
    raise InvalidInputError(
        f"user id {text!r} is not a canonical decimal integer (digits 0-9 only: no sign, "
        "spaces, '_' or leading zeros)"
    )


def format_user_ids(user_ids: Sequence[int] | np.ndarray) -> list[str]:
    """Integer user ids (a parquet column, a list) -> their canonical text, the form keys use.
    InvalidInputError for a negative id (int64 cannot exceed the upper bound)."""
    values = np.asarray(user_ids, dtype=np.int64)
    if values.size and int(values.min()) < 0:
        raise InvalidInputError(f"user id {int(values.min())} is outside 0..2^63-1")
    return [str(v) for v in values.tolist()]
