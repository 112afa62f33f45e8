"""`address-llava convert-llava`: an original LLaVA checkpoint (haotian-liu/LLaVA layout) -> a Hugging Face
`LlavaForConditionalGeneration` folder that stock transformers and this toolkit load.

The original layout (e.g. `liuhaotian/llava-v1.5-7b`): config.json with `model_type: llava_llama` and the
`mm_*` fields (`mm_vision_tower`, `mm_projector_type: mlp2x_gelu`, `mm_hidden_size`, `mm_vision_select_layer`,
`mm_vision_select_feature`), weights `model.*` (the Llama LLM), `lm_head.weight` and
`model.mm_projector.{0,2}.{weight,bias}`, and the tokenizer files. The vision tower is not in it: the config
names a hub id, which is not downloaded here, so the tower comes from a local CLIP folder (`--vision-tower`,
e.g. a copy of openai/clip-vit-large-patch14-336 or an AddressCLIP export). transformers'
`convert_llava_weights_to_hf.py` is the reference for the mapping: `mm_projector.0/2` -> `linear_1/2`,
`<image>` (and `<pad>` if missing) added to the tokenizer with the new embedding rows set to the mean row.

    address-llava convert-llava --model-path llava-v1.5-7b --vision-tower clip-vit-large-patch14-336 \\
        --out models/llava-v1.5-7b-hf

The processor gets the chat template of LLaVA-1.5's fine-tuning prompt (`vicuna_v1`, `--template`). Also
here: `refuse_original_llava` (build_llava calls it before transformers builds anything) and
`read_mm_projector` (train-llava `--init-from` accepts LLaVA's projector pre-training `mm_projector.bin`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_dir
from clip_stage.core.outdir import check_out_dir, write_marker
from llava_address.checkpoint_layout import CheckpointError
from llava_address.components import (IMAGE_TOKEN, add_llava_tokens, check_processor, load_tower, new_processor,
                                      num_image_tokens)
from llava_address.prompting import attach_chat_template, get_template

log = logging.getLogger(__name__)

ORIGINAL_MODEL_TYPES = ("llava_llama", "llava_mistral", "llava_mpt")
MM_PROJECTOR_FILE = "mm_projector.bin"
# LLaVA's mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
_PROJECTOR_KEYS = {"0": "linear_1", "2": "linear_2"}
# config.json fields of the original layout that belong to LLaVA, not to the Llama LLM.
_LLAVA_FIELD_PREFIXES = ("mm_", "image_", "tune_", "freeze_", "use_mm", "tokenizer_", "unfreeze_")
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


class OriginalLlavaError(CheckpointError):
    """An original-layout LLaVA checkpoint where a Hugging Face one is expected, or one that cannot be converted."""


def original_llava_config(path: str | os.PathLike) -> dict | None:
    """The config dict when `path` is a local original-layout LLaVA checkpoint, else None (read only config.json)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cfg.get("model_type") in ORIGINAL_MODEL_TYPES or (cfg.get("mm_vision_tower") and "vision_config" not in cfg):
        return cfg
    return None


def refuse_original_llava(path: str | os.PathLike) -> None:
    """Raises OriginalLlavaError (one line naming `convert-llava`) for an original-layout checkpoint: loaded as a
    Hugging Face LLaVA it would be a default-config model with every weight reported missing."""
    cfg = original_llava_config(path)
    if cfg is not None:
        raise OriginalLlavaError(
            f"{path} is an original LLaVA checkpoint (model_type {cfg.get('model_type')!r}); convert it first: "
            f"address-llava convert-llava --model-path {path} --vision-tower CLIP_FOLDER --out DIR")


def read_mm_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """LLaVA's `mm_projector.bin` (projector pre-training output) as {plain LLaVA parameter name: tensor}.

    Loaded with torch.load(weights_only=True) (never unpickled); keys `model.mm_projector.0.weight` ->
    `model.multi_modal_projector.linear_1.weight` etc. (transformers 5 module paths)."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects, a truncated file: one line naming the file
        raise OriginalLlavaError(f"{path}: not a plain tensor state dict ({type(e).__name__}: {str(e)[:120]})") from e
    if not isinstance(state, dict):
        raise OriginalLlavaError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        name = projector_name(key)
        if name is None or not isinstance(value, torch.Tensor):
            raise OriginalLlavaError(f"{path}: {key!r} is not an mlp2x_gelu projector weight "
                                     f"(expected model.mm_projector.{{0,2}}.{{weight,bias}})")
        out[name] = value
    if len(out) != 4:
        raise OriginalLlavaError(f"{path}: {len(out)} projector tensors, an mlp2x_gelu projector has 4")
    return out


def projector_name(key: str) -> str | None:
    """`model.mm_projector.0.weight` (or without `model.`) -> `model.multi_modal_projector.linear_1.weight`."""
    parts = key.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if len(parts) != 3 or parts[0] != "mm_projector" or parts[1] not in _PROJECTOR_KEYS or parts[2] not in ("weight", "bias"):
        return None
    return f"model.multi_modal_projector.{_PROJECTOR_KEYS[parts[1]]}.{parts[2]}"


def mm_projector_file(path: str | os.PathLike) -> Path | None:
    """`path` itself when it is an `mm_projector.bin`-style file, or the one inside a folder; else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".bin":
        return path
    if (path / MM_PROJECTOR_FILE).is_file():
        return path / MM_PROJECTOR_FILE
    return None


def _weight_files(model_path: Path) -> list[Path]:
    files = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("pytorch_model*.bin"))
    if not files:
        raise OriginalLlavaError(f"{model_path}: no *.safetensors or pytorch_model*.bin weights")
    return files


def _read_prefixed(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with `prefix`, read lazily from safetensors shards (or .bin, weights only)."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if k.startswith(prefix):
                        out[k] = st.get_tensor(k)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in state.items() if k.startswith(prefix)})
    return out


def _text_config(cfg: dict):
    from transformers import LlamaConfig

    if cfg.get("model_type") not in (None, "llava_llama"):
        raise OriginalLlavaError(f"model_type {cfg.get('model_type')!r}: only llava_llama (Vicuna/Llama LLaVA) converts")
    keep = {k: v for k, v in cfg.items() if not k.startswith(_LLAVA_FIELD_PREFIXES)
            and k not in ("architectures", "model_type", "_name_or_path", "transformers_version")}
    return LlamaConfig(**keep)


def convert(model_path: str | os.PathLike, vision_tower: str | os.PathLike, torch_dtype: str = "auto"):
    """(LlavaForConditionalGeneration, LlavaProcessor without chat template) of an original LLaVA checkpoint."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    model_path = Path(model_path)
    cfg = original_llava_config(model_path)
    if cfg is None:
        raise OriginalLlavaError(f"{model_path}: not an original LLaVA checkpoint (config.json model_type "
                                 f"{ORIGINAL_MODEL_TYPES} with mm_vision_tower)")
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise OriginalLlavaError(f"{model_path}: mm_projector_type {cfg.get('mm_projector_type')!r}; only mlp2x_gelu "
                                 "(LLaVA-1.5) maps onto transformers' LLaVA projector")
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in _SELECT_FEATURE:
        raise OriginalLlavaError(f"{model_path}: mm_vision_select_feature {select!r}; valid: {sorted(_SELECT_FEATURE)}")
    text_config = _text_config(cfg)
    dtype = getattr(torch, cfg.get("torch_dtype") or "float32") if torch_dtype == "auto" else getattr(torch, torch_dtype)
    files = _weight_files(model_path)

    # The tower first: a wrong one is refused before the (large) LLM is read.
    tower, image_processor = load_tower(str(vision_tower), dtype=dtype)
    if "mm_hidden_size" in cfg and cfg["mm_hidden_size"] != tower.config.hidden_size:
        raise OriginalLlavaError(f"{vision_tower}: tower width {tower.config.hidden_size}, the checkpoint's projector "
                                 f"takes mm_hidden_size {cfg['mm_hidden_size']} (give the tower it was trained with)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    # The LLM's weights (`model.*`, `lm_head`) are a LlamaForCausalLM's: transformers reads them shard by
    # shard; the projector keys it skips are read below.
    log_level = logging.getLogger("transformers.modeling_utils").level
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    try:
        llm, info = LlamaForCausalLM.from_pretrained(str(model_path), config=text_config, dtype=dtype,
                                                     output_loading_info=True)
    finally:
        logging.getLogger("transformers.modeling_utils").setLevel(log_level)
    if info.get("missing_keys"):
        raise OriginalLlavaError(f"{model_path}: LLM weights missing: {sorted(info['missing_keys'])[:5]}")
    add_llava_tokens(tokenizer, llm)

    trained_tower = _read_prefixed(files, "model.vision_tower.vision_tower.")
    if trained_tower:  # a run that also tuned the tower saves it: those weights win over the folder's
        tower.load_state_dict({k.split("vision_tower.vision_tower.", 1)[1]: v for k, v in trained_tower.items()})

    config = LlavaConfig(
        vision_config=tower.config, text_config=llm.config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=_SELECT_FEATURE[select], pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    config.image_seq_length = num_image_tokens(config)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    projector = {projector_name(k): v for k, v in _read_prefixed(files, "model.mm_projector.").items()}
    if None in projector or len(projector) != 4:
        raise OriginalLlavaError(f"{model_path}: expected the 4 mlp2x_gelu tensors model.mm_projector.{{0,2}}.*, "
                                 f"found {len(projector)}")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    own = {f"model.multi_modal_projector.{n}": p for n, p in model.model.multi_modal_projector.named_parameters()}
    for name, value in projector.items():
        if tuple(own[name].shape) != tuple(value.shape):
            raise OriginalLlavaError(f"{model_path}: {name} is {tuple(value.shape)}, the model expects "
                                     f"{tuple(own[name].shape)}")
    model.model.multi_modal_projector.load_state_dict(
        {k[len("model.multi_modal_projector."):]: v.to(dtype) for k, v in projector.items()}, assign=True)
    model.generation_config = llm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"converted LLaVA has uninitialised tensors: {meta[:5]}")
    processor = new_processor(image_processor, tokenizer, config)
    check_processor(model.config, processor)
    return model.eval(), processor


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava convert-llava", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", "--model_path", required=True,
                   help="original LLaVA checkpoint folder (config.json model_type llava_llama, weights, tokenizer)")
    p.add_argument("--vision-tower", "--vision_tower", required=True,
                   help="local CLIP vision folder (weights + preprocessor_config.json) the checkpoint was trained with")
    p.add_argument("--out", required=True, help="output Hugging Face LLaVA folder (replaced atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out (any other non-empty folder is refused)")
    p.add_argument("--template", default="vicuna_v1",
                   help="chat template stored with the processor (default vicuna_v1: LLaVA-1.5's --version v1)")
    p.add_argument("--torch-dtype", "--torch_dtype", "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the written weights ('auto': the checkpoint's torch_dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    return p


@command_main("convert-llava")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One rule for every command's --out (clip_stage.core.outdir), before anything loads.
    check_out_dir(args.out, "convert-llava", inputs=[args.model_path, args.vision_tower], overwrite=args.overwrite)
    for flag, path in (("--model-path", args.model_path), ("--vision-tower", args.vision_tower)):
        if not Path(path).is_dir():  # both are local folders: never tried as hub ids (minutes of retries offline)
            print(f"convert-llava: error: {flag} {path}: no such folder", file=sys.stderr)
            return 2
    try:
        get_template(args.template)
        model, processor = convert(args.model_path, args.vision_tower, args.torch_dtype)
        attach_chat_template(processor, args.template)
    except (OriginalLlavaError, KeyError, OSError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is its repr
        print(f"convert-llava: error: {message}", file=sys.stderr)
        return 2
    with atomic_dir(args.out) as tmp:
        write_marker(tmp, "convert-llava")
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=args.max_shard_size)
        processor.save_pretrained(str(tmp))
    log.info("converted %s (+ tower %s) -> %s", args.model_path, args.vision_tower, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
