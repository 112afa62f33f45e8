"""Typed configuration of the LLaVA stage, grouped by concern: model, trainable parts, data.

Each field's docstring is its `--help` text. `add_dataclass_args` turns a dataclass into argparse options
(`--field-name`, optionally prefixed) and `dataclass_from_args` builds the dataclass back from the parsed
namespace, so `train-llava`, `merge` and YAML recipes share one definition. Checks live in `__post_init__`;
the dataclasses are frozen: derive a new one with `dataclasses.replace`, never mutate.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Literal

# LLaVA-1.5 applies LoRA to every linear layer of the LLM (attention and MLP), never to the lm_head,
# the projector or the vision tower. The regex is matched by peft against the FULL module path
# (`re.fullmatch`), so the CLIP tower's own `q_proj`/`v_proj` can never be selected.
DEFAULT_LORA_TARGET_REGEX = (
    r"(.*\.)?language_model\.(model\.)?layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelArgs:
    """Which LLaVA to build: a complete HF LLaVA checkpoint, or one composed from a tower and an LLM."""

    model_name_or_path: str | None = None
    """Hub id or folder of a HF LLaVA checkpoint (LlavaForConditionalGeneration + processor), e.g. llava-hf/llava-1.5-7b-hf."""
    llm: str | None = None
    """Compose instead: hub id or folder of a Vicuna/Llama causal LM (with its tokenizer); needs --vision-tower."""
    vision_tower: str | None = None
    """CLIPVisionModel folder (e.g. the AddressCLIP export) swapped into the base model, or used to compose one."""
    projector_hidden_act: str = "gelu"
    """Activation of the 2-layer MLP projector of a freshly built projector (LLaVA-1.5 mlp2x_gelu)."""
    vision_feature_layer: int = -2
    """Vision tower hidden layer fed to the projector when composing (LLaVA-1.5: the penultimate)."""
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    """'default' drops the CLS token (LLaVA-1.5), 'full' keeps it; used when composing."""
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; 'auto' keeps the checkpoint's dtype."""
    attn_implementation: str | None = None
    """Attention kernel: eager, sdpa, flash_attention_2 (None: transformers' default)."""
    load_in_4bit: bool = False
    """QLoRA: load the LLM in 4-bit (bitsandbytes; the vision tower and projector stay unquantised)."""
    load_in_8bit: bool = False
    """Load the LLM in 8-bit (bitsandbytes)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit quantisation type (QLoRA uses NF4)."""
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Compute dtype of 4-bit layers."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (QLoRA default)."""
    device_map: str | None = None
    """device_map for from_pretrained (e.g. 'auto', 'cpu', 'cuda:0'); quantised loads default to the local device."""
    model_max_length: int | None = None
    """Overrides the tokenizer's model_max_length (LLaVA-1.5 trained with 2048)."""

    def __post_init__(self):
        if self.model_name_or_path is None and self.llm is None:
            raise ValueError("give --model-name-or-path (a LLaVA checkpoint) or --llm and --vision-tower (compose)")
        if self.model_name_or_path is not None and self.llm is not None:
            raise ValueError("--model-name-or-path and --llm are exclusive: a LLaVA checkpoint already has its LLM")
        if self.llm is not None and self.vision_tower is None:
            raise ValueError("composing a LLaVA from --llm needs --vision-tower")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit are exclusive")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not one of {DTYPES}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' or 'full'")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass(frozen=True)
class TrainablesArgs:
    """Which parts of LLaVA train, explicitly per component (LLaVA-1.5 LoRA recipe by default)."""

    vision_tower: Literal["frozen", "full"] = "frozen"
    """Vision tower: frozen (LLaVA-1.5) or full fine-tuning."""
    projector: Literal["full", "frozen"] = "full"
    """Multimodal projector: full (trained) or frozen."""
    llm: Literal["lora", "full", "frozen"] = "lora"
    """Language model: LoRA adapters, full fine-tuning or frozen (projector alignment)."""
    lora_r: int = 128
    """LoRA rank (LLaVA-1.5: 128)."""
    lora_alpha: int = 256
    """LoRA alpha (LLaVA-1.5: 256)."""
    lora_dropout: float = 0.05
    """LoRA dropout (LLaVA-1.5: 0.05)."""
    lora_target_regex: str = DEFAULT_LORA_TARGET_REGEX
    """Regex fully matching the module PATHS that get LoRA; must stay inside the language model."""

    def __post_init__(self):
        for name, allowed in (("vision_tower", ("frozen", "full")), ("projector", ("full", "frozen")),
                              ("llm", ("lora", "full", "frozen"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"trainables.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.lora_r <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("LoRA needs r > 0, alpha > 0 and 0 <= dropout < 1")
        if self.vision_tower == "frozen" and self.projector == "frozen" and self.llm == "frozen":
            raise ValueError("nothing would train: every component is frozen")


@dataclass(frozen=True)
class DataArgs:
    """The LLaVA conversation data and how it is turned into model inputs."""

    data_path: str | None = None
    """LLaVA-format conversations: a JSON list or JSONL of {id, image, conversations:[{from, value}]}."""
    image_root: str | None = None
    """Folder the records' `image` paths are relative to (default: the data file's folder)."""
    image_aspect_ratio: Literal["pad", "resize"] = "pad"
    """'pad': pad to a square with the processor's mean colour (LLaVA-1.5); 'resize': let the processor crop."""
    model_max_length: int = 2048
    """Longest tokenised sample; longer text is truncated (never the image tokens)."""
    group_by_length: bool = True
    """Batch samples of similar length, text-only and image samples apart (LLaVA's group_by_modality_length)."""
    template: str = "vicuna_v1"
    """Conversation template (see llava_address.prompting.TEMPLATES)."""

    def __post_init__(self):
        if self.image_aspect_ratio not in ("pad", "resize"):
            raise ValueError("image_aspect_ratio must be 'pad' or 'resize'")
        if self.model_max_length <= 0:
            raise ValueError("model_max_length must be positive")


# --- argparse <-> dataclass -------------------------------------------------------------------------

def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of a dataclass, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
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


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", title: str | None = None,
                       exclude: tuple[str, ...] = ()) -> argparse._ArgumentGroup:
    """Adds one `--{prefix}{field-name}` option per field of `cls` (help from its docstring).

    Defaults are left as SUPPRESS so `dataclass_from_args` can tell "not given" from "given" and let a
    YAML recipe fill what the command line did not.
    """
    group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, choices, nargs = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        opt = "--" + (prefix + f.name).replace("_", "-")
        if tp is bool:
            group.add_argument(opt, dest=prefix + f.name, type=_str2bool, nargs="?", const=True,
                               default=argparse.SUPPRESS, metavar="BOOL", help=help_text)
        else:
            group.add_argument(opt, dest=prefix + f.name, type=tp, choices=choices, nargs=nargs,
                               default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
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


__all__ = [
    "ModelArgs", "TrainablesArgs", "DataArgs", "DEFAULT_LORA_TARGET_REGEX",
    "add_dataclass_args", "dataclass_from_args", "field_docs", "asdict",
]
