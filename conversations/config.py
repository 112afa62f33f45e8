"""Typed configuration of the conversation builder.

Each dataclass field's one-line docstring becomes its `--help`; `--config file.yaml` supplies values that
flags then override (the rules of every command: clip_stage.core.config). Checks live in `__post_init__`; parsed values (weights, split lists) are derived
read-only properties, the config itself is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clip_stage.core.config import ALIASES
from clip_stage.core.schema import ADDRESS_STYLES, SPLITS
from conversations.templates import QUESTION_TYPES

DEFAULT_TYPE_WEIGHTS = "full_address=3,street=2,cross_streets=1.5,place=1.5,yes_no=2,multiple_choice=1.5,caption=1"
DEFAULT_EVAL_TYPE_WEIGHTS = "full_address=2,street=1,cross_streets=1,place=1,yes_no=1,multiple_choice=1"
FORMATS = ("llava", "jsonl", "messages", "messages-trl", "hf-disk", "hf-parquet")


def parse_weights(text: str, what: str) -> dict[str, float]:
    """'a=1,b=2.5' -> {'a': 1.0, 'b': 2.5}; unknown question types and negative weights are errors."""
    weights: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"{what}: {item!r} is not name=weight")
        if name not in QUESTION_TYPES:
            raise ValueError(f"{what}: unknown question type {name!r}; valid: {sorted(QUESTION_TYPES)}")
        if name in weights:
            raise ValueError(f"{what}: {name!r} given twice")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"{what}: weight of {name!r} is not a number: {value!r}") from None
        if not w >= 0:
            raise ValueError(f"{what}: weight of {name!r} must be >= 0, got {value}")
        weights[name] = w
    if not any(weights.values()):
        raise ValueError(f"{what}: at least one question type needs a positive weight")
    return weights


def _split_list(text: str, what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in SPLITS]
    if bad or not items:
        raise ValueError(f"{what}: {text!r}: splits must be a comma list of {SPLITS}")
    return items


@dataclass(frozen=True)
class BuildConfig:
    dataset: str = ""
    """address dataset folder (records.parquet, sub_streets.geojson, images/)"""
    out: str = ""
    """output folder: train.json, eval.json, build_info.json (+ other --formats)"""
    seed: int = 0
    """random seed; the same seed and dataset give byte-identical output"""
    min_turns: int = 2
    """fewest question/answer pairs in a training conversation"""
    max_turns: int = 4
    """most question/answer pairs in a training conversation (capped by the types available)"""
    type_weights: str = DEFAULT_TYPE_WEIGHTS
    """relative probability of each question type in training conversations (name=weight,...)"""
    eval_type_weights: str = DEFAULT_EVAL_TYPE_WEIGHTS
    """relative probability of each question type for the single evaluation question"""
    eval_held_out_prob: float = 0.5
    """probability that an evaluation question uses a held-out phrasing (never seen in training)"""
    conversations_per_image: int = 1
    """training conversations generated per training image"""
    mc_choices: int = 4
    """candidate addresses in a multiple-choice question (fewer when the city has fewer sub-streets)"""
    mc_pool: int = 8
    """distractors are drawn from this many nearest distinct addresses"""
    sub_street_prob: float = 0.5
    """probability that a yes/no question names a sub-street (negatives: siblings) rather than a street"""
    negative_pool: int = 3
    """a yes/no negative is drawn from this many nearest candidates"""
    address_style: str = "full"
    """address style of answers and multiple-choice options (see clip_stage.core.schema.ADDRESS_STYLES)"""
    train_splits: str = "train"
    """dataset splits that become training conversations (comma list)"""
    eval_splits: str = "test"
    """dataset splits that become evaluation questions (comma list)"""
    formats: str = "llava"
    """outputs to write (comma list): llava (JSON array), jsonl, messages (LLaMA-Factory), messages-trl, hf-disk, hf-parquet"""
    candidates: str = ""
    """AddressCLIP candidates (folder or candidates.jsonl of `address-llava candidates`, cross-fitted) written into the first user turn of training conversations ('' = none)"""
    candidate_fraction: float = 0.5
    """share of training conversations that carry candidates (the rest stay plain: one model serves both)"""
    candidate_k: int = field(default=5, metadata={ALIASES: ("top-k",)})
    """candidates per conversation (the first K of each list; 0 = all in the file); also --top-k, as in infer/chat"""
    candidate_scores: bool = False
    """write each candidate's retrieval probability after it ("(p=0.42)")"""
    limit: int = 0
    """use at most this many images per split (0: all); for quick demos"""
    overwrite: bool = False
    """replace an existing output folder"""

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("--dataset is required")
        if not self.out:
            raise ValueError("--out is required")
        if self.min_turns < 1 or self.max_turns < self.min_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if self.conversations_per_image < 1:
            raise ValueError("conversations_per_image must be >= 1")
        if self.mc_choices < 2 or self.mc_choices > 26:
            raise ValueError(f"mc_choices must be in 2..26, got {self.mc_choices}")
        if self.mc_pool < self.mc_choices - 1:
            raise ValueError(f"mc_pool ({self.mc_pool}) must be >= mc_choices - 1 ({self.mc_choices - 1})")
        if not 0.0 <= self.sub_street_prob <= 1.0:
            raise ValueError(f"sub_street_prob must be in [0, 1], got {self.sub_street_prob}")
        if not 0.0 <= self.eval_held_out_prob <= 1.0:
            raise ValueError(f"eval_held_out_prob must be in [0, 1], got {self.eval_held_out_prob}")
        if self.negative_pool < 1:
            raise ValueError("negative_pool must be >= 1")
        if self.address_style not in ADDRESS_STYLES:
            raise ValueError(f"unknown address style {self.address_style!r}; valid: {sorted(ADDRESS_STYLES)}")
        if self.limit < 0:
            raise ValueError("limit must be >= 0")
        if not 0.0 <= self.candidate_fraction <= 1.0:
            raise ValueError(f"candidate_fraction must be in [0, 1], got {self.candidate_fraction}")
        if self.candidate_k < 0:
            raise ValueError("candidate_k must be >= 0")
        bad = [f for f in self.format_list if f not in FORMATS]
        if bad or not self.format_list:
            raise ValueError(f"unknown formats {bad}; valid: {FORMATS}")
        if "llava" not in self.format_list and "jsonl" not in self.format_list:
            raise ValueError("formats must include llava or jsonl (the files validate and the trainer read)")
        self.weights, self.eval_weights  # noqa: B018 -- parse now so that bad values fail at startup
        if set(self.train_split_list) & set(self.eval_split_list):
            raise ValueError(f"a split cannot feed both training and evaluation: {self.train_splits} / {self.eval_splits}")

    @property
    def weights(self) -> dict[str, float]:
        return parse_weights(self.type_weights, "type_weights")

    @property
    def eval_weights(self) -> dict[str, float]:
        return parse_weights(self.eval_type_weights, "eval_type_weights")

    @property
    def train_split_list(self) -> tuple[str, ...]:
        return _split_list(self.train_splits, "train_splits")

    @property
    def eval_split_list(self) -> tuple[str, ...]:
        return _split_list(self.eval_splits, "eval_splits")

    @property
    def format_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.formats.split(",") if s.strip())
