"""`address-llava merge`: fold a train-llava checkpoint into a plain Hugging Face LLaVA folder.

Loads the checkpoint's base model (the ModelArgs stored in it, or `--base`), applies the trained
non-LoRA weights (projector, ...) and the LoRA adapter, folds LoRA into the weights (`merge_and_unload`)
and writes `LlavaForConditionalGeneration` + processor as safetensors, which stock transformers loads:

    address-llava merge --checkpoint runs/lora/checkpoint-000120 --out models/address-llava-merged
    LlavaForConditionalGeneration.from_pretrained("models/address-llava-merged")

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

from clip_stage.fsutil import atomic_dir

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="address-llava merge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train-llava checkpoint folder (llava_args.json, adapter, ...)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--base", default=None, help="LLaVA hub id/path replacing the base stored in the checkpoint")
    p.add_argument("--vision-tower", default=None, help="replaces the stored vision tower path (e.g. if it moved)")
    p.add_argument("--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged weights ('auto': the base checkpoint's; a QLoRA run's compute dtype)")
    p.add_argument("--device-map", default=None, help="device_map for loading the base (e.g. 'auto' for big models)")
    p.add_argument("--check", action="store_true", help="verify merged logits == adapter logits before writing")
    p.add_argument("--atol", type=float, default=1e-4, help="tolerance of --check (default 1e-4)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--no-overwrite", action="store_true", help="refuse to replace an existing --out")
    return p


def merge_checkpoint(checkpoint: str | Path, base: str | None = None, vision_tower: str | None = None,
                     torch_dtype: str = "auto", device_map: str | None = None):
    """(merged plain LlavaForConditionalGeneration in eval mode, processor) of a checkpoint."""
    from llava_address.model import load_for_inference, read_checkpoint_args

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
    from llava_address.model import num_image_tokens

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        print(f"merge: {ckpt} is not a folder", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and args.no_overwrite:
        print(f"merge: {out} exists (--no-overwrite)", file=sys.stderr)
        return 2
    merged, processor = merge_checkpoint(ckpt, args.base, args.vision_tower, args.torch_dtype, args.device_map)
    if args.check:
        from llava_address.model import load_for_inference

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
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=args.max_shard_size)
        processor.save_pretrained(str(tmp))
    log.info("merged %s -> %s", ckpt, out)
    print(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
