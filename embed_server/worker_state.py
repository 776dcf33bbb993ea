"""What the worker parent (embed_server/workers.py) and its workers (worker_process.py) share:
the states of a worker's slot in the shared array and the features factory's type."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from embed_server.settings import ServerSettings

if TYPE_CHECKING:
    from embed_server.online_features import OnlineFeatureSource

STARTING, STARTED, SERVING_STATE = 0, 1, 2  # a worker's slot in the shared state array

FeaturesFactory = Callable[[ServerSettings], "OnlineFeatureSource"]
