"""train-llava's start-up refusals: a `--resume` whose settings would change the result is one line naming
each setting (recorded and new value), exit 2, before any model loads, while logging, saving and speed
settings stay free; a run refused at start-up leaves no output folder (or an existing one as it was). And
the checkpoint layout and `merge --out` rule are what docs/llava.md says."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from llava_address.train import main, parse_args
from llava_address.train_args import resume_mismatches

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
LR = 3e-3


def _argv(model_dir, data, out, *extra):
    """12 records / 4 per step = 3 steps per epoch; 4 steps in all."""
    return [
        "--config", "address_lora", "--model-name-or-path", str(model_dir), "--data-path", str(data),
        "--output-dir", str(out), "--model.torch-dtype", "float32", "--mixed-precision", "no", "--no-progress-bar",
        "--report-to", "none", "--trainables.lora-r", "4", "--lora-alpha", "8", "--per-device-batch-size", "4",
        "--gradient-accumulation-steps", "1", "--global-batch-size", "none", "--learning-rate", str(LR),
        "--max-steps", "4", "--save-every", "2", "--seed", "3", *map(str, extra),
    ]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def stopped(tiny_llava_dir, tiny_llava_data, tmp_path_factory):
    """A LoRA run of 4 steps stopped at step 2 (checkpoint-000002). Read-only: copy it to continue it."""
    out = tmp_path_factory.mktemp("llava_resume_settings") / "run"
    assert main(_argv(tiny_llava_dir, tiny_llava_data / "train.json", out, "--stop-at-step", 2)) == 0
    assert (out / "checkpoint-000002" / "state").is_dir()
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("llava_address.train.build_model", refuse)


# --- which settings count (pure) ------------------------------------------------------------------------


def test_resume_mismatches_names_result_changing_settings_only(tiny_llava_data, tmp_path):
    data = tiny_llava_data / "train.json"
    base = ("--config", "address_lora", "--model-name-or-path", "some/llava", "--data-path", str(data),
            "--output-dir", str(tmp_path / "run"), "--max-steps", "4")
    saved = parse_args(list(base)).to_json()

    def differ(*extra, steps=(4, 4)):
        return resume_mismatches(saved, parse_args([*base, *map(str, extra)]).to_json(), steps)

    assert differ() == []
    # Free: logging, saving, speed, resuming itself, and the same files or batch spelled another way.
    assert differ("--save-every", 5, "--save-total-limit", 1, "--log-every", 7, "--report-to", "none",
                  "--no-progress-bar", "--stop-at-step", 3, "--num-workers", 2, "--resume", "latest",
                  "--trust-checkpoint", "--gradient-checkpointing", "--attn-implementation", "eager",
                  "--length-cache-dir", "none", "--output-dir", str(tmp_path / "run" / "."),
                  "--data-path", str(tiny_llava_data / "." / "train.json"), "--image-root", str(tiny_llava_data),
                  "--gradient-accumulation-steps", 16, "--global-batch-size", "none") == []
    # The length counts as the total steps it gives: epochs do not matter while max_steps fixes the total.
    assert differ("--num-epochs", 3) == []
    assert differ("--max-steps", 6, steps=(4, 6)) == ["train.max_steps: was 4, now 6",
                                                      "total optimizer steps: was 4, now 6"]
    assert differ(steps=(4, 5)) == ["total optimizer steps: was 4, now 5"]  # same flags, other data
    assert differ("--num-epochs", 3, steps=None) == ["train.num_epochs: was 1, now 3"]  # no total known: as spelled
    # Result-changing: each named with its old and new value.
    for flags, expected in [
        (("--learning-rate", 0.01), "train.learning_rate: was 0.0002, now 0.01"),
        (("--projector-lr", 1e-3), "train.projector_lr: was 2e-05, now 0.001"),
        (("--warmup-ratio", 0.1), "train.warmup_ratio: was 0.03, now 0.1"),
        (("--lr-scheduler", "linear"), "train.lr_scheduler: was 'cosine', now 'linear'"),
        (("--weight-decay", 0.1), "train.weight_decay: was 0.0, now 0.1"),
        (("--adam-beta2", 0.98), "train.adam_beta2: was 0.999, now 0.98"),
        (("--max-grad-norm", 0.5), "train.max_grad_norm: was 1.0, now 0.5"),
        (("--seed", 1), "train.seed: was 42, now 1"),
        (("--per-device-batch-size", 8), "train.per_device_batch_size: was 16, now 8"),
        (("--model-max-length", 512), "data.model_max_length: was 2048, now 512"),
        (("--image-root", str(tmp_path)), "data.image_root: was"),
        (("--data-path", str(tiny_llava_data / "other.json")), "data.data_path: was"),
        (("--lora-r", 8), "trainables.lora_r: was 128, now 8"),
        (("--trainables.llm", "full"), "trainables.llm: was 'lora', now 'full'"),
        (("--model.vision-tower", "org/tower"), "model.vision_tower: was None, now 'org/tower'"),
        (("--model.torch-dtype", "float32"), "model.torch_dtype: was 'bfloat16', now 'float32'"),
        (("--init-from", str(tmp_path)), "train.init_from: was None"),
    ]:
        got = differ(*flags)
        assert len(got) == 1 and got[0].startswith(expected), (flags, got)
    # A checkpoint of an older version that does not record a field: that field is not compared.
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "weight_decay"}}
    assert resume_mismatches(older, parse_args([*base, "--weight-decay", "0.1"]).to_json()) == []


# --- resume through the command ---------------------------------------------------------------------


@pytest.mark.parametrize("change, named", [
    (("--learning-rate", 0.01), f"train.learning_rate: was {LR}, now 0.01"),
    (("--max-steps", 6), "train.max_steps: was 4, now 6"),
    (("--num-epochs", 2, "--max-steps", "none"), "total optimizer steps: was 4, now 6"),
    (("--seed", 4, "--projector-lr", 1e-3), "train.projector_lr: was 2e-05, now 0.001; train.seed: was 3, now 4"),
    (("--lora-r", 8), "trainables.lora_r: was 4, now 8"),
])
def test_resume_with_other_settings_is_refused_before_the_model_loads(tiny_llava_dir, tiny_llava_data, stopped,
                                                                      no_model_load, capsys, change, named):
    before = _snapshot(stopped)
    capsys.readouterr()
    rc = main(_argv(tiny_llava_dir, tiny_llava_data / "train.json", stopped, "--resume", "latest", *change))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"train-llava: {stopped / 'checkpoint-000002'} was trained with other settings"), err
    assert named in err, err
    assert "new --output-dir" in err and "merge" in err, err  # what to do instead (a LoRA checkpoint: merge it)
    assert _snapshot(stopped) == before


def test_resume_may_change_logging_saving_and_speed(tiny_llava_dir, tiny_llava_data, stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    # The output folder spelled another way, other saving, logging, workers-free speed settings: all allowed.
    assert main(_argv(tiny_llava_dir, tiny_llava_data / "train.json", f"{run}/.", "--resume", "latest",
                      "--save-every", 1, "--save-total-limit", 3, "--log-every", 1, "--stop-at-step", 3,
                      "--gradient-checkpointing", "--attn-implementation", "eager")) == 0
    state = json.loads((run / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["total_steps"] == 4
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Step 3 used the original schedule's rate (warm-up 1 step, then cosine over the other 3).
    assert rows[-1]["lr/llm"] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 1 / 3)), rel=1e-9)


def test_a_data_file_of_another_length_is_refused(tiny_llava_dir, tiny_llava_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_llava_data, data)
    run = tmp_path / "run"
    assert main(_argv(tiny_llava_dir, data / "train.json", run, "--max-steps", 2, "--stop-at-step", 1,
                      "--save-every", 0)) == 0
    records = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(records[:8]))  # 2 micro-batches per epoch instead of 3
    capsys.readouterr()
    assert main(_argv(tiny_llava_dir, data / "train.json", run, "--max-steps", 2, "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained on 3 micro-batches per epoch, the data now gives 2" in err, err
    assert not (run / "checkpoint-000002").exists()


# --- a refused start writes nothing ---------------------------------------------------------------------


@pytest.mark.parametrize("bad, words", [
    (("--data-path", "nope.json"), "nope.json"),
    (("--model.vision-tower", "./no_such_tower"), "--model.vision-tower ./no_such_tower: no such folder"),
    (("--init-from", "no_such_stage/checkpoint-000500"), "--init-from no_such_stage/checkpoint-000500"),
])
def test_a_refused_start_leaves_no_output_folder(tiny_llava_dir, tiny_llava_data, tmp_path, monkeypatch, capsys,
                                                 no_model_load, bad, words):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(_argv(tiny_llava_dir, tiny_llava_data / "train.json", tmp_path / "new" / "run", *bad)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err
    assert not (tmp_path / "new").exists()


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tiny_llava_dir, tiny_llava_data, stopped, tmp_path,
                                                          no_model_load):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / ".checkpoint-000003.tmp").mkdir()  # what a killed save left: removed only by a run that starts
    before = _snapshot(run)
    for bad in (("--data-path", tmp_path / "nope.json"), ("--model.vision-tower", tmp_path / "no_tower"),
                ("--learning-rate", 1.0)):
        assert main(_argv(tiny_llava_dir, tiny_llava_data / "train.json", run, "--resume", "latest", *bad)) == 2
        assert _snapshot(run) == before, bad


# --- the docs say what the code does ------------------------------------------------------------------------


def test_a_lora_checkpoint_holds_the_projector_in_the_adapter_as_documented(stopped, tiny_llava_data):
    from safetensors import safe_open

    from llava_address.checkpoint import load_checkpoint

    ckpt = stopped / "checkpoint-000002"
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        adapter = list(f.keys())
    with safe_open(str(ckpt / "non_lora_trainables.safetensors"), "pt") as f:
        assert list(f.keys()) == []  # written, but the adapter holds all this recipe trains
    assert any("multi_modal_projector" in k and "lora_" not in k for k in adapter)
    assert json.loads((ckpt / "trainer_state.json").read_text())["saved_tensors"]["non_lora_tensors"] == 0
    model, _ = load_checkpoint(ckpt)  # and it loads
    assert any(".modules_to_save." in n and "multi_modal_projector" in n for n, _ in model.named_parameters())
    for path, says in [("docs/llava.md", "and the projector when the adapter does not hold it"),
                       ("llava_address/checkpoint.py", "the projector when the adapter does not hold it")]:
        flat = " ".join((REPO / path).read_text().split())
        assert "always the projector" not in flat and says in flat, path


def test_the_merge_out_rule_is_what_the_docs_say(tmp_path):
    from clip_stage.core.outdir import OutputFolderError, check_out_dir, write_marker

    earlier = tmp_path / "merged"
    earlier.mkdir()
    write_marker(earlier, "merge")
    with pytest.raises(OutputFolderError, match="pass --overwrite"):
        check_out_dir(earlier, "merge")
    assert check_out_dir(earlier, "merge", overwrite=True) == "replace"
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="not a merge output"):
        check_out_dir(other, "merge", overwrite=True)
    flat = " ".join((REPO / "docs" / "llava.md").read_text().split())
    assert "The output folder is replaced atomically" not in flat
    assert "`--overwrite` replaces an earlier merge's output" in flat
