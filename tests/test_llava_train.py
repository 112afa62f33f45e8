"""train-llava in one process on a tiny LLaVA: it learns, trains exactly the parts the recipe names, writes
self-contained checkpoints at every save, logs to TensorBoard, and `--resume` continues a stopped run to the
same weights and losses as an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llava_address.train import main, parse_args, train
from tests.llava_helpers import checkpoint_tensors, reference_logits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _argv(recipe, model_dir, data_dir, out, *extra):
    return [
        "--config", recipe, "--model-name-or-path", str(model_dir), "--data-path", str(Path(data_dir) / "train.json"),
        "--output-dir", str(out), "--model.torch-dtype", "float32", "--mixed-precision", "no",
        "--no-progress-bar", *map(str, extra),
    ]


LORA_SMALL = ("--trainables.lora-r", 8, "--lora-alpha", 16)


def _base_weights(model_dir) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _plain(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def _expected_lr(step: int, total: int, peak: float, warmup_ratio: float = 0.03) -> float:
    w = math.ceil(warmup_ratio * total)
    if step < w:
        return peak * step / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))


def test_lora_recipe_trains_checkpoints_and_logs(tiny_llava_dir, tiny_llava_data, tmp_path):
    from llava_address.checkpoint import list_checkpoints, load_checkpoint

    out = tmp_path / "run"
    # 12 records, 4 per micro-batch, 2 micro-batches per step -> 2 steps per epoch, 16 steps.
    cfg = parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, out, *LORA_SMALL,
                           "--per-device-batch-size", 4, "--global-batch-size", 8, "--num-epochs", 8,
                           "--learning-rate", 1e-2, "--projector-lr", 3e-3, "--save-every", 8))
    assert cfg.trainables.llm == "lora" and cfg.trainables.lora_dropout == 0.05  # from the recipe
    result = train(cfg)
    assert result.global_step == 16 and result.world_size == 1
    hist = result.history
    assert [r["step"] for r in hist] == list(range(1, 17))

    # It learns.
    first, last = sum(r["loss"] for r in hist[:3]) / 3, sum(r["loss"] for r in hist[-3:]) / 3
    assert last < first - 0.3, (first, last)
    # Our schedule and our per-group learning rates reached the optimizer.
    for i, r in enumerate(hist):
        assert r["lr/llm"] == pytest.approx(_expected_lr(i, 16, 1e-2), rel=1e-6, abs=1e-12)
        assert r["lr/projector"] == pytest.approx(_expected_lr(i, 16, 3e-3), rel=1e-6, abs=1e-12)
        assert r["tokens_per_s"] > 0 and r["memory_mb"] > 0

    # Base weights unchanged; LoRA and the projector changed.
    base = _base_weights(tiny_llava_dir)
    trained = {n: p.detach() for n, p in result.model.named_parameters()}
    checked = 0
    for name, t in trained.items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        assert torch.equal(t, base[_plain(name)]), f"frozen weight {name} changed"
        checked += 1
    assert checked > 40
    lora_b = [t for n, t in trained.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero and must have moved"
    assert any("language_model" in n for n in trained if "lora_A" in n)
    assert not any("vision_tower" in n for n in trained if "lora_" in n), "LoRA must stay inside the LLM"
    proj = {n: t for n, t in trained.items() if ".modules_to_save." in n}
    assert proj
    for n, t in proj.items():
        assert not torch.equal(t, base[_plain(n.replace(".modules_to_save.default.", "."))]), f"{n} did not train"

    # Every checkpoint stands on its own; the last reloads to the same logits as the trained model.
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["checkpoint-000008", "checkpoint-000016"]
    for c in ckpts:
        for f in ("adapter_model.safetensors", "adapter_config.json", "llava_args.json", "trainer_state.json",
                  "non_lora_trainables.safetensors"):
            assert (c / f).is_file(), f"{c.name} lacks {f}"
        assert (c / "state").is_dir()
        args = json.loads((c / "llava_args.json").read_text())
        assert args["train"]["learning_rate"] == 1e-2 and "LoRA" in args["recipe_text"]
        assert args["trainables"]["llm"] == "lora"
    assert [p.name for p in out.glob(".*")] == [".address-llava.json"], "no temporary folders left behind, only the marker"
    expected = reference_logits(result.model, result.processor, tiny_llava_data)
    reloaded, processor = load_checkpoint(ckpts[-1])
    assert torch.allclose(reference_logits(reloaded, processor, tiny_llava_data), expected, atol=1e-5)
    mid, processor = load_checkpoint(ckpts[0])
    assert not torch.allclose(reference_logits(mid, processor, tiny_llava_data), expected, atol=1e-3)

    # metrics.jsonl and TensorBoard carry loss, lr, tokens/s and memory.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == hist
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "tokens_per_s", "memory_mb", "lr/llm", "lr/projector"} <= tags
    assert len(acc.Scalars("loss")) == 16
    # ... and the run draws its curves (clip_stage.core.curves) at each checkpoint and the end
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_stop_matches_uninterrupted_run(tiny_llava_dir, tiny_llava_data, tmp_path):
    # 12 records, 2 per micro-batch, accumulation 2 -> 3 steps per epoch; 3 epochs = 9 steps.
    # LoRA dropout stays on (recipe 0.05), so the RNG state must be restored too.
    common = (*LORA_SMALL, "--per-device-batch-size", 2, "--gradient-accumulation-steps", 2,
              "--global-batch-size", "none", "--num-epochs", 3, "--learning-rate", 3e-3, "--save-every", 2)
    full = train(parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path / "a", *common)))
    assert full.global_step == 9

    # Stop at step 4: one step into the second epoch (a checkpoint is written there, then the run ends).
    stopped = train(parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path / "b", *common,
                                     "--stop-at-step", 4)))
    assert stopped.stopped_early and stopped.global_step == 4
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-000002", "checkpoint-000004"]
    state = json.loads((tmp_path / "b" / "checkpoint-000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done_in_epoch"]) == (1, 2)

    assert main(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path / "b", *common,
                      "--resume", "latest")) == 0
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for ra, rb in zip(full.history, rows_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), (ra["step"], ra["loss"], rb["loss"])
        assert rb["lr/llm"] == pytest.approx(ra["lr/llm"], rel=1e-9)

    a = checkpoint_tensors(tmp_path / "a" / "checkpoint-000009")
    b = checkpoint_tensors(tmp_path / "b" / "checkpoint-000009")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # And the step-4 state really differs from the end state (the resumed run did train).
    mid = checkpoint_tensors(tmp_path / "b" / "checkpoint-000004")
    assert any(not torch.allclose(mid[k], b[k]) for k in b)


def test_projector_alignment_trains_only_the_projector(tiny_llava_dir, tiny_llava_data, tmp_path):
    from llava_address.checkpoint import load_checkpoint

    out = tmp_path / "align"
    result = train(parse_args(_argv("align_projector", tiny_llava_dir, tiny_llava_data, out,
                                    "--per-device-batch-size", 4, "--global-batch-size", 4, "--max-steps", 3,
                                    "--save-every", 1, "--save-total-limit", 2)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-000002", "checkpoint-000003"]
    model = result.model
    assert not hasattr(model, "peft_config")
    assert _checkpointing(model)  # the recipe asks for it
    base = _base_weights(tiny_llava_dir)
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            assert p.requires_grad and not torch.equal(p.detach(), base[name]), name
        else:
            assert not p.requires_grad and torch.equal(p.detach(), base[name]), name
    assert [r["lr/projector"] for r in result.history][1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0)))
    ckpt = out / "checkpoint-000003"
    assert not (ckpt / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "non_lora_trainables.safetensors")))
    assert keys and all("multi_modal_projector" in k for k in keys)
    reloaded, processor = load_checkpoint(ckpt)
    assert torch.allclose(reference_logits(reloaded, processor, tiny_llava_data),
                          reference_logits(model, result.processor, tiny_llava_data), atol=1e-5)


def _with_text_only_records(data_dir, out_dir) -> Path:
    records = json.loads((Path(data_dir) / "train.json").read_text())
    records += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": "Which street runs by the harbour?"},
                                                       {"from": "gpt", "value": "The one along the water."}]}
                for i in range(4)]
    out_dir.mkdir()
    (out_dir / "train.json").write_text(json.dumps(records))
    return out_dir


def test_text_only_records_are_refused_when_only_the_projector_trains(tiny_llava_dir, tiny_llava_data, tmp_path,
                                                                     capsys):
    # LLaVA's own mixes hold text-only records; under projector alignment they would give no gradient at all
    # (a library traceback mid-run): one line naming the file instead, before any step.
    data = _with_text_only_records(tiny_llava_data, tmp_path / "data")
    argv = _argv("align_projector", tiny_llava_dir, data, tmp_path / "align", "--image-root",
                 tiny_llava_data, "--per-device-batch-size", 4, "--global-batch-size", 4,
                 "--max-steps", 2)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 text-only records" in err and str(data / "train.json") in err
    assert not list((tmp_path / "align").glob("checkpoint-*"))
    # the same data trains when the LLM trains (full fine-tuning)
    full = train(parse_args(_argv("address_full", tiny_llava_dir, data, tmp_path / "full", "--image-root",
                                  tiny_llava_data, "--per-device-batch-size", 4,
                                  "--global-batch-size", 4, "--max-steps", 4, "--no-gradient-checkpointing")))
    assert full.global_step == 4


def test_lora_stage_starts_from_the_aligned_projector(tiny_llava_dir, tiny_llava_data, tmp_path):
    from safetensors.torch import load_file

    align = train(parse_args(_argv("align_projector", tiny_llava_dir, tiny_llava_data, tmp_path / "align",
                                   "--per-device-batch-size", 4, "--global-batch-size", 4, "--max-steps", 2,
                                   "--no-gradient-checkpointing")))
    aligned = load_file(str(tmp_path / "align" / "checkpoint-000002" / "non_lora_trainables.safetensors"))
    lora = train(parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path / "lora", *LORA_SMALL,
                                  "--per-device-batch-size", 4, "--global-batch-size", 4, "--max-steps", 1,
                                  "--no-gradient-checkpointing",
                                  "--init-from", tmp_path / "align" / "checkpoint-000002")))
    assert align.global_step == 2 and lora.global_step == 1
    start = {n.removeprefix("base_model.model.").replace(".original_module.", "."): p.detach()
             for n, p in lora.model.named_parameters() if ".original_module." in n}
    assert start.keys() == aligned.keys()
    for k in aligned:
        assert torch.equal(start[k], aligned[k]), k
    with pytest.raises(ValueError, match="merge"):
        train(parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path / "x", *LORA_SMALL,
                               "--init-from", tmp_path / "lora" / "checkpoint-000001")))


def test_full_finetune_updates_llm_not_tower(tiny_llava_dir, tiny_llava_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    result = train(parse_args(_argv("address_full", tiny_llava_dir, tiny_llava_data, out,
                                    "--per-device-batch-size", 4, "--global-batch-size", 4, "--max-steps", 2,
                                    "--learning-rate", 1e-3, "--no-gradient-checkpointing")))
    base = _base_weights(tiny_llava_dir)
    params = dict(result.model.named_parameters())
    assert not torch.equal(params["model.language_model.layers.0.mlp.up_proj.weight"].detach(),
                           base["model.language_model.layers.0.mlp.up_proj.weight"])
    for name, p in params.items():
        if "vision_tower" in name:
            assert torch.equal(p.detach(), base[name]), name
    keys = set(load_file(str(out / "checkpoint-000002" / "non_lora_trainables.safetensors")))
    assert any("language_model" in k for k in keys) and any("multi_modal_projector" in k for k in keys)
    assert not any("vision_tower" in k for k in keys)


def test_gradient_checkpointing_gives_the_same_update(tiny_llava_dir, tiny_llava_data, tmp_path):
    runs = {}
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        r = train(parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path / flag, *LORA_SMALL,
                                   "--per-device-batch-size", 4, "--global-batch-size", 4, "--max-steps", 2,
                                   "--warmup-ratio", 0, "--trainables.lora-dropout", 0, flag)))
        runs[flag] = r
    on, off = runs["--gradient-checkpointing"], runs["--no-gradient-checkpointing"]
    assert _checkpointing(on.model.get_base_model()) and not _checkpointing(off.model.get_base_model())
    assert [x["loss"] for x in on.history] == pytest.approx([x["loss"] for x in off.history], rel=1e-5)
    p_on = dict(on.model.named_parameters())
    for n, p in off.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, p_on[n], atol=1e-6), n


def test_recipe_and_flags(tiny_llava_dir, tiny_llava_data, tmp_path, capsys):
    from llava_address.train_args import list_recipes

    assert {"align_projector", "address_lora", "address_qlora", "address_full"} <= set(list_recipes())
    cfg = parse_args(_argv("address_lora", tiny_llava_dir, tiny_llava_data, tmp_path, "--learning-rate", 5e-5,
                           "--trainables.lora-r", 4))
    # The recipe fills what the flags do not give; flags win.
    assert cfg.train.learning_rate == 5e-5 and cfg.trainables.lora_r == 4
    assert cfg.trainables.lora_alpha == 256 and cfg.train.projector_lr == 2e-5 and cfg.train.global_batch_size == 128
    assert cfg.train.lr_scheduler == "cosine" and cfg.train.warmup_ratio == 0.03 and cfg.train.num_epochs == 1
    q = parse_args(["--config", "address_qlora", "--data-path", "x.json"])
    assert q.model.load_in_4bit and q.model.bnb_4bit_quant_type == "nf4"
    with pytest.raises(FileNotFoundError, match="address_lora"):
        parse_args(["--config", "no_such_recipe", "--data-path", "x.json"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 1.0e-3\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args(["--config", str(bad), "--model-name-or-path", "m", "--data-path", "x.json"])
    with pytest.raises(SystemExit):
        parse_args(["--config", "address_lora", "--data-path", "x.json", "--lr-scheduler", "step"])
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "peak learning rate of the projector parameter group" in help_text
    assert "--trainables.lora-r" in help_text and "--model.vision-tower" in help_text
    from llava_address.train_args import TrainArgs

    with pytest.raises(ValueError, match="not a multiple"):
        TrainArgs(per_device_batch_size=16, global_batch_size=128).accumulation_for(3)
    assert TrainArgs(per_device_batch_size=16, global_batch_size=128).accumulation_for(8) == 1
    assert TrainArgs(per_device_batch_size=16, global_batch_size=128).accumulation_for(1) == 8


def test_local_model_folders_are_stored_as_absolute_paths(tmp_path, monkeypatch):
    """A checkpoint names its base; `chat --adapter` or `merge` run from another folder must still find it."""
    from llava_address.train import with_absolute_model_paths

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "data.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_model_paths(parse_args(["--model-name-or-path", "models/base", "--data-path", "data.json",
                                                "--model.vision-tower", "openai/clip-vit-large-patch14-336",
                                                "--output-dir", "run"]))
    assert cfg.model.model_name_or_path == str(tmp_path / "models" / "base")
    assert cfg.model.vision_tower == "openai/clip-vit-large-patch14-336"  # a hub id stays one
