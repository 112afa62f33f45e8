"""train-clip on the toy dataset: it learns, resumes exactly, runs 2 real processes, refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from clip_stage.core.config import ConfigError
from clip_stage.train_config import parse_config
from clip_stage.train_data import AddressImageDataset
from clip_stage.model import CheckpointError, create_clip, latest_checkpoint, load_checkpoint, save_checkpoint
from clip_stage.core.schema import write_records
from clip_stage.train import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _argv(dataset, out, *extra):
    return ["--dataset", str(dataset), "--model", "addressclip-tiny", "--pretrained", "none",
            "--output-dir", str(out), "--num-workers", "0", "--progress-bar", "false", "--learning-rate", "1e-3",
            "--min-lr", "1e-5", "--per-device-batch-size", "16", *map(str, extra)]


def _summary(out) -> dict:
    return json.loads((Path(out) / "run_summary.json").read_text())


def _weights(d) -> dict[str, torch.Tensor]:
    return load_file(str(Path(d) / "model.safetensors"))


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _retrieval_accuracy(run, dataset, split) -> float:
    bundle = load_checkpoint(run)
    bundle.model.eval()
    data = AddressImageDataset(dataset, split, bundle.preprocess_val)
    candidates = sorted(set(data.addresses))
    with torch.no_grad():
        text = bundle.model.encode_text(bundle.tokenizer(candidates), normalize=True)
        images = bundle.model.encode_image(torch.stack([data[i]["image"] for i in range(len(data))]), normalize=True)
    pred = (images @ text.T).argmax(1)
    truth = torch.tensor([candidates.index(a) for a in data.addresses])
    return (pred == truth).float().mean().item()


def _copy_dataset(src, dst, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        df = pd.read_parquet(Path(dst) / "records.parquet")
        write_records(edit(df), Path(dst) / "records.parquet")
    return Path(dst)


def test_an_items_augmentation_depends_on_seed_epoch_and_row_alone(toy_dataset, monkeypatch):
    from torchvision import transforms

    crop = transforms.Compose([transforms.RandomResizedCrop(16), transforms.PILToTensor()])
    data = AddressImageDataset(toy_dataset, "train", crop, seed=5)
    gpu_seeds = []  # a GPU's generator (dropout in a num_workers=0 run) is not re-seeded per item
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpu_seeds.append)
    first = data[3]["image"]
    assert gpu_seeds == []
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(data[3]["image"], first)  # whatever the global stream was
    assert torch.equal(torch.get_rng_state(), state)  # and the global stream is left as it was
    data.set_epoch(1)
    assert not torch.equal(data[3]["image"], first)


def test_training_learns_the_toy_city(toy_dataset, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(toy_dataset, out, "--num-epochs", "12", "--log-every", "6", "--save-every", "30")) == 0
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"address_loss", "semantic_loss", "geo_loss", "loss", "lr", "images_per_s"} <= set(log[0])
    assert log[-1]["loss"] < 0.75 * log[0]["loss"]
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn from the same log
    assert log[-1]["lr"] < log[0]["lr"] or log[0]["lr"] < 1e-3  # cosine decay (or still warming up at the first point)
    summary = _summary(out)
    assert summary["world_size"] == 1 and summary["complete"] and summary["steps"] == 12 * (108 // 16)
    assert summary["loss_weights"] == {"address": 1.0, "semantic": 0.2, "geo": 0.8}
    # chance is 1/9 over the nine sub-street addresses
    assert _retrieval_accuracy(out, toy_dataset, "train") > 0.6
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # checkpoints: final/, step folders within save_total_limit, the newest found, self-describing config
    cfg = json.loads((out / "final" / "clip_config.json").read_text())
    assert cfg["model_name"] == "addressclip-tiny" and cfg["model_config"]["vision_cfg"]["width"] == 64
    assert cfg["train_config"]["optim"]["learning_rate"] == 1e-3
    steps = sorted(p.name for p in out.glob("checkpoint-*"))
    assert steps == ["checkpoint-000060", "checkpoint-000072"] and latest_checkpoint(out).name == "checkpoint-000072"
    assert _max_diff(_weights(out / "final"), _weights(out / "checkpoint-000072")) == 0


def test_resume_reproduces_an_uninterrupted_run(toy_dataset, tmp_path, capsys):
    # 8 steps over 2 epochs (6 batches each): the interruption at step 5 falls inside epoch 0
    common = ("--max-steps", "8", "--save-every", "100", "--warmup-steps", "2", "--seed", "3")
    main(_argv(toy_dataset, tmp_path / "full", *common))
    part = tmp_path / "part"
    main(_argv(toy_dataset, part, *common, "--stop-at-step", "5"))
    assert not (part / "final").exists() and not _summary(part)["complete"]
    assert latest_checkpoint(part).name == "checkpoint-000005"
    state = torch.load(part / "checkpoint-000005" / "training_state.pt", weights_only=True)
    assert state["step"] == 5 and state["batch_in_epoch"] == 5 and state["optimizer"]["state"]
    assert main(_argv(toy_dataset, part, *common)) == 2  # one line on stderr, no traceback
    assert "--resume" in capsys.readouterr().err
    main(_argv(toy_dataset, part, *common, "--resume", "latest"))
    summary = _summary(part)
    assert summary["complete"] and summary["resumed_from"].endswith("checkpoint-000005")
    assert _max_diff(_weights(tmp_path / "full" / "final"), _weights(part / "final")) < 1e-6
    assert summary["last_losses"]["loss"] == pytest.approx(_summary(tmp_path / "full")["last_losses"]["loss"], abs=1e-6)
    # resuming a finished run is a no-op that keeps its results
    main(_argv(toy_dataset, part, *common, "--resume", "latest"))
    assert _summary(part) == summary
    # a checkpoint of another architecture is a clear error, not a shape dump
    assert main([*_argv(toy_dataset, part, *common, "--resume", "latest"), "--model", "addressclip-small"]) == 2
    assert "addressclip-small" in capsys.readouterr().err


def test_two_processes_via_accelerate_launch_match_one_process(toy_dataset, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = _argv(toy_dataset, tmp_path / "ddp", "--max-steps", "3", "--log-every", "1")
    args[args.index("--per-device-batch-size") + 1] = "8"
    proc = subprocess.run([*accelerate, "-m", "clip_stage.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = _summary(tmp_path / "ddp")
    assert ddp["world_size"] == 2 and ddp["steps"] == 3
    # 2 processes x batch 8 see the same global batches as 1 process x batch 16: same losses
    main(_argv(toy_dataset, tmp_path / "single", "--max-steps", "3", "--log-every", "1"))
    single = _summary(tmp_path / "single")
    for k, v in single["last_losses"].items():
        assert ddp["last_losses"][k] == pytest.approx(v, abs=1e-5), k
    assert _max_diff(_weights(tmp_path / "ddp" / "final"), _weights(tmp_path / "single" / "final")) < 1e-3


def test_empty_captions_with_semantic_weight_is_an_error(toy_dataset, tmp_path, capsys):
    data = _copy_dataset(toy_dataset, tmp_path / "d", lambda df: df.assign(caption=""))
    assert main(_argv(data, tmp_path / "r")) == 2  # a user error: one line, exit 2
    assert "caption" in capsys.readouterr().err
    # without the semantic term it trains
    main(_argv(data, tmp_path / "r2", "--semantic-weight", "0", "--max-steps", "1"))
    assert "semantic_loss" not in _summary(tmp_path / "r2")["last_losses"]


def test_a_record_image_outside_the_dataset_is_a_one_line_error_before_training(toy_dataset, tmp_path, capsys):
    data = _copy_dataset(toy_dataset, tmp_path / "d", lambda df: df.assign(image=["../../outside/secret.png"] + list(df["image"][1:])))
    assert main(_argv(data, tmp_path / "r", "--max-steps", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records.parquet" in err and "escapes the image root" in err
    assert not (tmp_path / "r").exists()


def test_missing_coordinates_disable_geo_with_warning_or_error_when_asked(toy_dataset, tmp_path, capsys):
    data = _copy_dataset(toy_dataset, tmp_path / "d", lambda df: df.assign(utm_x=float("nan"), utm_y=float("nan")))
    with pytest.warns(UserWarning, match="geo loss is disabled"):
        main(_argv(data, tmp_path / "r", "--max-steps", "1"))
    summary = _summary(tmp_path / "r")
    assert summary["loss_weights"]["geo"] == 0.0 and "geo_loss" not in summary["last_losses"]
    assert main(_argv(data, tmp_path / "r2", "--geo-weight", "0.8")) == 2
    assert "--geo-weight" in capsys.readouterr().err


def test_bf16_and_gradient_checkpointing_options_train(toy_dataset, tmp_path):
    main(_argv(toy_dataset, tmp_path / "r", "--max-steps", "2", "--mixed-precision", "bf16", "--gradient-checkpointing"))
    summary = _summary(tmp_path / "r")
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["last_losses"]["loss"]))
    torch.manual_seed(0)  # the run's seed: the same initial weights
    before = create_clip("addressclip-tiny", None).model.state_dict()
    assert _max_diff(before, _weights(tmp_path / "r" / "final")) > 1e-5


def test_config_file_and_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {model: addressclip-tiny, pretrained: none}\nlearning_rate: 0.0005\ndata: {dataset: /x}\n")
    cfg = parse_config(["--config", str(recipe), "--num-epochs", "3", "--no-augment"])
    assert cfg.model.model == "addressclip-tiny" and cfg.model.pretrained is None
    assert cfg.optim.learning_rate == 5e-4 and cfg.optim.num_epochs == 3 and cfg.data.augment is False
    assert cfg.optim.adam_beta2 == 0.98 and cfg.loss.semantic_weight == 0.2  # paper defaults
    # a value the config refuses is a one-line user error naming its section (exit 2 through command_main)
    with pytest.raises(ConfigError, match="model: mixed_precision 'fp8'"):
        parse_config(["--dataset", "/x", "--mixed-precision", "fp8"])
    with pytest.raises(ConfigError, match="loss: .*nope"):
        parse_config(["--dataset", "/x", "--geo-target", "nope"])


def test_load_checkpoint_refuses_weights_of_another_shape(tmp_path):
    small = create_clip("addressclip-small")
    save_checkpoint(tmp_path / "ck", small.model, "addressclip-tiny", None)  # lying config
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("change, field", [
    (("--learning-rate", "5e-3"), "optim.learning_rate"),
    (("--address-style", "street"), "data.address_style"),
    (("--max-steps", "12"), "optim.max_steps"),
    (("--geo-weight", "0.3"), "loss.geo_weight"),
    (("--seed", "9"), "optim.seed"),
    (("--dataset", "COPY"), "data.dataset"),
])
def test_resume_with_settings_that_change_the_result_is_refused(change, field, toy_dataset, tmp_path, capsys):
    common = ("--max-steps", "8", "--save-every", "100", "--warmup-steps", "2", "--seed", "3", "--report-to", "none")
    part = tmp_path / "part"
    assert main(_argv(toy_dataset, part, *common, "--stop-at-step", "4")) == 0
    before = sorted(p.name for p in part.iterdir())
    if change[1] == "COPY":
        change = (change[0], str(_copy_dataset(toy_dataset, tmp_path / "other")))
    capsys.readouterr()
    argv = _argv(toy_dataset, part, *common, "--resume", "latest")
    argv += [*change]  # a repeated flag: the last one wins
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train-clip: error: ") and "\n" not in err and field in err
    assert sorted(p.name for p in part.iterdir()) == before and not (part / "final").exists()
    # settings that do not change the result may differ: logging, checkpointing, workers, the same path respelled
    same = os.path.relpath(toy_dataset)
    assert main(_argv(same, part, *common, "--resume", "latest", "--log-every", "3", "--save-every", "50",
                      "--num-workers", "1", "--gradient-checkpointing")) == 0
    assert _summary(part)["complete"]


@pytest.mark.parametrize("option, message", [
    (("--address-style", "bogus"), "unknown address style"),
    (("--split", "bogus"), "unknown split"),
    (("--mixed-precision", "fp16"), "needs a CUDA GPU"),
])
def test_bad_options_are_one_line_errors_before_anything_loads(option, message, toy_dataset, tmp_path, capsys):
    if option[1] == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a CUDA machine")
    out = tmp_path / "r"
    assert main(_argv(toy_dataset, out, "--report-to", "none", *option)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train-clip: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_run_killed_while_writing_final_resumes_with_its_last_losses(toy_dataset, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(toy_dataset, out, "--max-steps", "2", "--save-every", "2", "--log-every", "1")) == 0
    logged = _summary(out)["last_losses"]
    shutil.rmtree(out / "final")  # what a kill during the last save leaves: the step's checkpoint, no final/
    (out / "run_summary.json").unlink()
    assert main(_argv(toy_dataset, out, "--max-steps", "2", "--save-every", "2", "--log-every", "1",
                      "--resume", "latest")) == 0
    summary = _summary(out)
    assert (out / "final").is_dir() and summary["complete"]
    assert summary["last_losses"] == pytest.approx(logged) and "loss" in logged  # not {} from a run that trained nothing
