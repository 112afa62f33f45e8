"""Export an AddressCLIP (open_clip) checkpoint to plain Hugging Face transformers directories.

    address-llava export-clip --checkpoint runs/clip/final --out exports/addressclip
    address-llava export-clip --model ViT-B-16 --pretrained openai --out exports/zero-shot

writes

    <out>/vision_tower/   CLIPVisionModelWithProjection (safetensors) + CLIPImageProcessor config.
                          `CLIPVisionModel.from_pretrained` loads it too (the LLaVA stage's vision tower;
                          it ignores the projection). `hidden_states[-2]` is what LLaVA feeds its projector.
    <out>/clip_model/     full CLIPModel + CLIPProcessor (image processor + CLIPTokenizer built from
                          open_clip's BPE vocabulary), when the text tower maps (see below).
    <out>/export_report.json  source, what was written, and the verification differences.

Only the architectures that are the same computation in both libraries are exported: an open_clip
`VisionTransformer` with class-token pooling, a pre-LayerNorm, standard residual blocks (no layer scale,
no custom attention variants), no attentional pooler; for the full model also the standard causal text
transformer with EOT (argmax) pooling and no logit bias. Anything else (ResNet, timm, HF text towers,
SigLIP, CoCa, ...) is refused with an `UnsupportedArchitectureError` naming the feature.

The command writes the whole export (folders, report, model card, output marker) into a temporary folder
that replaces `--out` only once complete and verified: a failed export leaves `--out` as it was, and
`--overwrite` never mixes an earlier export's files with the new ones. `--out` may sit in the train-clip run
folder beside its checkpoints (the demo's `clip/hf`), never inside a checkpoint folder.

After writing, the export reloads the saved directories and compares them with the open_clip model on the
same input in float32 (penultimate hidden states, pooled projected image embedding, text embeddings); a
difference above `--atol` (default 1e-4) is an error. Key mapping (measured to reproduce to 1e-6):
conv1 -> patch_embedding, ln_pre -> pre_layrnorm, in_proj split in three -> q/k/v, mlp c_fc/c_proj ->
fc1/fc2, ln_post -> post_layernorm, proj^T -> visual_projection (and likewise for the text tower).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main, report
from clip_stage.core.fs import atomic_dir, atomic_write_json
from clip_stage.model import add_model_source_args, bundle_from_args, check_model_source, checkpoint_folders
from clip_stage.core.model_card import CardError, ModelCard, add_hub_args, push_folder, read_metrics, write_card
from clip_stage.core.outdir import check_out_dir, on_disk, write_marker

VISION_DIR = "vision_tower"
CLIP_DIR = "clip_model"
REPORT_FILE = "export_report.json"

# open_clip resize modes / interpolations -> CLIPImageProcessor settings
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


class UnsupportedArchitectureError(ValueError):
    """An open_clip architecture with no exact transformers CLIP equivalent."""


class ExportError(ValueError):
    """A bad export-clip request (an option out of range), or an export that does not reproduce open_clip."""


# --------------------------------------------------------------------------------------------------
# architecture checks and configs


def _activation(block: nn.Module, where: str) -> str:
    import open_clip.transformer as oct

    act = block.mlp.gelu
    if isinstance(act, oct.QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        if act.approximate == "tanh":
            return "gelu_pytorch_tanh"
        return "gelu"
    raise UnsupportedArchitectureError(f"{where}: activation {type(act).__name__} has no transformers equivalent")


def _check_blocks(resblocks, width: int, where: str) -> tuple[str, int, int, float]:
    """Returns (hidden_act, heads, intermediate_size, layer_norm_eps); refuses non-standard blocks."""
    import open_clip.transformer as oct

    acts, heads, inter, eps = set(), set(), set(), set()
    for i, block in enumerate(resblocks):
        name = f"{where} block {i}"
        if not isinstance(block, oct.ResidualAttentionBlock):
            raise UnsupportedArchitectureError(
                f"{name}: {type(block).__name__} (custom attention: qk-norm / scaled-cosine / head scaling) is not "
                "a standard CLIP block")
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            raise UnsupportedArchitectureError(f"{name}: layer scale (ls_init_value) is not supported by transformers CLIP")
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedArchitectureError(f"{name}: cross-attention blocks are not supported")
        if not isinstance(block.attn, nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            raise UnsupportedArchitectureError(f"{name}: attention without a packed in_proj is not supported")
        if block.attn.in_proj_bias is None or block.attn.out_proj.bias is None:
            raise UnsupportedArchitectureError(f"{name}: attention without biases is not supported")
        if set(block.mlp._modules) != {"c_fc", "gelu", "c_proj"}:
            raise UnsupportedArchitectureError(f"{name}: MLP with extra layers {sorted(block.mlp._modules)} is not supported")
        for ln in (block.ln_1, block.ln_2):
            if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine:
                raise UnsupportedArchitectureError(f"{name}: {type(ln).__name__} is not an affine LayerNorm")
            eps.add(ln.eps)
        acts.add(_activation(block, name))
        heads.add(block.attn.num_heads)
        inter.add(block.mlp.c_fc.out_features)
        if block.attn.embed_dim != width:
            raise UnsupportedArchitectureError(f"{name}: attention width {block.attn.embed_dim} != {width}")
    if len(acts) != 1 or len(heads) != 1 or len(inter) != 1 or len(eps) != 1:
        raise UnsupportedArchitectureError(f"{where}: blocks differ in activation/heads/MLP width/eps")
    return acts.pop(), heads.pop(), inter.pop(), eps.pop()


def _pair(v) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise UnsupportedArchitectureError(f"non-square size {tuple(v)} is not supported by CLIPVisionConfig")
        return int(v[0])
    return int(v)


def vision_config(model: nn.Module):
    """The `CLIPVisionConfig` equivalent to `model.visual`; raises UnsupportedArchitectureError."""
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPVisionConfig

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedArchitectureError(
            f"image tower {type(visual).__name__} is not an open_clip VisionTransformer (ResNet and timm towers "
            "have no transformers CLIPVisionModel equivalent)")
    if visual.attn_pool is not None:
        raise UnsupportedArchitectureError("image tower: attentional pooling (CoCa-style) is not supported")
    if visual.pool_type != "tok":
        raise UnsupportedArchitectureError(f"image tower: pool_type {visual.pool_type!r} (CLIP uses 'tok', the class token)")
    if visual.final_ln_after_pool:
        raise UnsupportedArchitectureError("image tower: final_ln_after_pool is not supported")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise UnsupportedArchitectureError("image tower: no_ln_pre (no pre-LayerNorm) is not supported")
    if visual.proj is None or not isinstance(visual.proj, nn.Parameter):
        raise UnsupportedArchitectureError("image tower: an output projection matrix is required")
    if visual.conv1.bias is not None:
        raise UnsupportedArchitectureError("image tower: patch embedding with bias is not supported")
    width = visual.conv1.out_channels
    act, heads, inter, eps = _check_blocks(visual.transformer.resblocks, width, "image tower")
    for ln in (visual.ln_pre, visual.ln_post):
        if ln.eps != eps:
            raise UnsupportedArchitectureError("image tower: LayerNorms with different eps are not supported")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=inter,
        projection_dim=visual.proj.shape[1],
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=heads,
        num_channels=visual.conv1.in_channels,
        image_size=_pair(visual.image_size),
        patch_size=_pair(visual.patch_size),
        hidden_act=act,
        layer_norm_eps=eps,
    )


@dataclass
class _TextParts:
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.LayerNorm
    text_projection: object
    pool_type: str
    attn_mask: torch.Tensor | None


def _text_parts(model: nn.Module) -> _TextParts:
    from open_clip.transformer import TextTransformer

    if hasattr(model, "text"):  # CustomTextCLIP
        text = model.text
        if not isinstance(text, TextTransformer):
            raise UnsupportedArchitectureError(
                f"text tower {type(text).__name__} (e.g. a Hugging Face text encoder) is not a CLIP text transformer")
        if text.cls_emb is not None:
            raise UnsupportedArchitectureError("text tower: an appended class token (embed_cls) is not supported")
        if getattr(text, "use_pad_mask", False):
            raise UnsupportedArchitectureError("text tower: padding masks are not supported")
        return _TextParts(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                          text.text_projection, text.pool_type, text.attn_mask)
    if not hasattr(model, "token_embedding"):
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no text transformer")
    return _TextParts(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                      model.text_projection, model.text_pool_type, model.attn_mask)


def text_config(model: nn.Module):
    """The `CLIPTextConfig` equivalent to the model's text tower; raises UnsupportedArchitectureError."""
    from transformers import CLIPTextConfig

    t = _text_parts(model)
    if t.pool_type != "argmax":
        raise UnsupportedArchitectureError(f"text tower: pool_type {t.pool_type!r} (CLIP pools at the EOT token, 'argmax')")
    if t.attn_mask is None:
        raise UnsupportedArchitectureError("text tower: no causal mask (no_causal_mask) is not supported")
    if not isinstance(t.text_projection, nn.Parameter):
        if isinstance(t.text_projection, nn.Linear) and t.text_projection.bias is None:
            pass
        else:
            raise UnsupportedArchitectureError("text tower: text projection must be a matrix without bias")
    if getattr(model, "logit_bias", None) is not None:
        raise UnsupportedArchitectureError("a logit bias (SigLIP-style) has no CLIPModel equivalent")
    width = t.token_embedding.embedding_dim
    act, heads, inter, eps = _check_blocks(t.transformer.resblocks, width, "text tower")
    if t.ln_final.eps != eps:
        raise UnsupportedArchitectureError("text tower: LayerNorms with different eps are not supported")
    proj_dim = t.text_projection.shape[1] if isinstance(t.text_projection, nn.Parameter) else t.text_projection.out_features
    vocab = t.token_embedding.num_embeddings
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inter,
        projection_dim=proj_dim,
        num_hidden_layers=len(t.transformer.resblocks),
        num_attention_heads=heads,
        max_position_embeddings=t.positional_embedding.shape[0],
        hidden_act=act,
        layer_norm_eps=eps,
        # open_clip pools at argmax(token id) = the EOT token, which is the vocabulary's last id; transformers
        # pools at the first eos_token_id, the same position for open_clip's tokenizer.
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


# --------------------------------------------------------------------------------------------------
# weights


def _blocks_state(resblocks, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, b in enumerate(resblocks):
        p = f"{prefix}.encoder.layers.{i}"
        q, k, v = b.attn.in_proj_weight.detach().chunk(3, dim=0)
        qb, kb, vb = b.attn.in_proj_bias.detach().chunk(3, dim=0)
        out.update({
            f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.q_proj.bias": qb,
            f"{p}.self_attn.k_proj.weight": k, f"{p}.self_attn.k_proj.bias": kb,
            f"{p}.self_attn.v_proj.weight": v, f"{p}.self_attn.v_proj.bias": vb,
            f"{p}.self_attn.out_proj.weight": b.attn.out_proj.weight, f"{p}.self_attn.out_proj.bias": b.attn.out_proj.bias,
            f"{p}.layer_norm1.weight": b.ln_1.weight, f"{p}.layer_norm1.bias": b.ln_1.bias,
            f"{p}.layer_norm2.weight": b.ln_2.weight, f"{p}.layer_norm2.bias": b.ln_2.bias,
            f"{p}.mlp.fc1.weight": b.mlp.c_fc.weight, f"{p}.mlp.fc1.bias": b.mlp.c_fc.bias,
            f"{p}.mlp.fc2.weight": b.mlp.c_proj.weight, f"{p}.mlp.fc2.bias": b.mlp.c_proj.bias,
        })
    return out


def vision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.visual` as CLIPVisionModelWithProjection / CLIPModel keys (`vision_model.*`, `visual_projection`)."""
    v = model.visual
    sd = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight, "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": v.proj.T,
        **_blocks_state(v.transformer.resblocks, "vision_model"),
    }
    return {k: t.detach().float().contiguous().clone() for k, t in sd.items()}


def text_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    t = _text_parts(model)
    proj = t.text_projection.T if isinstance(t.text_projection, nn.Parameter) else t.text_projection.weight
    sd = {
        "text_model.embeddings.token_embedding.weight": t.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": t.positional_embedding,
        "text_model.final_layer_norm.weight": t.ln_final.weight, "text_model.final_layer_norm.bias": t.ln_final.bias,
        "text_projection.weight": proj,
        "logit_scale": model.logit_scale.reshape(()),
        **_blocks_state(t.transformer.resblocks, "text_model"),
    }
    return {k: x.detach().float().contiguous().clone() for k, x in sd.items()}


def _load_exact(hf_model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------------
# processors


def image_processor(model: nn.Module):
    """A CLIPImageProcessor reproducing open_clip's validation transform (size, crop, mean, std, resampling; a
    half-pixel crop offset is floored where torchvision rounds it: docs/addressclip.md)."""
    from transformers import CLIPImageProcessor

    cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    size = _pair(cfg.get("size", model.visual.image_size))
    mode = cfg.get("resize_mode", "shortest")
    interp = cfg.get("interpolation", "bicubic")
    if interp not in _RESAMPLE:
        raise UnsupportedArchitectureError(f"image interpolation {interp!r} has no CLIPImageProcessor equivalent")
    common = dict(image_mean=list(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                  image_std=list(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
                  resample=_RESAMPLE[interp], do_convert_rgb=True, do_rescale=True, do_normalize=True)
    if mode == "shortest":
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  do_center_crop=True, **common)
    if mode == "squash":
        return CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False, **common)
    raise UnsupportedArchitectureError(f"image resize mode {mode!r} (padding) has no CLIPImageProcessor equivalent")


def clip_tokenizer(tokenizer, context_length: int, vocab_size: int):
    """A transformers CLIPTokenizer with open_clip's BPE vocabulary, or None if the tokenizer is not that one."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    if not isinstance(tokenizer, SimpleTokenizer) or len(tokenizer.encoder) != vocab_size:
        return None
    if len(tokenizer.encoder) != 49408 or tokenizer.all_special_ids != [49406, 49407]:
        return None  # extra special tokens: transformers' CLIP tokenizer would number them differently
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in tokenizer.encoder.items()}
    merges = [tuple(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = context_length
    return tok


# --------------------------------------------------------------------------------------------------
# export + verification


@dataclass
class ExportResult:
    vision_dir: Path
    clip_dir: Path | None
    tokenizer: bool
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def open_clip_reference(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """open_clip's penultimate-layer hidden states (all tokens), pooled pre-projection, and image embedding."""
    visual = model.visual
    layers = len(visual.transformer.resblocks)
    out = visual.forward_intermediates(pixel_values, indices=[layers - 2], output_fmt="NLC", output_extra_tokens=True)
    hidden = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    x = visual._embeds(pixel_values)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return {"hidden_states_-2": hidden, "pooler_output": pooled, "image_embeds": pooled @ visual.proj}


@torch.no_grad()
def _verify(model, vision_dir: Path, clip_dir: Path | None, context_length: int, atol: float) -> dict[str, float]:
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    g = torch.Generator().manual_seed(0)
    size = _pair(model.visual.image_size)
    pixels = torch.randn(2, 3, size, size, generator=g)
    ref = open_clip_reference(model, pixels)
    hf_v = CLIPVisionModelWithProjection.from_pretrained(vision_dir).eval()
    out = hf_v(pixel_values=pixels, output_hidden_states=True)
    diffs = {
        "vision.hidden_states_-2": (out.hidden_states[-2] - ref["hidden_states_-2"]).abs().max().item(),
        "vision.image_embeds": (out.image_embeds - ref["image_embeds"]).abs().max().item(),
    }
    if clip_dir is not None:
        hf = CLIPModel.from_pretrained(clip_dir).eval()
        vocab = hf.config.text_config.vocab_size
        ids = torch.randint(0, vocab - 2, (3, context_length), generator=g)
        ids[:, 0] = vocab - 2
        for row, n in enumerate((5, context_length // 2, context_length - 1)):
            ids[row, n] = vocab - 1
            ids[row, n + 1:] = 0
        ref_text = model.encode_text(ids)
        hf_text = hf.get_text_features(input_ids=ids)
        hf_text = getattr(hf_text, "pooler_output", hf_text)
        hf_img = hf.get_image_features(pixel_values=pixels)
        hf_img = getattr(hf_img, "pooler_output", hf_img)
        diffs["clip.text_embeds"] = (hf_text - ref_text).abs().max().item()
        diffs["clip.image_embeds"] = (hf_img - ref["image_embeds"]).abs().max().item()
        diffs["clip.logit_scale"] = abs(hf.logit_scale.item() - model.logit_scale.item())
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise ExportError(f"exported model differs from open_clip by more than --atol {atol}: "
                          + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()))
    return diffs


def export_open_clip(model: nn.Module, tokenizer, out_dir: str | Path, *, full: bool | None = None,
                     verify: bool = True, atol: float = 1e-4, source: dict | None = None) -> ExportResult:
    """Writes <out>/vision_tower and (if `full` is not False and the text tower maps) <out>/clip_model.

    `full=None` exports the full CLIPModel when possible and says why not otherwise; `full=True` makes an
    unmappable text tower an error.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

    model = model.float().eval().to("cpu")  # verification runs on CPU in float32
    out_dir = Path(out_dir)
    vcfg = vision_config(model)  # raises before anything is written
    tcfg, skipped = None, []
    if full is not False:
        try:
            tcfg = text_config(model)
        except UnsupportedArchitectureError as e:
            if full:
                raise
            skipped.append(f"clip_model: {e}")
    proc = image_processor(model)
    vsd = vision_state_dict(model)

    vision_dir = out_dir / VISION_DIR
    with atomic_dir(vision_dir) as tmp:
        vcfg.architectures = ["CLIPVisionModelWithProjection"]
        hf_v = CLIPVisionModelWithProjection(vcfg)
        _load_exact(hf_v, vsd)
        hf_v.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)

    clip_dir, has_tok = None, False
    if tcfg is not None:
        clip_dir = out_dir / CLIP_DIR
        ccfg = CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                          projection_dim=vcfg.projection_dim, logit_scale_init_value=float(model.logit_scale.item()))
        if tcfg.projection_dim != vcfg.projection_dim:
            raise UnsupportedArchitectureError("image and text projections differ in size")
        with atomic_dir(clip_dir) as tmp:
            hf = CLIPModel(ccfg)
            _load_exact(hf, {**vsd, **text_state_dict(model)})
            hf.save_pretrained(tmp, safe_serialization=True)
            tok = clip_tokenizer(tokenizer, tcfg.max_position_embeddings, tcfg.vocab_size)
            if tok is not None:
                CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(tmp)
                has_tok = True
            else:
                proc.save_pretrained(tmp)
                skipped.append("clip_model tokenizer: the model's tokenizer is not open_clip's CLIP BPE tokenizer")

    result = ExportResult(vision_dir, clip_dir, has_tok, skipped=skipped)
    if verify:
        if not atol >= 0:
            raise ExportError(f"atol must be >= 0 (got {atol})")
        ctx = tcfg.max_position_embeddings if tcfg is not None else 0
        result.max_abs_diff = _verify(model, vision_dir, clip_dir, ctx, atol)
    # Folder names relative to the export (it is written in a temporary folder, then moved or pushed).
    atomic_write_json(out_dir / REPORT_FILE, {
        "source": source or {}, "vision_tower": VISION_DIR, "clip_model": CLIP_DIR if clip_dir else None,
        "tokenizer": has_tok, "hidden_act": vcfg.hidden_act, "skipped": skipped,
        "verified_atol": atol if verify else None, "max_abs_diff": result.max_abs_diff,
    })
    return result


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava export-clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p, "export a base (not fine-tuned) model")
    p.add_argument("--out", required=True, help="output folder (vision_tower/, clip_model/, export_report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out (any other non-empty folder is refused)")
    p.add_argument("--vision-only", action="store_true", help="export only the image tower")
    p.add_argument("--require-full", action="store_true", help="error if the full CLIPModel cannot be exported")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric comparison with open_clip")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed absolute difference in verification")
    add_hub_args(p)  # README.md model card (+ --benchmark metrics) and --push-to-hub
    return p


def export_card(source: dict, res: ExportResult, args, metrics: dict | None = None) -> ModelCard:
    """The export folder's model card: source checkpoint, what was written, metrics of `--benchmark` (read by
    the caller before the model loaded)."""
    base = source.get("pretrained") and f"{source.get('model_name')} ({source.get('pretrained')})"
    repo = args.push_to_hub or "PATH/TO/EXPORT"
    return ModelCard(
        title=(args.push_to_hub or "addressclip").split("/")[-1], license=args.license,
        summary="An AddressCLIP image encoder (open_clip fine-tuned with the AddressCLIP losses) exported to "
                "transformers: `vision_tower/` is the CLIP vision tower the LLaVA stage uses"
                + (", `clip_model/` the full CLIPModel for address retrieval." if res.clip_dir else
                   " (the image tower only: no full CLIPModel was exported)."),
        pipeline_tag="zero-shot-image-classification" if res.clip_dir else "image-feature-extraction",
        tags=("clip", "addressclip", "address-llava", "geolocalization"),
        details={k: str(v) for k, v in {"source": source.get("checkpoint") or base, "architecture": source.get("model_name"),
                                        "written": ", ".join(p.name for p in (res.vision_dir, res.clip_dir) if p),
                                        "verified": "max |diff| " + ", ".join(f"{k} {v:.2g}" for k, v in res.max_abs_diff.items())
                                        if res.max_abs_diff else None}.items() if v},
        metrics=metrics or {}, metrics_source=args.benchmark,
        usage=f'from transformers import CLIPVisionModel\n\ntower = CLIPVisionModel.from_pretrained("{repo}", '
              f'subfolder="{VISION_DIR}")',
    )


def check_request(args) -> dict:
    """Options, model source, --benchmark and --out, before the model loads; returns the --benchmark metrics."""
    if not (args.atol >= 0 and math.isfinite(args.atol)):
        raise ExportError(f"--atol must be a number >= 0 (got {args.atol})")
    metrics = read_metrics(args.benchmark) if args.benchmark else {}
    # One rule for every command's --out (clip_stage.core.outdir); export_report.json marks exports written before
    # markers. The export may sit inside the run folder (the demo's clip/hf), never inside a checkpoint folder.
    folders, run = checkpoint_folders(args.checkpoint) if args.checkpoint else ([], None)
    check_out_dir(args.out, "export-clip", inputs=[args.checkpoint, on_disk(args.pretrained), args.benchmark, *folders],
                  inside_ok=[run], overwrite=args.overwrite, legacy=[REPORT_FILE, "vision_tower"])
    check_model_source(args)
    return metrics


@command_main("export-clip")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = check_request(args)
    bundle = bundle_from_args(args)
    source = {"checkpoint": str(args.checkpoint)} if args.checkpoint else {"model": args.model, "pretrained": args.pretrained}
    source.update(model_name=bundle.model_name, pretrained=bundle.pretrained)
    full = False if args.vision_only else (True if args.require_full else None)
    out = Path(args.out)
    # Everything goes into a temporary folder that replaces --out only when complete (fs.atomic_dir).
    with atomic_dir(out) as tmp:
        try:
            res = export_open_clip(bundle.model, bundle.tokenizer, tmp, full=full, verify=not args.no_verify,
                                   atol=args.atol, source=source)
        except UnsupportedArchitectureError as e:
            raise UnsupportedArchitectureError(f"cannot export {bundle.model_name}: {e}") from e
        write_marker(tmp, "export-clip")
        write_card(tmp, export_card(source, res, args, metrics))
    res.vision_dir = out / VISION_DIR
    res.clip_dir = out / CLIP_DIR if res.clip_dir else None
    print(f"vision tower -> {res.vision_dir}")
    if res.clip_dir:
        print(f"CLIPModel    -> {res.clip_dir}" + ("" if res.tokenizer else " (no tokenizer)"))
    if args.push_to_hub:
        try:
            print(f"pushed -> {push_folder(out, args.push_to_hub, private=args.hub_private)}")
        except (CardError, OSError, ValueError) as e:  # huggingface_hub's HTTP and auth errors are OSError/ValueError
            report("export-clip", f"{e} (the export at {out} is complete)")
            return 2 if isinstance(e, CardError) else 1
    for s in res.skipped:
        print(f"skipped: {s}")
    if res.max_abs_diff:
        print("max |transformers - open_clip|: " + json.dumps({k: float(f"{v:.3g}") for k, v in res.max_abs_diff.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
