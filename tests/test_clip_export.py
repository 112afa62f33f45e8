"""export-clip: open_clip -> transformers CLIPVisionModel / CLIPModel, numerically equivalent in float32."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clip_stage.export_hf import (CLIP_DIR, REPORT_FILE, VISION_DIR, UnsupportedArchitectureError, export_open_clip,
                                  main, open_clip_reference)
from clip_stage.model import create_clip, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ATOL = 1e-4


def _photo(seed=0, size=(53, 41)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _perturb(model, seed=0):
    """Trained-looking weights: random init leaves LayerNorms at 1/0, which would hide a mis-mapped norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(3.1)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_export_matches_open_clip(tmp_path, quick_gelu):
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    bundle = create_clip("addressclip-tiny", force_quick_gelu=quick_gelu)
    model = bundle.model.eval()
    _perturb(model)
    res = export_open_clip(model, bundle.tokenizer, tmp_path)
    assert res.tokenizer and res.clip_dir is not None and not res.skipped
    assert all(v < ATOL for v in res.max_abs_diff.values())
    assert (tmp_path / VISION_DIR / "model.safetensors").exists() and (tmp_path / CLIP_DIR / "model.safetensors").exists()
    cfg = json.loads((tmp_path / VISION_DIR / "config.json").read_text())
    assert cfg["hidden_act"] == ("quick_gelu" if quick_gelu else "gelu")

    # same image through each library's own preprocessing
    image = _photo()
    ref_pixels = bundle.preprocess_val(image).unsqueeze(0)
    proc = CLIPProcessor.from_pretrained(tmp_path / CLIP_DIR)
    hf_pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    assert hf_pixels.shape == ref_pixels.shape
    # resampling implementations differ by rounding only: at most one 8-bit level (1/255/std ~ 0.015)
    assert (hf_pixels - ref_pixels).abs().max() < 0.02
    ref = open_clip_reference(model, ref_pixels)

    with torch.no_grad():
        plain = CLIPVisionModel.from_pretrained(tmp_path / VISION_DIR).eval()  # what LLaVA loads
        out = plain(pixel_values=ref_pixels, output_hidden_states=True)
        assert len(out.hidden_states) == len(model.visual.transformer.resblocks) + 1
        assert (out.hidden_states[-2] - ref["hidden_states_-2"]).abs().max() < ATOL
        assert (out.pooler_output - ref["pooler_output"]).abs().max() < ATOL
        proj = CLIPVisionModelWithProjection.from_pretrained(tmp_path / VISION_DIR).eval()
        emb = proj(pixel_values=ref_pixels).image_embeds
        assert (emb - model.encode_image(ref_pixels)).abs().max() < ATOL

        full = CLIPModel.from_pretrained(tmp_path / CLIP_DIR).eval()
        texts = ["Esplanadi between Kaivokatu and Fredrikinkatu, Kluuvi, Helsinki", "Bulevardi", "a street view"]
        ids = proc.tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        oc_ids = bundle.tokenizer(texts)
        for row in range(len(texts)):
            n = int(oc_ids[row].argmax()) + 1  # up to and including EOT; padding ids differ (0 vs EOT)
            assert ids["input_ids"][row, :n].tolist() == oc_ids[row, :n].tolist()
        hf_text = full.get_text_features(**ids)
        hf_text = getattr(hf_text, "pooler_output", hf_text)
        assert (hf_text - model.encode_text(oc_ids)).abs().max() < ATOL
        hf_img = full.get_image_features(pixel_values=ref_pixels)
        hf_img = getattr(hf_img, "pooler_output", hf_img)
        assert (hf_img - model.encode_image(ref_pixels)).abs().max() < ATOL
        assert abs(full.logit_scale.item() - 3.1) < 1e-6


def _custom_clip(vision=None, text=None, **kw):
    from open_clip.model import CLIP

    v = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, **(vision or {})}
    t = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, **(text or {})}
    return CLIP(embed_dim=16, vision_cfg=v, text_cfg=t, output_dict=True, **kw).eval()


@pytest.mark.parametrize("vision, match", [
    ({"layers": [1, 1, 1, 1], "width": 16}, "not an open_clip VisionTransformer"),
    ({"ls_init_value": 0.1}, "layer scale"),
    ({"pool_type": "avg"}, "pool_type"),
    ({"qk_norm": True}, "custom attention"),
    ({"no_ln_pre": True}, "no_ln_pre"),
])
def test_unmappable_image_towers_are_refused(tmp_path, vision, match):
    model = _custom_clip(vision=vision)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        export_open_clip(model, None, tmp_path / "out")
    assert not (tmp_path / "out" / VISION_DIR).exists()  # nothing half-written


def test_unmappable_text_tower_exports_vision_only(tmp_path):
    model = _custom_clip(text={"pool_type": "last"})
    res = export_open_clip(model, None, tmp_path / "a")
    assert res.clip_dir is None and "pool_type" in res.skipped[0]
    assert res.max_abs_diff["vision.hidden_states_-2"] < ATOL
    with pytest.raises(UnsupportedArchitectureError, match="pool_type"):
        export_open_clip(model, None, tmp_path / "b", full=True)
    with pytest.raises(UnsupportedArchitectureError, match="logit bias"):
        export_open_clip(_custom_clip(init_logit_bias=-10.0), None, tmp_path / "c", full=True)


def test_export_main_from_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    bundle = create_clip("addressclip-tiny")
    _perturb(bundle.model, seed=1)
    ck = save_checkpoint(tmp_path / "run" / "final", bundle.model, "addressclip-tiny", None, train_config={"seed": 1})
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    report = json.loads((tmp_path / "hf" / REPORT_FILE).read_text())
    assert report["tokenizer"] and report["source"]["checkpoint"] == str(tmp_path / "run")
    assert max(report["max_abs_diff"].values()) < ATOL
    assert main(["--checkpoint", str(ck), "--out", str(tmp_path / "v"), "--vision-only"]) == 0
    assert (tmp_path / "v" / VISION_DIR).is_dir() and not (tmp_path / "v" / CLIP_DIR).exists()
    assert "vision tower" in capsys.readouterr().out


def _export_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export-clip: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_is_atomic_and_overwrite_replaces_the_whole_folder(tmp_path, capsys, monkeypatch):
    import clip_stage.export_hf as ex

    torch.manual_seed(2)
    bundle = create_clip("addressclip-tiny")
    save_checkpoint(tmp_path / "run" / "final", bundle.model, "addressclip-tiny", None)
    run, out = tmp_path / "run", tmp_path / "run" / "hf"
    assert main(["--checkpoint", str(run), "--out", str(out), "--no-verify"]) == 0
    assert (out / CLIP_DIR).is_dir()
    before = _snapshot(out)
    capsys.readouterr()

    # bad options and inputs are refused before the model loads, and the earlier export is untouched
    real_load = ex.bundle_from_args
    monkeypatch.setattr(ex, "bundle_from_args", lambda *a, **k: pytest.fail("model loaded before the checks"))
    _export_error(capsys, ["--checkpoint", str(run), "--out", str(out), "--overwrite", "--atol", "-1"], "--atol")
    _export_error(capsys, ["--checkpoint", str(run), "--out", str(out), "--overwrite", "--benchmark",
                           str(tmp_path / "nonexist.json")], "nonexist.json")
    _export_error(capsys, ["--checkpoint", str(run), "--out", str(run / "final" / "hf")], "inside the input")
    alone = tmp_path / "copied_final"  # a checkpoint folder outside any run: still never written into
    shutil.copytree(run / "final", alone)
    _export_error(capsys, ["--checkpoint", str(alone), "--out", str(alone / "hf")], "inside the input")
    monkeypatch.setattr(ex, "bundle_from_args", real_load)

    # an export that fails after writing (verification) leaves the earlier one as it was, and no staging
    assert main(["--checkpoint", str(run), "--out", str(out), "--overwrite", "--atol", "0"]) == 2
    assert "differs from open_clip" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert not [p for p in run.iterdir() if p.name.startswith(".hf.")]

    # --overwrite with --vision-only: the new export alone, no clip_model/ of the old one; the card says so
    assert main(["--checkpoint", str(run), "--out", str(out), "--overwrite", "--vision-only", "--no-verify"]) == 0
    assert (out / VISION_DIR).is_dir() and not (out / CLIP_DIR).exists()
    assert "clip_model/" not in (out / "README.md").read_text()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["vision_tower"] == VISION_DIR and report["clip_model"] is None
    assert json.loads((out / ".address-llava.json").read_text())["kind"] == "export-clip"


def test_export_bad_model_source_is_one_line(tmp_path, capsys):
    _export_error(capsys, ["--model", "nonexist", "--out", str(tmp_path / "o")], "unknown CLIP architecture")
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pt")
    _export_error(capsys, ["--model", "addressclip-tiny", "--pretrained", str(tmp_path / "w.pt"), "--out",
                           str(tmp_path / "o")], "do not fit")
    assert not (tmp_path / "o").exists()
