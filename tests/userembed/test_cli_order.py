"""Every `userembed` command, run in a shuffled order in a fresh USEREMBED_HOME, answers one line:
exit non-zero where its input is missing, the line names what is missing and the command that
makes it, and no traceback reaches the user (each command is its own process, as typed).

Not run here: `demo` and `data build` of a built-in source, which need nothing and make
everything (tests/test_demo.py runs the demo); `data build` runs with a missing input instead.
"""

from __future__ import annotations

import argparse
import html
import os
import random
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from userembed.commands import main as cli

ROOT = Path(__file__).resolve().parents[2]
PRODUCERS = {"demo"}  # need nothing, make everything: not "run too early" by construction
COMMAND_TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    missing: bool = True  # exit non-zero; False: an answer (an empty listing), exit 0
    says: str = r"'userembed [a-z]"  # the line must match this (the command that makes it)


def _cases(home: Path) -> list[Case]:
    absent = str(home.parent / "absent")
    return [
        Case(("data", "build", "--source", "parquet", "--events", f"{absent}/e.parquet",
              "--users-file", f"{absent}/u.parquet", "--labels", f"{absent}/l.parquet"),
             says=re.escape(absent)),
        Case(("data", "build", "--source", "movielens", "--path", absent), says=re.escape(absent)),
        Case(("feast", "apply")),
        Case(("feast", "materialize")),
        Case(("feast", "online", "--user-id", "1")),
        Case(("train",)),
        Case(("train", "--nproc", "2")),
        Case(("export", "--run", str(home / "runs" / "r1"))),
        Case(("registry", "list"), missing=False),
        Case(("registry", "list", "supermoe")),
        Case(("registry", "inspect", "supermoe")),
        Case(("registry", "alias", "supermoe", "prod", "latest")),
        Case(("refresh",)),
        Case(("rollback",)),
        Case(("rollback", "--list"), missing=False),
        Case(("check",)),
        Case(("embed", "--user-id", "1")),
        Case(("similar", "1")),
        Case(("models",)),
        Case(("health",)),
        Case(("forget", "--release", "1"), missing=False, says=r"^released 0 of 1 users"),
        Case(("push", f"{absent}/rows.parquet"), says=re.escape(absent)),
    ]  # fmt: skip


def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[str]:
    """'data build', 'feast apply', 'train', ...: every runnable command of the CLI."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {" ".join(prefix)}
    out: set[str] = set()
    for name, child in subs[0].choices.items():
        out |= _leaf_commands(child, (*prefix, name))
    return out


def _words(argv: tuple[str, ...]) -> str:
    words = []
    for w in argv:
        if w.startswith("-"):
            break
        words.append(w)
    return " ".join(words[:2] if words[0] in ("data", "feast", "registry") else words[:1])


@pytest.fixture
def fresh_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USEREMBED_")}
    env |= {
        "USEREMBED_HOME": str(tmp_path / "home"),
        "REDIS_URL": redis_url,
        "USEREMBED_TARGET": f"127.0.0.1:{free_port()}",  # nothing listens there
        "PYTHONPATH": str(ROOT),
    }
    return env


def _run(argv: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userembed.commands", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def _serve_first_line(env: dict[str, str]) -> str:
    """`serve` waits for a model (health NOT_SERVING); its first line says what it waits for."""
    argv = [sys.executable, "-m", "userembed.commands", "serve", "--port", "0"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        return proc.stderr.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ui_front_page(env: dict[str, str]) -> str:
    """`ui` starts like `serve`; its front page says what is missing."""
    argv = [sys.executable, "-m", "userembed.commands", "ui", "--port", "0"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = re.search(r"http://\S+/", proc.stdout.readline())
        assert url, "userembed ui printed no address"
        with urllib.request.urlopen(url.group(0), timeout=30) as reply:
            return html.unescape(reply.read().decode())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_cases_cover_every_command(tmp_path: Path) -> None:
    covered = {_words(c.argv) for c in _cases(tmp_path / "home")} | {"serve", "status", "ui"}
    assert _leaf_commands(cli.build_parser()) - PRODUCERS == covered


@pytest.mark.timeout(900)
def test_every_command_in_any_order_answers_one_line(fresh_env: dict[str, str]) -> None:
    home = Path(fresh_env["USEREMBED_HOME"])
    cases: list[Case | str] = [*_cases(home), "serve", "status", "ui"]
    seed = random.randrange(1 << 30)
    random.Random(seed).shuffle(cases)
    order = [c if isinstance(c, str) else " ".join(c.argv) for c in cases]
    where = f"seed {seed}, order {order}"
    for case in cases:
        if case == "serve":
            line = _serve_first_line(fresh_env)
            assert "NOT_SERVING" in line and "'userembed export" in line, (line, where)
            continue
        if case == "ui":
            page = _ui_front_page(fresh_env)
            assert "run 'userembed export --run RUN_DIR' first" in page, (page, where)
            continue
        if case == "status":
            proc = _run(("status",), fresh_env)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.stderr, where)
            assert proc.stdout.splitlines()[-1] == "next: userembed data build", where
            continue
        assert isinstance(case, Case)
        proc = _run(case.argv, fresh_env)
        text = (proc.stdout + proc.stderr).strip()
        lines = text.splitlines()
        shown = f"`userembed {' '.join(case.argv)}` -> rc {proc.returncode}: {text[-2000:]}"
        assert "Traceback" not in text, f"{shown} ({where})"
        assert len(lines) == 1, f"{shown} ({where})"
        assert (proc.returncode != 0) == case.missing, f"{shown} ({where})"
        assert re.search(case.says, lines[0]), f"{shown} ({where})"
    # Nothing was made along the way: the data set is still the first thing to make.
    final = _run(("status", "--json"), fresh_env)
    assert '"next": "userembed data build"' in final.stdout, final.stdout


def test_an_unexpected_error_is_one_line_and_its_traceback_shows_with_v(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("disk on fire")

    parser = cli.build_parser()
    real_parse = parser.parse_args

    def parse(argv: list[str] | None = None) -> argparse.Namespace:
        args = real_parse(argv)
        args.func = broken
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["registry", "list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: disk on fire (-v shows the traceback)"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["-v", "registry", "list"])


def test_a_redis_that_does_not_answer_is_one_line(fresh_env: dict[str, str]) -> None:
    env = fresh_env | {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = _run(("rollback",), env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Redis does not answer" in proc.stderr and "REDIS_URL" in proc.stderr
