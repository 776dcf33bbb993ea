"""The one console CLI: `userembed <command> ...`.

Each area registers its subcommands from its own module (`register(subparsers)`); handlers are
thin wrappers over typed functions that tests call directly. Area modules import heavy
dependencies (torch, feast, onnxruntime) inside their handlers, so `userembed --help` stays fast
and the server image, which has no torch, can run every serving command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from userembed.errors import UserEmbedError

logger = logging.getLogger(__name__)

# Modules that contribute subcommands, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "userembed.pipeline_cli",  # data build, feast apply / materialize / online
    "trainer.cli",  # train, export
    "userembed.registry_cli",  # registry list / inspect / alias
    "embed_server.cli",  # serve, embed, refresh, rollback
    "userembed.demo",  # demo: the main job end to end
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userembed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # The area's package is absent (e.g. an image without trainer/): skip its commands.
            # Anything else missing is a real error and propagates.
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue
            raise
        module.register(sub)
    return parser


# Libraries that log routine chatter at INFO (Feast's registry cache, TorchRec's plans and
# fbgemm's library loads, which come through the root logger): WARNING unless --verbose.
_CHATTY_LOGGERS = ("feast", "torchrec", "fbgemm_gpu", "ray", "urllib3")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        rc = args.func(args)
    except UserEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
