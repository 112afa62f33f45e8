"""Helpers for dataclass configs that flow from the command line, shared by every stage's CLI.

A config field's docstring (the string literal under it, litgpt-style) is its `--help` text; Python
does not keep attribute docstrings at runtime, so `field_docs` reads them from the class source.
`add_dataclass_args` / `dataclass_from_args` turn a dataclass into `--field-name` options and back,
letting a YAML recipe fill what the command line did not give.

Flags are kebab-case (`--batch-size`), and the snake_case spelling of LLaVA's and transformers' scripts
(`--batch_size`, `--model_name_or_path`) is read as the same flag: `add_dataclass_args` registers it as a
hidden alias, and `ArgumentParser` (a drop-in for argparse's) does the same for any hand-written parser.
Either way `--help` lists each flag once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal


def dash_flags(argv: list[str], known) -> list[str]:
    """`argv` with each `--snake_case` option written `--snake-case` where only the dashed form is `known`.

    Only option tokens are rewritten (a value after `=` keeps its underscores); tokens after a bare `--`,
    unknown options and options that really contain `_` are left alone, so the parser's own error still
    names what the user typed.
    """
    out = list(argv)
    for i, tok in enumerate(out):
        if tok == "--":
            break
        if not tok.startswith("--") or "_" not in tok:
            continue
        name, eq, value = tok.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        if name not in known and dashed in known:
            out[i] = dashed + eq + value
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that also takes `--foo_bar` for a `--foo-bar` option (LLaVA / HF users type underscores).

    The argv is normalised before parsing (`dash_flags`) rather than every option being added twice, so
    `--help` stays one line per option; subparsers made with `add_subparsers` are of this class too.
    """

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        # argparse keeps its option table in this attribute since Python 2.7; no public accessor exists
        return super().parse_known_args(dash_flags(args, self._option_string_actions), namespace)


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of a dataclass, by field name.

    Inherited fields are included (base classes first, so a subclass's docstring wins).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _arg_type(tp) -> tuple[Any, tuple | None, str | None]:
    """(argparse type, choices, nargs) of a field's resolved annotation."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is Literal:
        return type(args[0]), tuple(args), None
    if origin in (list, tuple):
        elem = args[0] if args else str
        return elem, None, "+"
    if args and origin is not None:  # Optional[X] / X | None
        return _arg_type(args[0])
    return tp, None, None


def str2bool(s: str) -> bool:
    """A flag value as a boolean (true/false, yes/no, on/off, 1/0, any case)."""
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _none_or(convert):
    """An optional field's converter: 'none' / 'null' / '' give None (a flag cannot otherwise unset a value)."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", title: str | None = None,
                       exclude: tuple[str, ...] = ()) -> argparse._ArgumentGroup:
    """Adds one `--{prefix}{field-name}` option per field of `cls` (help from its docstring).

    Booleans take `--flag [BOOL]` and `--no-flag`; optional fields take `none` for None. Defaults are left
    as SUPPRESS so `dataclass_from_args` can tell "not given" from "given" and let a YAML recipe fill what
    the command line did not. A field with `_` in its name also answers to `--{prefix}{field_name}` (hidden
    from `--help`), so the helpers work the same in any parser class.
    """
    group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, choices, nargs = _arg_type(hints[f.name])
        nullable = type(None) in typing.get_args(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        name = prefix + f.name
        dashed = name.replace("_", "-")
        spellings = [dashed] + ([name] if name != dashed else [])  # the snake_case twin is hidden from --help
        for k, spelling in enumerate(spellings):
            shown = help_text if k == 0 else argparse.SUPPRESS
            if tp is bool:
                group.add_argument("--" + spelling, dest=name, type=_none_or(str2bool) if nullable else str2bool,
                                   nargs="?", const=True, default=argparse.SUPPRESS, metavar="BOOL", help=shown)
                group.add_argument("--no-" + spelling, dest=name, action="store_false", default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)
            else:
                # A list option given twice keeps both lists (`--report-to wandb --report-to mlflow`).
                group.add_argument("--" + spelling, dest=name, type=_none_or(tp) if nullable and choices is None else tp,
                                   choices=choices, nargs=nargs, action="extend" if nargs else "store",
                                   default=argparse.SUPPRESS, help=shown)
    return group


def dataclass_from_args(cls, namespace: argparse.Namespace | dict, prefix: str = "",
                        base: dict[str, Any] | None = None):
    """Builds `cls` from `base` (e.g. a YAML recipe section) overridden by the options given on the command line."""
    values = dict(base or {})
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name in names:
        if prefix + name in given:
            values[name] = given[prefix + name]
            if typing.get_origin(hints[name]) is tuple and isinstance(values[name], list):
                values[name] = tuple(values[name])
    return cls(**values)


def asdict(obj) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (what checkpoints store as JSON)."""
    return dataclasses.asdict(obj)


def build_groups_parser(groups: dict[str, type], prog: str | None = None,
                        description: str | None = None) -> argparse.ArgumentParser:
    """argparse options for every field of the dataclasses in `groups`, plus `--config FILE`.

    Flags are the bare field names (`--lr`, not `--optim.lr`), so field names are unique across groups.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML/JSON file of {group: {field: value}} or flat {field: value}; flags override it")
    for group, cls in groups.items():
        add_dataclass_args(parser, cls, title=group)
    return parser


def _load_file(path: str, groups: dict[str, type]) -> dict[str, dict[str, Any]]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text) or {}
    out: dict[str, dict[str, Any]] = {g: {} for g in groups}
    by_field = {f.name: g for g, cls in groups.items() for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key in groups and isinstance(value, dict):
            out[key].update(value)
        elif key.replace("-", "_") in by_field:
            out[by_field[key.replace("-", "_")]][key.replace("-", "_")] = value
        else:
            raise ValueError(f"{path}: unknown option {key!r}")
    return out


def parse_groups(groups: dict[str, type], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> dict[str, Any]:
    """Parses argv (plus an optional --config file) into one instance per dataclass in `groups`."""
    parser = build_groups_parser(groups, prog, description)
    ns = parser.parse_args(argv)
    values = _load_file(ns.config, groups) if ns.config else {g: {} for g in groups}
    try:
        return {g: dataclass_from_args(cls, ns, base=values[g]) for g, cls in groups.items()}
    except (TypeError, ValueError, KeyError) as e:
        parser.error(str(e))
        raise  # unreachable
