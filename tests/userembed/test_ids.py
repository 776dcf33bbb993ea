"""One canonical spelling per user id (userembed.ids), in the library and at the CLI's doors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from userembed.commands import main as cli
from userembed.errors import InvalidInputError
from userembed.ids import MAX_USER_ID, format_user_ids, parse_user_id

# Spellings of user 42 that Python's int() accepts (issue #21), and a few it does not.
OTHER_SPELLINGS = [
    "042",
    "+42",
    " 42",
    "42 ",
    "42\n",
    "4_2",
    "４２",  # full-width digits
    "٤٢",  # Arabic-Indic digits
    "0" * 30 + "42",
    "-42",
    "-0",
    "42.0",
    "0x2a",
    "",
]


def test_the_canonical_spelling_parses() -> None:
    assert parse_user_id("42") == 42
    assert parse_user_id("0") == 0
    assert parse_user_id(str(MAX_USER_ID)) == MAX_USER_ID


@pytest.mark.parametrize("text", OTHER_SPELLINGS)
def test_every_other_spelling_is_refused(text: str) -> None:
    with pytest.raises(InvalidInputError, match="canonical|outside"):
        parse_user_id(text)


def test_ids_beyond_int64_are_refused_without_parsing_huge_numbers() -> None:
    with pytest.raises(InvalidInputError, match="outside"):
        parse_user_id(str(MAX_USER_ID + 1))
    with pytest.raises(InvalidInputError, match="outside"):
        parse_user_id("9" * 5000)  # int() itself refuses more than 4300 digits


def test_integer_ids_format_to_the_canonical_spelling() -> None:
    assert format_user_ids(np.array([0, 42, MAX_USER_ID], dtype=np.int64)) == [
        "0",
        "42",
        str(MAX_USER_ID),
    ]
    assert format_user_ids([7]) == ["7"]
    with pytest.raises(InvalidInputError, match="outside"):
        format_user_ids(np.array([3, -1]))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("USEREMBED_FEAST_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.mark.parametrize(
    "argv",
    [
        ["feast", "online", "--user-id", "42", "042"],
        ["embed", "--user-id", "+42", "--target", "127.0.0.1:1"],
    ],
    ids=["feast-online", "embed"],
)
def test_the_cli_refuses_other_spellings_in_one_line_before_any_backend(
    home: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by the id rule itself: not a missing Feast registry, not an unreachable server."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a canonical decimal integer" in err, err
