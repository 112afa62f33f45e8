"""The one configuration system of every command: typed dataclass sections, a YAML file, and flags.

A command describes its options as frozen dataclasses, one per concern (a *section*: `optim`, `data`...).
A field's docstring (the string literal under it, litgpt-style) is its `--help` text; Python does not keep
attribute docstrings at runtime, so `field_docs` reads them from the class source. `ConfigParser(sections)`
builds the command's parser and `parse_config(argv)` returns one instance per section, filled from, in
increasing precedence: the dataclass defaults, the `--config` file (YAML or JSON), the flags given.

The same rules hold for every command:
- a field `batch_size` of section `optim` is the flag `--batch-size`; a command with several sections
  also takes `--optim.batch-size`, which is the only spelling when two sections share the field name;
- `_` and `-` are the same in option names (`--batch_size`, as LLaVA's and transformers' scripts write it);
- booleans: `--x` or `--x true|false|yes|no|on|off|1|0` sets, `--no-x` clears;
- lists: `--x a b`, `--x a,b` or the flag repeated (the values add up);
- `none` (or `null`, or an empty value) unsets an optional field;
- the file holds one mapping per section (`optim: {lr: 1.0e-4}`); a field whose name no other section
  has may also stand at the top level. Keys take `_` or `-`. A YAML string reads exactly as the same text
  after the flag; a YAML list or mapping given to a text field becomes its comma form (`a,b`, `a=1,b=2`).
Errors are one line with exit status 2: an unknown or malformed flag through the parser (`PROG: error:
...`); an unknown section or key or a bad value in the file (named with the key), or a value a section's
`__post_init__` refuses (named with the section), as a `ConfigError`, a user error for
`clip_stage.core.errors.command_main`.

Why not a library: jsonargparse and tyro build richer parsers but spell flags their own way (jsonargparse
has underscore names and no `--no-x`; tyro prints multi-line error panels) and pull in several packages;
transformers' HfArgumentParser has no sections, no YAML-under-flags and no attribute docstrings, and would
make the data stage import transformers. The rules above fit in this module on top of argparse.

`add_dataclass_args` / `dataclass_from_args` are the single-dataclass building blocks, for a command that
adds a few typed options to a hand-written `ArgumentParser`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

NONE_WORDS = ("none", "null", "")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file and the key."""


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
    """argparse's parser that takes `--foo_bar` for a `--foo-bar` option and reports errors on one line.

    The argv is normalised before parsing (`dash_flags`) rather than every option being added twice, so
    `--help` stays one line per option; subparsers made with `add_subparsers` are of this class too. An
    error is `PROG: error: MESSAGE` and exit status 2, without the usage block (`--help` shows it).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        # argparse keeps its option table in this attribute since Python 2.7; no public accessor exists
        return super().parse_known_args(dash_flags(args, self._option_string_actions), namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def str2bool(s: str) -> bool:
    """A flag value as a boolean (true/false, yes/no, on/off, 1/0, any case)."""
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


# --- one field: its kind, its flag, its YAML value ------------------------------------------------------


@dataclass(frozen=True)
class FieldKind:
    """What a field's annotation means for parsing: a bool, a list, a choice or a plain value."""

    kind: Literal["bool", "list", "choice", "value"]
    elem: Any
    """the value type (of the items, for a list); anything but bool/int/float/str is read as YAML text"""
    nullable: bool
    choices: tuple = ()
    container: type = tuple

    @classmethod
    def of(cls, tp) -> "FieldKind":
        nullable = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = len(rest) < len(typing.get_args(tp))
            tp = rest[0] if len(rest) == 1 else Any
        origin = typing.get_origin(tp)
        if tp is bool:
            return cls("bool", bool, nullable)
        if origin is Literal:
            choices = typing.get_args(tp)
            return cls("choice", type(choices[0]), nullable, choices)
        if origin in (list, tuple) or tp in (list, tuple):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            return cls("list", args[0] if args else str, nullable, container=list if list in (tp, origin) else tuple)
        return cls("value", tp, nullable)

    def item(self, text: str):
        """One command-line token as a value of the field (an item, for a list); raises ArgumentTypeError."""
        if self.elem is bool:
            return str2bool(text)
        if self.elem in (int, float, str):
            try:
                value = self.elem(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self.elem.__name__}, got {text!r}") from None
        else:
            import yaml

            value = yaml.safe_load(text)
        if self.choices and value not in self.choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, self.choices))}")
        return value

    def from_text(self, text: str):
        """A whole flag value (`none`, a comma list, ...) as the field's value."""
        if self.nullable and text.strip().lower() in NONE_WORDS:
            return None
        if self.kind == "list":
            return [self.item(t.strip()) for t in text.split(",") if t.strip()]
        return self.item(text)

    def from_yaml(self, value: Any, where: str):
        """A value read from a config file, checked and converted as its flag would be; ConfigError names `where`."""
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{where}: needs a value (null is not allowed here)")
        try:
            if isinstance(value, str):
                return self.finish(self.from_text(value))
            if self.kind == "list":
                items = value if isinstance(value, (list, tuple)) else [value]
                return self.container(self._scalar(v) for v in items)
            return self._scalar(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def _scalar(self, value: Any):
        if isinstance(value, str):
            return self.item(value)
        if self.elem is str:
            if isinstance(value, dict):  # `type_weights: {street: 1}` -> "street=1"
                return ",".join(f"{k}={v}" for k, v in value.items())
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        elif self.elem is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif self.elem in (bool, int, float) and (not isinstance(value, self.elem) or
                                                   (self.elem is int and isinstance(value, bool))):
            raise TypeError(f"expected {self.elem.__name__}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, self.choices))}")
        return value

    def finish(self, value: Any):
        """A parsed flag value in the field's own container (a list action collects into a list)."""
        return self.container(value) if self.kind == "list" and isinstance(value, list) else value


class _ExtendItems(argparse.Action):
    """A list option: every token may be a comma list, and a repeated flag adds to the earlier values."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for v in values:
            if v is None:  # `--x none`: unset, forgetting what came before
                items = None
            else:
                items = (items or []) + v
        setattr(namespace, self.dest, items)


ALIASES = "aliases"
"""dataclasses.field(metadata={ALIASES: ("out",)}): other flag names of a field, so that one concept has one
name in every command (train-clip's --output-dir also answers to --out, as every other command's output)."""


def field_aliases(f: dataclasses.Field, prefix: str = "") -> list[str]:
    """The extra `--flags` of a field (its metadata's ALIASES, with the section prefix)."""
    return [f"--{prefix}{a}" for a in f.metadata.get(ALIASES, ())]


def _add_field(group, flags: list[str], dest: str, kind: FieldKind, help_text: str, hidden: list[str] = ()) -> None:
    """One field's options: `flags` shown in --help (the first is the main one), `hidden` accepted silently."""
    for names, shown in ((flags, help_text), (list(hidden), argparse.SUPPRESS)):
        if not names:
            continue
        if kind.kind == "bool":
            group.add_argument(*names, dest=dest, type=kind.from_text, nargs="?", const=True, default=argparse.SUPPRESS,
                               metavar="BOOL", help=shown)
            group.add_argument(*("--no-" + n[2:] for n in names), dest=dest, action="store_false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            metavar = "{" + ",".join(map(str, kind.choices)) + "}" if kind.choices else dest.rpartition(".")[2].upper()
            group.add_argument(*names, dest=dest, type=kind.from_text, default=argparse.SUPPRESS, metavar=metavar,
                               help=shown, **({"nargs": "+", "action": _ExtendItems} if kind.kind == "list" else {}))


def _help(doc: str | None, f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if isinstance(default, tuple):
        default = ",".join(map(str, default)) or "none"
    return f"{doc or ''} (default: {default})".strip().replace("%", "%%")


def _title(cls) -> str | None:
    return (cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", title: str | None = None,
                       exclude: tuple[str, ...] = ()) -> argparse._ArgumentGroup:
    """Adds one `--{prefix}{field-name}` option per field of `cls` (help from its docstring).

    Values follow the module's rules. Defaults are left as SUPPRESS so `dataclass_from_args` can tell "not
    given" from "given". A field with `_` in its name also answers to `--{prefix}{field_name}` (hidden from
    `--help`), so the helpers work the same in argparse's own parser class.
    """
    group = parser.add_argument_group(title or cls.__name__, _title(cls))
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        name = prefix + f.name
        dashed = "--" + name.replace("_", "-")
        _add_field(group, [dashed, *field_aliases(f, prefix)], name, FieldKind.of(hints[f.name]),
                   _help(docs.get(f.name), f), hidden=["--" + name] if "--" + name != dashed else [])
    return group


def dataclass_from_args(cls, namespace: argparse.Namespace | dict, prefix: str = "",
                        base: dict[str, Any] | None = None):
    """Builds `cls` from `base` (e.g. a config file's section) overridden by the options given on the command line."""
    values = dict(base or {})
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name in names:
        if prefix + name in given:
            values[name] = FieldKind.of(hints[name]).finish(given[prefix + name])
    return cls(**values)


# --- a command's whole config: sections, a file, flags ---------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One dataclass of a command's config and the name of its YAML section (and `--name.` flag prefix)."""

    name: str
    cls: type


@dataclass(frozen=True)
class ParsedConfig:
    """What `ConfigParser.parse_config` returns: one instance per section, the file used, and other options."""

    sections: dict[str, Any]
    config_file: str | None
    """the config file the values started from (None: defaults and flags only)"""
    args: argparse.Namespace
    """the options the command added by hand (not fields of a section)"""

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def resolve_config_file(name_or_path: str, named_dir: str | Path | None = None) -> Path:
    """A config file path, or (with `named_dir`) the exact name of a `.yaml` file there; else FileNotFoundError."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if named_dir is not None and (Path(named_dir) / f"{name_or_path}.yaml").is_file():
        return Path(named_dir) / f"{name_or_path}.yaml"
    names = sorted(p.stem for p in Path(named_dir).glob("*.yaml")) if named_dir is not None else []
    raise FileNotFoundError(f"{name_or_path}: no such config file" + (f", nor one of {names}" if named_dir else ""))


def load_config_file(path: str | Path, sections: list[Section]) -> dict[str, dict[str, Any]]:
    """The file's values as {section: {field: value}}, checked and converted; unknown keys are ConfigErrors."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    data = {} if data is None else data
    by_section = {_norm(s.name): s for s in sections}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(by_section)}), got {type(data).__name__}")
    counts = Counter(f.name for s in sections for f in dataclasses.fields(s.cls) if f.init)
    by_field = {f.name: s for s in sections for f in dataclasses.fields(s.cls) if f.init and counts[f.name] == 1}
    out: dict[str, dict[str, Any]] = {s.name: {} for s in sections}

    def put(section: Section, key: Any, value: Any) -> None:
        fields = {f.name for f in dataclasses.fields(section.cls) if f.init}
        name = _norm(key)
        where = f"{section.name}.{name}" if len(sections) > 1 else name
        if name not in fields:
            raise ConfigError(f"{path}: unknown field {where!r}; valid: {sorted(fields)}")
        tp = typing.get_type_hints(section.cls)[name]
        out[section.name][name] = FieldKind.of(tp).from_yaml(value, f"{path}: {where}")

    for key, value in data.items():
        k = _norm(key)
        if k in by_section and (isinstance(value, dict) or (value is None and k not in by_field)):
            for fk, fv in (value or {}).items():
                put(by_section[k], fk, fv)
        elif k in by_field:
            put(by_field[k], k, value)
        else:
            raise ConfigError(f"{path}: unknown key {str(key)!r}; valid sections: {sorted(by_section)}"
                              + ("" if len(sections) > 1 else f", fields: {sorted(by_field)}"))
    return out


class ConfigParser(ArgumentParser):
    """A command's parser: `--config FILE` and one option per field of every section (see the module docstring).

    `config_flag` names the file option (`--config`); with `named_configs`, it also takes the exact name of a
    `.yaml` file in that folder (train-llava's shipped recipes). Hand-written options may be added as usual;
    `parse_config` returns them in `ParsedConfig.args`.
    """

    def __init__(self, sections: list[Section] | dict[str, type], prog: str | None = None,
                 description: str | None = None, *, config_flag: str = "--config",
                 named_configs: str | Path | None = None, **kwargs):
        super().__init__(prog=prog, description=description, **kwargs)
        if isinstance(sections, dict):
            sections = [Section(k, v) for k, v in sections.items()]
        self.sections = list(sections)
        self.named_configs = named_configs
        self.config_dest = config_flag.lstrip("-").replace("-", "_")
        names = sorted(p.stem for p in Path(named_configs).glob("*.yaml")) if named_configs else []
        what = (f"a config name ({', '.join(names)}) or a YAML/JSON file" if named_configs
                else "a YAML/JSON file")
        self.add_argument(config_flag, dest=self.config_dest, default=None, metavar="NAME|FILE" if names else "FILE",
                          help=f"{what} with the sections {', '.join(s.name for s in self.sections)}; flags override it")
        self._fields: dict[str, tuple[str, str, FieldKind]] = {}
        counts = Counter(name for s in self.sections for f in dataclasses.fields(s.cls) if f.init
                         for name in (f.name, *(a.replace("-", "_") for a in f.metadata.get(ALIASES, ()))))
        qualified = len(self.sections) > 1
        for s in self.sections:
            group = self.add_argument_group(s.name, _title(s.cls))
            hints = typing.get_type_hints(s.cls)
            docs = field_docs(s.cls)
            for f in dataclasses.fields(s.cls):
                if not f.init:
                    continue
                flag = f.name.replace("_", "-")
                flags = ([f"--{flag}"] if counts[f.name] == 1 else []) + (
                    [f"--{s.name.replace('_', '-')}.{flag}"] if qualified else []) + [
                    a for a in field_aliases(f) if counts[a[2:].replace("-", "_")] == 1]  # unique in the command
                dest = f"{s.name}.{f.name}"
                kind = FieldKind.of(hints[f.name])
                self._fields[dest] = (s.name, f.name, kind)
                _add_field(group, flags, dest, kind, _help(docs.get(f.name), f))

    def parse_config(self, argv: list[str] | None = None) -> ParsedConfig:
        """Defaults < the config file < the flags, one instance per section; errors as the module docstring says."""
        given = vars(self.parse_args(argv))
        name = given.pop(self.config_dest, None)
        path = resolve_config_file(name, self.named_configs) if name else None
        values = load_config_file(path, self.sections) if path else {s.name: {} for s in self.sections}
        extras = {}
        for dest, value in given.items():
            if dest in self._fields:
                section, field_name, kind = self._fields[dest]
                values[section][field_name] = kind.finish(value)
            else:
                extras[dest] = value
        instances = {}
        for s in self.sections:
            try:
                instances[s.name] = s.cls(**values[s.name])
            except (TypeError, ValueError, KeyError) as e:  # KeyError: a registry lookup (clip_stage.core.registry)
                text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                raise ConfigError(f"{s.name}: {text}" if len(self.sections) > 1 else text) from None
        return ParsedConfig(instances, str(path) if path else None, argparse.Namespace(**extras))


def asdict(obj) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (what checkpoints store as JSON)."""
    return dataclasses.asdict(obj)

