"""Typed configuration of the LLaVA stage, grouped by concern: model, trainable parts, data.

Each field's docstring is its `--help` text; `train-llava` and its YAML recipes read them through the one
config system of every command (clip_stage.core.config), where the sections are `model`, `trainables` and
`data` (and `train`, llava_address.train_args). A field name two sections share is spelled with its section
on the command line: `--model.vision-tower`, `--model.llm`. Checks live in `__post_init__`; the dataclasses
are frozen: derive a new one with `dataclasses.replace`, never mutate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    """Compose instead: hub id or folder of a Vicuna/Llama causal LM (with its tokenizer); needs --model.vision-tower."""
    vision_tower: str | None = None
    """CLIPVisionModel folder (e.g. the AddressCLIP export) swapped into the base model, or used to compose one."""
    projector_hidden_act: str = "gelu"
    """Activation of the 2-layer MLP projector of a freshly built projector (LLaVA-1.5 mlp2x_gelu)."""
    vision_feature_layer: int | None = None
    """Vision tower hidden layer fed to the projector (LLaVA-1.5: -2, the penultimate). Unset: the checkpoint's own, or -2 when composing; set with --model.vision-tower to choose the swapped tower's features."""
    vision_feature_select_strategy: Literal["default", "full"] | None = None
    """'default' drops the CLS token (LLaVA-1.5), 'full' keeps it (one more image token). Unset: the checkpoint's own, or 'default' when composing."""
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

    def __post_init__(self):
        if self.model_name_or_path is None and self.llm is None:
            raise ValueError("give --model-name-or-path (a LLaVA checkpoint) or --model.llm and --model.vision-tower (compose)")
        if self.model_name_or_path is not None and self.llm is not None:
            raise ValueError("--model-name-or-path and --model.llm are exclusive: a LLaVA checkpoint already has its LLM")
        if self.llm is not None and self.vision_tower is None:
            raise ValueError("composing a LLaVA from --model.llm needs --model.vision-tower")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit are exclusive")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not one of {DTYPES}")
        if self.vision_feature_select_strategy not in (None, "default", "full"):
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
    """Longest tokenised sample; longer text is truncated (never the image tokens). The trained model's tokenizer
    keeps the smaller of this and its own model_max_length (LLaVA-1.5 trained with 2048)."""
    group_by_length: bool = True
    """Batch samples of similar length, text-only and image samples apart (LLaVA's group_by_modality_length)."""
    template: str = "vicuna_v1"
    """Conversation template (see llava_address.prompting.TEMPLATES)."""
    # A plain str, not `str | None`: the train-llava parser reads "none" given to an optional field as None,
    # which would turn "--length-cache-dir none" into the default folder instead of no cache.
    length_cache_dir: str = "default"
    """Folder caching the start-up tokenisation pass (record lengths) per data file and settings, so later runs
    and the other ranks skip it; 'default': $XDG_CACHE_HOME (or ~/.cache)/address-llava/llava-lengths, 'none': off."""

    def __post_init__(self):
        if self.image_aspect_ratio not in ("pad", "resize"):
            raise ValueError("image_aspect_ratio must be 'pad' or 'resize'")
        if self.model_max_length <= 0:
            raise ValueError("model_max_length must be positive")


__all__ = ["ModelArgs", "TrainablesArgs", "DataArgs", "DEFAULT_LORA_TARGET_REGEX"]
