"""`address-llava merge`: fold a train-llava checkpoint into a plain Hugging Face LLaVA folder.

Loads the checkpoint's base model (the ModelArgs stored in it, or `--base`), applies the trained
non-LoRA weights (projector, ...) and the LoRA adapter, folds LoRA into the weights (`merge_and_unload`)
and writes `LlavaForConditionalGeneration` + processor as safetensors, which stock transformers loads:

    address-llava merge --checkpoint runs/lora/checkpoint-000120 --out models/address-llava-merged
    LlavaForConditionalGeneration.from_pretrained("models/address-llava-merged")

The merged folder carries the chat template of the training prompts (`llava_address.prompting`, the
checkpoint's `data.template`), so `processor.apply_chat_template` prompts it as it was trained, and a
model card (README.md: base, tower, data, recipe, metrics of `--benchmark FILE`, licence).
`--push-to-hub REPO` uploads the folder (token from HF_TOKEN or the local login):

    address-llava merge --checkpoint CKPT --out DIR --benchmark runs/bench/benchmark.json --push-to-hub me/model

The base is always loaded unquantised for merging (folding LoRA into 4-bit weights would round it away):
a QLoRA checkpoint merges into a `--torch-dtype` model. `--check` compares the merged model's logits with
the adapter model's on a synthetic input before writing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_dir
from clip_stage.core.model_card import CardError, ModelCard, add_hub_args, push_folder, read_metrics, write_card
from clip_stage.core.outdir import check_out_dir, on_disk, write_marker
from llava_address.checkpoint import load_for_inference
from llava_address.checkpoint_layout import ARGS_FILE, read_checkpoint_args
from llava_address.components import num_image_tokens
from llava_address.prompting import attach_chat_template

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava merge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train-llava checkpoint folder (llava_args.json, adapter, ...)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--base", default=None, help="LLaVA hub id/path replacing the base stored in the checkpoint")
    p.add_argument("--vision-tower", default=None, help="replaces the stored vision tower path (e.g. if it moved)")
    p.add_argument("--torch-dtype", "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged weights ('auto': the base checkpoint's; a QLoRA run's compute dtype)")
    p.add_argument("--device-map", default=None, help="device_map for loading the base (e.g. 'auto' for big models)")
    p.add_argument("--check", action="store_true", help="verify merged logits == adapter logits before writing")
    p.add_argument("--atol", type=float, default=1e-4, help="tolerance of --check (default 1e-4)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge at --out (any other non-empty folder is refused)")
    p.add_argument("--no-overwrite", action="store_true", help="refuse to replace an existing --out (the default now; kept for old scripts)")
    add_hub_args(p)
    return p


USAGE = """from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaImageProcessor
from PIL import Image

model = LlavaForConditionalGeneration.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")  # carries the training prompt as its chat template
processor.image_processor = LlavaImageProcessor(**{{**processor.image_processor.to_dict(), "do_pad": True}})  # pad like training
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Where was this photo taken?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
# the template already starts with <s>: add_special_tokens=False, or the tokenizer adds a second one
inputs = processor(images=Image.open("street.jpg"), text=prompt, add_special_tokens=False, return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))"""


def model_card(stored: dict, checkpoint: Path, *, base: str | None, vision_tower: str | None, repo: str | None,
               license: str, metrics_file: str | None) -> ModelCard:
    """The merged model's card from the checkpoint's llava_args.json (+ the benchmark's numbers)."""
    model, data = stored.get("model", {}), stored.get("data", {})
    trainables = stored.get("trainables", {})
    base_model = base or model.get("model_name_or_path") or model.get("llm")
    details = {
        "base model": base_model, "vision tower": vision_tower or model.get("vision_tower") or "the base model's",
        "trained": ", ".join(f"{k} {trainables[k]}" for k in ("vision_tower", "projector", "llm") if k in trainables),
        "data": data.get("data_path"), "prompt template": data.get("template", "vicuna_v1"),
        "recipe": Path(stored["recipe"]).name if stored.get("recipe") else None, "checkpoint": checkpoint.name,
    }
    metrics = read_metrics(metrics_file) if metrics_file else {}
    return ModelCard(
        title=repo.split("/")[-1] if repo else "address-llava", base_model=base_model, license=license,
        summary="A LLaVA-1.5 model fine-tuned with address-llava to answer where a street-level photo was taken "
                "(street, cross streets, neighbourhood), optionally grounded on AddressCLIP's top-k candidates.",
        pipeline_tag="image-text-to-text", tags=("llava", "address-llava", "geolocalization", "street-address"),
        details={k: str(v) for k, v in details.items() if v}, metrics=metrics, metrics_source=metrics_file,
        usage=USAGE.format(repo=repo or "PATH/TO/MERGED"),
    )


def merge_checkpoint(checkpoint: str | Path, base: str | None = None, vision_tower: str | None = None,
                     torch_dtype: str = "auto", device_map: str | None = None):
    """(merged plain LlavaForConditionalGeneration in eval mode, processor) of a checkpoint."""
    stored, _, _ = read_checkpoint_args(checkpoint)
    dtype = torch_dtype
    if dtype == "auto" and stored.load_in_4bit:
        dtype = stored.bnb_4bit_compute_dtype
    overrides = {"load_in_4bit": False, "load_in_8bit": False, "torch_dtype": dtype, "device_map": device_map}
    if vision_tower is not None:
        overrides["vision_tower"] = vision_tower
    model, processor = load_for_inference(base, checkpoint, **overrides)
    if hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload(progressbar=False, safe_merge=True)
    else:
        merged = model
    merged.eval()
    return merged, processor


def _probe_inputs(model, processor):
    """A deterministic synthetic batch: one image + a prompt with its image tokens + some text."""
    cfg = model.config
    n_img = num_image_tokens(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = min(cfg.text_config.vocab_size, len(processor.tokenizer))
    special = {cfg.image_token_id, processor.tokenizer.pad_token_id}
    text = [t for t in torch.randint(3, vocab, (24,), generator=g).tolist() if t not in special]
    ids = [processor.tokenizer.bos_token_id or 1] + [cfg.image_token_id] * n_img + text
    size = cfg.vision_config.image_size
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    pixel_values = torch.randn(1, 3, size, size, generator=g).to(device, dtype)
    return torch.tensor([ids], device=device), pixel_values


@torch.no_grad()
def max_logit_difference(a, b, processor) -> float:
    ids, pv = _probe_inputs(a, processor)
    la = a(input_ids=ids, pixel_values=pv).logits.float()
    lb = b(input_ids=ids.to(next(b.parameters()).device), pixel_values=pv.to(next(b.parameters()).device)).logits.float()
    return float((la - lb.to(la.device)).abs().max())



@command_main("merge")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        print(f"merge: error: {ckpt} is not a folder", file=sys.stderr)
        return 2
    out = Path(args.out)
    has_args = (ckpt / ARGS_FILE).is_file()
    stored_model = read_checkpoint_args(ckpt)[0] if has_args else None
    # One rule for every command's --out (clip_stage.core.outdir), before any model loads: --out may not be (or hold)
    # the checkpoint or its run folder, nor the base model and tower the checkpoint was trained on (given or
    # stored: merged over its own base, the adapter would be orphaned), and replaces only an earlier merge.
    bases = [args.base, args.vision_tower]
    if stored_model is not None:
        bases += [stored_model.model_name_or_path, stored_model.llm, stored_model.vision_tower]
    check_out_dir(out, "merge", inputs=[ckpt, *(on_disk(b) for b in bases), args.benchmark],
                  inside_ok=[ckpt.parent], overwrite=args.overwrite and not args.no_overwrite)
    stored = read_checkpoint_args(ckpt)[2]  # without llava_args.json: one line, "not a LLaVA training checkpoint"

    try:
        card = model_card(stored, ckpt, base=args.base, vision_tower=args.vision_tower, repo=args.push_to_hub,
                          license=args.license, metrics_file=args.benchmark)
    except (CardError, OSError, ValueError) as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    merged, processor = merge_checkpoint(ckpt, args.base, args.vision_tower, args.torch_dtype, args.device_map)
    # Checkpoints written before chat templates were saved get theirs here, from the template they trained on.
    attach_chat_template(processor, stored.get("data", {}).get("template", "vicuna_v1"))
    if args.check:
        dtype = merged.dtype
        ref, _ = load_for_inference(args.base, ckpt, load_in_4bit=False, load_in_8bit=False,
                                    torch_dtype=str(dtype).replace("torch.", ""), device_map=args.device_map,
                                    **({"vision_tower": args.vision_tower} if args.vision_tower else {}))
        diff = max_logit_difference(merged, ref, processor)
        del ref
        log.info("merged vs adapter logits: max |diff| = %.3g (atol %.3g)", diff, args.atol)
        if not diff <= args.atol:
            print(f"merge: merged logits differ from the adapter model's by {diff:.3g} > {args.atol}", file=sys.stderr)
            return 1
    with atomic_dir(out) as tmp:
        write_marker(tmp, "merge")
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=args.max_shard_size)
        processor.save_pretrained(str(tmp))
        write_card(tmp, card)
    log.info("merged %s -> %s", ckpt, out)
    if args.push_to_hub:
        try:
            url = push_folder(out, args.push_to_hub, private=args.hub_private)
        except (CardError, OSError, ValueError) as e:  # huggingface_hub's HTTP and auth errors are OSError/ValueError
            print(f"merge: pushing {out} to {args.push_to_hub} failed: {e}", file=sys.stderr)
            return 1
        log.info("pushed %s -> %s", out, url)
    print(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
