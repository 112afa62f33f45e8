"""clip_stage.core.config: the one dataclass <-> argparse helper every stage's CLI uses."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from clip_stage.core.config import add_dataclass_args, dataclass_from_args, field_docs


@dataclass(frozen=True)
class Opts:
    name: str = "x"
    """the name"""
    steps: int | None = 10
    """optional step cap"""
    augment: bool = True
    """use augmentation"""
    mode: Literal["a", "b"] = "a"
    """one of two modes"""
    sizes: tuple[int, ...] = (1, 2)
    """several sizes"""


def _parse(argv, base=None, prefix=""):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts, prefix=prefix)
    return dataclass_from_args(Opts, parser.parse_args(argv), prefix=prefix, base=base)


def test_flags_defaults_and_recipe_precedence():
    assert _parse([]) == Opts()
    assert _parse(["--steps", "none", "--no-augment"]) == Opts(steps=None, augment=False)
    assert _parse(["--augment", "false", "--mode", "b", "--sizes", "3", "4"]) == Opts(augment=False, mode="b", sizes=(3, 4))
    assert _parse(["--augment"]) == Opts(augment=True)
    # a recipe fills what the command line did not give; the command line wins
    assert _parse(["--name", "cli"], base={"name": "yaml", "steps": 5}) == Opts(name="cli", steps=5)
    assert _parse(["--x-steps", "3"], prefix="x_") == Opts(steps=3)


def test_bad_values_are_refused_with_the_field_named(capsys):
    for argv in (["--mode", "c"], ["--steps", "ten"], ["--augment", "maybe"]):
        with pytest.raises(SystemExit):
            _parse(argv)
    err = capsys.readouterr().err
    assert "--mode" in err and "--steps" in err and "--augment" in err
    with pytest.raises(ValueError, match="unknown Opts fields"):
        _parse([], base={"nmae": "typo"})


def test_help_comes_from_field_docstrings():
    assert field_docs(Opts)["steps"] == "optional step cap"
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts)
    text = parser.format_help()
    assert "optional step cap (default: 10)" in text and "--no-augment" not in text  # the alias is hidden
