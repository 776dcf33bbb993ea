"""Logging set-up of the entry points: the CLI and the demo (libraries only get loggers)."""

from __future__ import annotations

import logging
import os
import warnings

# Libraries that log routine chatter at INFO (Feast's registry cache, TorchRec's plans,
# fbgemm's library loads, which come through the root logger, and faiss's search for its
# AVX512/AVX2 builds): WARNING unless --verbose.
_CHATTY_LOGGERS = ("feast", "torchrec", "fbgemm_gpu", "ray", "urllib3", "faiss")


def configure_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else os.environ.get("USEREMBED_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    # torch / fbgemm deprecation notices say nothing a user of the CLI can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_libraries() -> None:
    """torchrec and fbgemm log every table at INFO; keep the progress log readable."""
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
