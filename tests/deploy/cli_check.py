"""Run a deployment file's command line through the real CLI parser, strictly.

Strict: no abbreviated options (argparse would accept `--run` for `--run-dir`, hiding a rename),
and the argv must reach a subcommand that has a handler.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Sequence
from functools import cache

# Programs that run the one CLI's code in the images and scripts.
CLI = "userembed"
TORCHRUN = "torchrun"


def _no_abbrev(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbrev(sub)


@cache
def strict_parser() -> argparse.ArgumentParser:
    from userembed.commands.main import build_parser

    parser = build_parser()
    _no_abbrev(parser)
    return parser


def parse_error(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> str | None:
    """None when `userembed argv` parses to a runnable command (or is a --help), else why not."""
    parser = parser or strict_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(list(argv))
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):
            return None
        return err.getvalue().strip().splitlines()[-1] if err.getvalue() else f"exit {e.code}"
    if not callable(getattr(args, "func", None)):
        return "no handler: the argv names a command group, not a command"
    return None


def torchrun_split(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """torchrun's own options (parsed by torch's parser) and the CLI argv it launches."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(list(argv[1:]))
    return args, [args.training_script, *args.training_script_args]
