"""The one console CLI: `userembed <command> ...`.

Each area registers its subcommands from its own module in this package
(`register(subparsers)`); handlers are thin wrappers over typed functions of trainer/,
embed_server/, refresh/ and the contract, which tests call directly. Those are imported inside
the handlers, so `userembed --help` stays fast and an image without torch runs every serving
command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from userembed.commands import data, demo, refresh, registry, serve, train
from userembed.commands.logs import configure_logging
from userembed.errors import UserEmbedError

logger = logging.getLogger(__name__)

# Modules that contribute subcommands, in help order.
COMMAND_MODULES: tuple[ModuleType, ...] = (
    data,  # data build, feast apply / materialize / online
    train,  # train, export
    registry,  # registry list / inspect / alias
    serve,  # serve, embed, models, health
    refresh,  # refresh, rollback
    demo,  # demo: the main job end to end
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userembed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


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
