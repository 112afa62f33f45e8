"""`--report-to` in both trainers (clip_stage.core.trackers): TensorBoard, wandb (offline) and MLflow (local file
store) receive the same metrics as the trainers' JSONL logs, without a network; `none` writes no tracker
files; a bad name or a missing package is one line and exit code 2."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from clip_stage.core.trackers import TrackerError, check_installed, flat_config, parse_report_to

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No tracker settings from the environment; wandb's own config/cache folders inside tmp_path."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                 "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


# --- readers of what each tracker wrote -----------------------------------------------------------------


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def wandb_history(run_dir: Path) -> list[dict]:
    """The `run.log` rows of the one offline wandb run under run_dir/wandb.

    A `.wandb` file is a LevelDB-log-format stream (32 KiB blocks of chunks with a 7-byte header: crc32,
    length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) after a 7-byte W&B header; each record is a
    `wandb_internal_pb2.Record`. wandb no longer ships a Python reader, hence these lines.
    """
    from wandb.proto import wandb_internal_pb2

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return wandb_file_rows(files[0])


def wandb_file_rows(path: Path) -> list[dict]:
    """The `run.log` rows of one offline `.wandb` file (see wandb_history)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            break
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunks)
            chunks = b""
    rows = []
    for data in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def mlflow_run(run_dir: Path, experiment: str):
    """(client, the one run) of `experiment` in the file store run_dir/mlruns."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {run_dir / 'mlruns'}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def assert_same_series(series: dict[int, float], expected: dict[int, float], rel=1e-6):
    assert sorted(series) == sorted(expected)
    for step, value in expected.items():
        assert series[step] == pytest.approx(value, rel=rel), step


# --- the flag --------------------------------------------------------------------------------------------


def test_report_to_parsing():
    assert parse_report_to("tensorboard") == ("tensorboard",)
    assert parse_report_to("WandB, mlflow") == ("wandb", "mlflow")
    # a repeated flag gives a list of comma lists; repeats collapse, order is kept
    assert parse_report_to(["mlflow", "tensorboard,mlflow", "wandb"]) == ("mlflow", "tensorboard", "wandb")
    assert parse_report_to("none") == parse_report_to([]) == parse_report_to(None) == ()
    with pytest.raises(TrackerError, match=r"unknown tracker 'tensorbord'; valid: tensorboard, wandb, mlflow, none"):
        parse_report_to("tensorbord")
    with pytest.raises(TrackerError, match="'none' cannot be combined"):
        parse_report_to(["none", "wandb"])


def test_same_flag_in_both_trainers():
    from clip_stage.train_config import RunArgs, parse_config
    from llava_address.train import parse_args
    from llava_address.train_args import TrainArgs

    for extra, want in [([], ("tensorboard",)), (["--report-to", "wandb,mlflow"], ("wandb", "mlflow")),
                        (["--report-to", "wandb", "--report_to", "mlflow", "tensorboard"], ("wandb", "mlflow", "tensorboard")),
                        (["--report-to", "none"], ())]:
        assert parse_config(["--dataset", "d", *extra]).run.report_to == want, extra
        assert parse_args(["--data-path", "d", "--model-name-or-path", "m", *extra]).train.report_to == want, extra
    # train-clip's old --tensorboard switch is gone (pre-1.0: no aliases); train-llava's saved report_to string
    with pytest.raises(SystemExit):
        parse_config(["--dataset", "d", "--tensorboard", "false"])
    assert RunArgs(report_to="none").report_to == ()
    assert TrainArgs(report_to="tensorboard").report_to == ("tensorboard",)


def test_recipes_and_configs_name_trackers(tmp_path):
    from clip_stage.train_config import parse_config
    from llava_address.train import parse_args

    for text, want in [("wandb", ("wandb",)), ("[tensorboard, mlflow]", ("tensorboard", "mlflow")),
                       ("'wandb,mlflow'", ("wandb", "mlflow")), ("none", ())]:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"train:\n  report_to: {text}\n")
        assert parse_args(["--config", str(recipe), "--data-path", "d", "--model-name-or-path", "m"]).train.report_to == want
        config = tmp_path / "clip.yaml"
        config.write_text(f"run:\n  report_to: {text}\n")
        assert parse_config(["--config", str(config), "--dataset", "d"]).run.report_to == want
    # flags override the file
    assert parse_config(["--config", str(config), "--dataset", "d", "--report-to", "mlflow"]).run.report_to == ("mlflow",)


def test_flat_config_keeps_scalars_and_writes_the_rest_as_text():
    flat = flat_config({"optim": {"lr": 1e-3, "betas": (0.9, 0.98), "clip": None}, "run": {"resume": False}})
    assert flat == {"optim.lr": 1e-3, "optim.betas": "(0.9, 0.98)", "optim.clip": "None", "run.resume": False}


def test_tensorboard_writes_its_exact_folder_and_a_resume_purges_later_steps(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from clip_stage.core.trackers import finish_trackers, plan_trackers, start_trackers

    tb = tmp_path / "run" / "tensorboard"

    def run(resume_step, steps, value):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        plan = plan_trackers(["tensorboard"], tmp_path / "run", "p", tensorboard_dir=tb)
        accelerator = Accelerator(log_with=plan.log_with)
        start_trackers(accelerator, plan, {"a": {"b": 1}}, resume_step=resume_step)
        for step in steps:
            accelerator.log({"x": value}, step=step)
        finish_trackers(accelerator)

    run(None, range(1, 3), 0.5)  # a run killed at step 2, before its first checkpoint
    run(None, range(1, 9), 1.0)  # started afresh: the killed run's steps are hidden; killed at step 8 after step 4's checkpoint
    run(4, range(5, 7), 2.0)  # the resumed run: steps 7 and 8 of the killed one are hidden
    assert list(tb.glob("events.out.tfevents.*"))
    assert tensorboard_scalars(tb, "x") == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 2.0, 6: 2.0}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("x")) == [1, 2, 3, 4, 5, 6]  # each step once


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(TrackerError, match=r"--report-to wandb needs the wandb package: pip install wandb"):
        check_installed(["tensorboard", "wandb"])
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(TrackerError, match=r"pip install mlflow-skinny"):
        check_installed(["mlflow"])


# --- the trainers ------------------------------------------------------------------------------------------


def _clip_argv(dataset, out, *extra):
    return ["--dataset", str(dataset), "--model", "addressclip-tiny", "--pretrained", "none", "--output-dir", str(out),
            "--num-workers", "0", "--progress-bar", "false", "--learning-rate", "1e-3", "--min-lr", "1e-5", "--per-device-batch-size", "16",
            "--num-epochs", "1", "--max-steps", "3", "--log-every", "1", *map(str, extra)]


def test_train_clip_logs_to_every_tracker_offline(toy_dataset, tmp_path, offline_env):
    from clip_stage.train import main

    out = tmp_path / "run"
    assert main(_clip_argv(toy_dataset, out, "--report-to", "tensorboard,wandb", "--report-to", "mlflow")) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in log}
    assert sorted(loss) == [1, 2, 3]

    # TensorBoard: where it always was (events directly in <output-dir>/tensorboard)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert_same_series(tensorboard_scalars(out / "tensorboard", "train/loss"), loss)

    # wandb: an offline run under <output-dir>/wandb with the same losses at the same steps
    rows = [r for r in wandb_history(out) if "train/loss" in r]
    assert_same_series({r["_step"]: r["train/loss"] for r in rows}, loss)
    assert {"train/lr", "train/images_per_s", "train/logit_scale"} <= set(rows[0])

    # MLflow: the local file store <output-dir>/mlruns, experiment train_clip, the run's config as params
    client, run = mlflow_run(out, "train_clip")
    assert_same_series({m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}, loss)
    assert run.data.params["optim.learning_rate"] == "0.001" and run.data.params["model.model"] == "addressclip-tiny"
    assert run.info.status == "FINISHED"


def test_a_resumed_run_continues_its_wandb_and_mlflow_runs(toy_dataset, tmp_path, offline_env):
    from clip_stage.train import main

    out = tmp_path / "run"
    trackers = ("--report-to", "wandb,mlflow")
    assert main(_clip_argv(toy_dataset, out, *trackers, "--stop-at-step", "2")) == 0
    first = json.loads((out / "trackers.json").read_text())
    assert set(first) == {"wandb", "mlflow"}
    assert main(_clip_argv(toy_dataset, out, *trackers, "--resume", "latest")) == 0
    assert json.loads((out / "trackers.json").read_text()) == first
    loss = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(loss) == [1, 2, 3]

    # MLflow: one run, its metric history the whole series
    client, run = mlflow_run(out, "train_clip")
    assert run.info.run_id == first["mlflow"]
    assert_same_series({m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}, loss)
    # wandb (offline, which cannot resume): each start is a folder carrying the run's one id
    folders = sorted((out / "wandb").glob("offline-run-*"))
    # (two starts within one second: wandb adds "-1" to the second folder's name)
    assert len(folders) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first['wandb']}(-\d+)?", f.name)
                                     for f in folders), folders
    rows = [r for f in folders for path in f.glob("run-*.wandb") for r in wandb_file_rows(path) if "train/loss" in r]
    assert_same_series({r["_step"]: r["train/loss"] for r in rows}, loss)


def test_train_clip_report_to_none_writes_no_tracker_files(toy_dataset, tmp_path, offline_env):
    from clip_stage.train import main

    out = tmp_path / "run"
    assert main(_clip_argv(toy_dataset, out, "--report-to", "none", "--max-steps", "1")) == 0
    assert (out / "metrics.jsonl").is_file()
    assert not [p.name for p in out.iterdir() if p.name in ("tensorboard", "wandb", "mlruns")]


def _llava_argv(model_dir, data_dir, out, *extra):
    return ["--config", "address_lora", "--model-name-or-path", str(model_dir),
            "--data-path", str(Path(data_dir) / "train.json"), "--output-dir", str(out), "--model.torch-dtype", "float32",
            "--mixed-precision", "no", "--no-progress-bar", "--trainables.lora-r", "8", "--lora-alpha", "16",
            "--per-device-batch-size", "4", "--global-batch-size", "4", "--max-steps", "3", "--learning-rate", "1e-2",
            *map(str, extra)]


def test_train_llava_logs_to_every_tracker_offline(tiny_llava_dir, tiny_llava_data, tmp_path, offline_env):
    from llava_address.train import main

    out = tmp_path / "run"
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, out, "--report-to", "tensorboard,wandb,mlflow")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows}
    assert sorted(loss) == [1, 2, 3]

    # TensorBoard: the folder both trainers use (<output-dir>/tensorboard)
    assert_same_series(tensorboard_scalars(out / "tensorboard", "loss"), loss)
    history = [r for r in wandb_history(out) if "loss" in r]
    assert_same_series({r["_step"]: r["loss"] for r in history}, loss)
    assert {"lr/llm", "lr/projector", "tokens_per_s", "memory_mb"} <= set(history[0])
    client, run = mlflow_run(out, "train_llava")
    assert_same_series({m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}, loss)
    assert run.data.params["train.learning_rate"] == "0.01" and run.data.params["trainables.llm"] == "lora"


def test_train_llava_report_to_none_writes_no_tracker_files(tiny_llava_dir, tiny_llava_data, tmp_path, offline_env):
    from llava_address.train import main

    out = tmp_path / "run"
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, out, "--report-to", "none", "--max-steps", "1")) == 0
    assert (out / "metrics.jsonl").is_file()
    assert not [p.name for p in out.iterdir() if p.name in ("tensorboard", "wandb", "mlruns")]


@pytest.mark.parametrize("command", ["train-clip", "train-llava"])
def test_bad_tracker_name_is_one_error_line(command, capsys):
    from llava_address.apps.cli import main

    argv = ["--dataset", "d"] if command == "train-clip" else ["--data-path", "d", "--model-name-or-path", "m"]
    # a value the config refuses is a ConfigError: one line, exit status 2 (returned by the command guard)
    assert main([command, *argv, "--report-to", "tensorboard,wandbx"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("unknown tracker 'wandbx'; valid: tensorboard, wandb, mlflow, none")


@pytest.mark.parametrize("command", ["train-clip", "train-llava"])
def test_missing_tracker_package_is_one_line_before_training(command, toy_dataset, tiny_llava_dir, tiny_llava_data,
                                                             tmp_path, monkeypatch, capsys):
    from llava_address.apps.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "run"
    argv = (_clip_argv(toy_dataset, out) if command == "train-clip"
            else _llava_argv(tiny_llava_dir, tiny_llava_data, out))
    assert main([command, *argv, "--report-to", "mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"{command}: error: --report-to mlflow needs the mlflow package: "
                                             "pip install mlflow-skinny (or pip install 'address-llava[trackers]')")
    assert not list(out.glob("checkpoint-*"))
