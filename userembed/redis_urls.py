"""A Redis URL as it may be shown: `redacted(url)` for every log line, error and status line.

    redacted("redis://app:s%40cret@redis:6379/0")   # -> "redis://app:***@redis:6379/0"

The password (in the userinfo or a `password=` query option) is replaced by `***`; the user
name, host, port and database stay, so a reader still sees which Redis and which ACL user.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redacted(url: str) -> str:
    """`url` without its password (a string that does not parse loses everything after //)."""
    try:
        u = urlsplit(url)
    except ValueError:
        return url.split("//", 1)[0] + "//" + MASK
    netloc = u.netloc
    creds, at, hostport = netloc.rpartition("@")
    if at and ":" in creds:
        netloc = f"{creds.partition(':')[0]}:{MASK}@{hostport}"
    elif at and creds:  # redis://secret@host: a password written without its ":" is common
        netloc = f"{MASK}@{hostport}"
    query = _QUERY_PASSWORD.sub(rf"\1\2{MASK}", u.query)
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))
