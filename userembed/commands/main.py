"""The one console CLI: `userembed <command> ...`.

Each area registers its subcommands from its own module in this package
(`register(subparsers)`); handlers are thin wrappers over typed functions of trainer/,
embed_server/, refresh/ and the contract, which tests call directly. Those are imported inside
the handlers, so `userembed --help` stays fast and an image without torch runs every serving
command.

A command run before its inputs exist answers one line naming what is missing and the command
that makes it (userembed.prerequisites), exit 2. An unexpected error is one line too, exit 1;
`-v` shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

import redis

from userembed.commands import (
    check,
    data,
    demo,
    forget,
    push,
    refresh,
    registry,
    serve,
    status,
    train,
    ui,
)
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
    status,  # status: every stage and the next command
    check,  # check: train/serve consistency for a sample of users
    ui,  # ui: the read-only web page
    forget,  # forget: a user's vectors, online features and index entries, and a tombstone
    push,  # push: fresh behaviour online; stored vectors recomputed at their next read
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
        logger.debug("%s", type(e).__name__, exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except redis.ConnectionError as e:
        logger.debug("Redis connection", exc_info=True)
        print(
            f"error: Redis does not answer ({e}): start redis-server, or set REDIS_URL",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            raise
        print(
            f"error: unexpected {type(e).__name__}: {e} (-v shows the traceback)", file=sys.stderr
        )
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
