"""QLoRA on CPU: the address_qlora recipe loads the tiny LLaVA's LLM in 4-bit NF4 (bitsandbytes), trains the
LoRA adapter and the projector, and leaves the quantised weights alone.

bitsandbytes trap (bitsandbytes 0.50 CPU backend): on CPUs with AVX512-BF16 an eval-mode no-grad forward repacks 4-bit weights
into an inference-only layout with no backward, and LoRA gradients silently become None. train-llava calls
model.train() before the first forward and never evaluates mid-run; this test asserts the adapter moved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_address.train import parse_args, train
from llava_address.train_inputs import build_model
from tests.llava_helpers import reference_logits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _argv(model_dir, data_dir, out):
    return [
        "--config", "address_qlora", "--model-name-or-path", str(model_dir),
        "--data-path", str(Path(data_dir) / "train.json"), "--output-dir", str(out),
        "--model.torch-dtype", "float32", "--bnb-4bit-compute-dtype", "float32", "--mixed-precision", "no",
        "--trainables.lora-r", "8", "--lora-alpha", "16", "--per-device-batch-size", "4", "--global-batch-size", "8",
        "--max-steps", "6", "--learning-rate", "1e-2", "--projector-lr", "3e-3", "--no-progress-bar",
        "--report-to", "none",
    ]


def test_qlora_nf4_trains_adapter_and_projector_only(tiny_llava_dir, tiny_llava_data, tmp_path):
    import bitsandbytes as bnb

    from llava_address.checkpoint import load_checkpoint

    cfg = parse_args(_argv(tiny_llava_dir, tiny_llava_data, tmp_path / "run"))
    assert cfg.model.load_in_4bit and cfg.model.bnb_4bit_quant_type == "nf4"
    # The model as it starts (same seed: same quantised base, same LoRA init).
    initial, _, _ = build_model(cfg)
    init = {n: p.detach().clone() for n, p in initial.named_parameters()}

    result = train(cfg)
    model = result.model
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit, "no 4-bit layers: the LLM was not quantised"
    assert all("language_model" in n for n in four_bit), "only the LLM is quantised (not the tower/projector)"
    assert {m.weight.quant_type for m in four_bit.values()} == {"nf4"}

    hist = result.history
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert sum(r["loss"] for r in hist[-2:]) / 2 < sum(r["loss"] for r in hist[:2]) / 2 - 0.1

    params = dict(model.named_parameters())
    lora = [n for n in params if "lora_" in n]
    assert lora
    for n in lora:
        assert not torch.equal(params[n].detach(), init[n]), f"adapter weight {n} did not change (4-bit trap?)"
    proj = [n for n in params if ".modules_to_save." in n and "multi_modal_projector" in n]
    assert proj and all(not torch.equal(params[n].detach(), init[n]) for n in proj)
    for n, p in params.items():
        if "lora_" in n or ".modules_to_save." in n:
            continue
        # Packed 4-bit weights, norms, embeddings, tower: untouched.
        assert torch.equal(p.detach(), init[n]), f"frozen {n} changed"

    reloaded, processor = load_checkpoint(tmp_path / "run" / "checkpoint-000006")
    assert torch.allclose(reference_logits(reloaded, processor, tiny_llava_data),
                          reference_logits(model, result.processor, tiny_llava_data), atol=1e-4)
