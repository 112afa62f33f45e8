"""Training options of `train-llava` (TrainArgs) and the recipe/flag parser shared by every config group.

A run is described by four dataclasses, one per concern: ModelArgs, TrainablesArgs and DataArgs
(llava_address.config) and TrainArgs (here). A YAML recipe with the sections `model:`, `trainables:`,
`data:` and `train:` stands in for flags; flags given on the command line override it. Every field's
one-line docstring is its `--help`. Flags are the field names with dashes (`--learning-rate`); a name
that two groups share is spelled with its group (`--train.seed`). The snake_case spelling of LLaVA's and
transformers' scripts is the same flag (`--model_name_or_path`, `--train.per_device_batch_size`), and a
boolean takes an optional value as they write it (`--gradient_checkpointing True`, `--no-gradient-checkpointing`).

    train-llava --recipe address_lora --data-path convs.json --output-dir runs/lora
    train-llava --recipe path/to/my_recipe.yaml --learning-rate 1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from clip_stage.core.config import ArgumentParser, str2bool, field_docs

RECIPE_DIR = Path(__file__).with_name("recipes")


@dataclass(frozen=True)
class TrainArgs:
    """Optimisation, schedule, precision, logging and checkpointing of one training run."""

    output_dir: str = "runs/llava"
    """folder for checkpoints (checkpoint-<step>/), TensorBoard logs (tensorboard/), wandb/ and mlruns/ when asked, and metrics.jsonl"""
    learning_rate: float = 2e-4
    """peak learning rate of the LLM / LoRA parameter group"""
    projector_lr: float | None = None
    """peak learning rate of the projector parameter group (default: learning_rate)"""
    vision_lr: float | None = None
    """peak learning rate of the vision tower group when it trains (default: learning_rate)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate schedule after the linear warm-up"""
    warmup_ratio: float = 0.03
    """fraction of the optimizer steps spent in linear warm-up"""
    num_epochs: int = 1
    """passes over the data"""
    max_steps: int | None = None
    """total optimizer steps; overrides num_epochs (the schedule spans exactly these steps)"""
    per_device_batch_size: int = 16
    """samples per process per micro-step"""
    global_batch_size: int | None = None
    """samples per optimizer step over all processes; gradient accumulation is derived from it"""
    gradient_accumulation_steps: int | None = None
    """micro-steps per optimizer step (give this or global_batch_size, not both; default 1)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables); also fills DeepSpeed's "auto" gradient_clipping"""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """autocast precision; default: what `accelerate launch` was given (else no)"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (less memory, about 30% more compute)"""
    seed: int = 42
    """seed of model initialisation of new parts, data order and dropout"""
    save_every: int = 0
    """write a checkpoint every this many optimizer steps (0: only at the end); the last step always saves"""
    save_total_limit: int | None = None
    """keep only the newest this many step checkpoints (default: keep all)"""
    log_every: int = 1
    """log loss, lr, tokens/s and memory every this many optimizer steps"""
    init_from: str | None = None
    """checkpoint folder whose non-LoRA weights (e.g. the aligned projector) start this run (LLaVA's --pretrain_mm_mlp_adapter)"""
    resume: str | None = None
    """checkpoint folder to resume from, or 'latest' for the newest one in output_dir"""
    trust_checkpoint: bool = False
    """allow a DeepSpeed --resume from outside output_dir (DeepSpeed unpickles its shards: only your own)"""
    stop_at_step: int | None = None
    """checkpoint and exit once this optimizer step is reached, without changing the schedule (time-sliced jobs)"""
    num_workers: int = 0
    """DataLoader worker processes"""
    report_to: tuple[str, ...] = ("tensorboard",)
    """trackers besides metrics.jsonl, a comma list or the flag repeated: tensorboard (output_dir/tensorboard), wandb (offline under output_dir/wandb unless WANDB_MODE is set), mlflow (file store output_dir/mlruns unless MLFLOW_TRACKING_URI is set), or none"""
    progress_bar: bool = True
    """show a tqdm progress bar on rank 0"""

    def __post_init__(self) -> None:
        from clip_stage.core.trackers import parse_report_to

        # a string (older checkpoints' configs, Python callers) or a list of comma lists -> checked names
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("projector_lr", "vision_lr"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.global_batch_size is not None and self.gradient_accumulation_steps is not None:
            raise ValueError("give global_batch_size or gradient_accumulation_steps, not both")
        if self.global_batch_size is not None and self.global_batch_size < self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} < per_device_batch_size {self.per_device_batch_size}"
            )
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.save_every < 0 or self.log_every < 1:
            raise ValueError("save_every must be >= 0 and log_every >= 1")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1, got {self.stop_at_step}")

    def accumulation_for(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` processes (exact: a global batch must divide)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x {world_size} processes"
            )
        return self.global_batch_size // per_step

    def total_steps(self, micro_batches_per_epoch: int, accumulation: int) -> int:
        """Optimizer steps of the whole run (the length of the lr schedule)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(micro_batches_per_epoch / accumulation)) * self.num_epochs


# --------------------------------------------------------------------------------------------
# dataclasses <-> flags and YAML
# --------------------------------------------------------------------------------------------


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, name: str):
    """(argparse type, choices, nargs) for a field annotation."""
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = list(typing.get_args(tp))
        kind = type(choices[0])
        return kind, choices, None
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else str
        return inner, None, "*"
    if tp in (int, float, str):
        return tp, None, None
    if tp is bool:
        return bool, None, None
    # Anything else (dicts, nested types) is YAML text on the command line.
    return yaml.safe_load, None, None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts a YAML value against a field annotation (ints accepted for floats)."""
    if value is None:
        return None
    base, _ = _strip_optional(tp)
    origin = typing.get_origin(base)
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if base in (int, str, bool, float) and not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise TypeError(f"{where}: expected {base.__name__}, got {value!r}")
    if origin is Literal and value not in typing.get_args(base):
        raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(base))}")
    if origin is tuple and isinstance(value, str):
        value = [value]  # `report_to: wandb` in a recipe: a one-item list
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    return value


@dataclass(frozen=True)
class ConfigGroup:
    """One dataclass of the run config and the YAML section / flag prefix it lives under."""

    section: str
    cls: type


def build_parser(groups: list[ConfigGroup], prog: str, description: str) -> tuple[argparse.ArgumentParser, dict]:
    """An argparse parser with one flag per field of every group; returns it and dest -> (section, field)."""
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument(
        "--recipe",
        default=None,
        help=f"a recipe name ({', '.join(list_recipes()) or 'none found'}) or a YAML file; flags override it",
    )
    seen: dict[str, int] = {}
    for g in groups:
        for f in dataclasses.fields(g.cls):
            seen[f.name] = seen.get(f.name, 0) + 1
    dests: dict[str, tuple[str, str]] = {}
    for g in groups:
        hints = typing.get_type_hints(g.cls)
        docs = field_docs(g.cls)
        arg_group = parser.add_argument_group(g.section, (g.cls.__doc__ or "").strip().splitlines()[0] if g.cls.__doc__ else None)
        for f in dataclasses.fields(g.cls):
            if not f.init:
                continue
            flag = f.name.replace("_", "-")
            flags = [f"--{g.section}.{flag}"]
            if seen[f.name] == 1:
                flags.insert(0, f"--{flag}")
            dest = f"{g.section}__{f.name}"
            dests[dest] = (g.section, f.name)
            tp = hints[f.name]
            conv, choices, nargs = _converter(tp, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
            help_text = docs.get(f.name, "")
            help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
            help_text = help_text.replace("%", "%%")
            if conv is bool:  # `--flag`, `--flag true|false` (LLaVA's scripts write `--bf16 True`) and `--no-flag`
                arg_group.add_argument(*flags, dest=dest, type=_none_or(str2bool, _strip_optional(tp)[1]), nargs="?",
                                       const=True, metavar="BOOL", help=help_text)
                arg_group.add_argument(*(f"--no-{f[2:]}" for f in flags), dest=dest, action="store_false",
                                       help=argparse.SUPPRESS)
            else:
                # A list option given twice keeps both lists (`--report-to wandb --report-to mlflow`).
                arg_group.add_argument(
                    *flags, dest=dest, type=_none_or(conv, _strip_optional(tp)[1]), choices=choices, nargs=nargs,
                    action="extend" if nargs else "store", help=help_text, metavar=None if choices else f.name.upper(),
                )
    return parser, dests


def _none_or(conv, optional: bool):
    if not optional:
        return conv

    def parse(text: str):
        return None if text.lower() in ("none", "null") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def list_recipes() -> list[str]:
    """Names of the recipes shipped in llava_address/recipes/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name (exact) or a path to a YAML file; an unknown name lists the valid ones."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = RECIPE_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"unknown recipe {name_or_path!r}: not a file, and not one of {list_recipes()}")


def load_recipe(name_or_path: str, groups: list[ConfigGroup]) -> dict[str, dict[str, Any]]:
    """The recipe's sections as {section: {field: value}}; unknown sections or fields are errors."""
    path = resolve_recipe(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    by_section = {g.section: g for g in groups}
    out: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in by_section:
            raise ValueError(f"{path}: unknown section {section!r}; valid: {sorted(by_section)}")
        values = values or {}
        g = by_section[section]
        names = {f.name: f for f in dataclasses.fields(g.cls)}
        hints = typing.get_type_hints(g.cls)
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"{path}: unknown field {section}.{key}; valid: {sorted(names)}")
            out.setdefault(section, {})[key] = _coerce(value, hints[key], f"{path}: {section}.{key}")
    return out


def parse_config(
    groups: list[ConfigGroup], argv: list[str] | None, prog: str, description: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str | None]:
    """Parses argv over an optional recipe; returns ({section: dataclass instance}, the merged values, recipe path)."""
    parser, dests = build_parser(groups, prog, description)
    ns = vars(parser.parse_args(argv))
    recipe = ns.pop("recipe", None)
    values = load_recipe(recipe, groups) if recipe else {}
    for dest, value in ns.items():
        section, name = dests[dest]
        values.setdefault(section, {})[name] = value
    instances = {}
    for g in groups:
        kwargs = values.get(g.section, {})
        try:
            instances[g.section] = g.cls(**kwargs)
        except (TypeError, ValueError) as e:
            parser.error(f"{g.section}: {e}")
    return instances, values, str(resolve_recipe(recipe)) if recipe else None


def to_plain(obj: Any) -> Any:
    """A dataclass instance as JSON-friendly dicts/lists (for checkpoints and logs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_plain(cls: type, data: dict[str, Any]) -> Any:
    """Rebuilds a dataclass written by `to_plain`, ignoring fields a newer/older version does not have."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            continue
        base, _ = _strip_optional(hints[k])
        if typing.get_origin(base) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)
