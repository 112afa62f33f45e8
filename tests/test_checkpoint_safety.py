"""Checkpoints of train-clip and train-llava: nothing in them runs on resume, a damaged one is caught (and
`--resume` falls back to the previous one), killed saves leave nothing behind, and a run killed with
SIGKILL at a random moment resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_stage.core import fs
from clip_stage.core.fs import (
    ManifestError,
    atomic_dir,
    cut_jsonl_log,
    remove_stale_temps,
    verify_manifest,
    write_manifest,
)
from tests.llava_helpers import checkpoint_tensors

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Exploit:
    """Unpickling this writes a marker file: the proof that a checkpoint file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Exploit(marker)))


def _flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _no_temps(*folders: Path) -> list[str]:
    return [p.name for d in folders if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".") and (p.name.endswith((".tmp", ".state-partial")) or ".old-" in p.name)]


# --------------------------------------------------------------------------------------------
# clip_stage.core.fs: manifests, fsync, stale staging, log cutting
# --------------------------------------------------------------------------------------------


def test_the_planted_pickle_really_runs_code_when_unpickled(tmp_path):
    # The control for the refusal tests below: they would prove nothing if this did not write the marker.
    marker = tmp_path / "marker"
    _plant(tmp_path / "x.pkl", marker)
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert marker.read_text() == "pwned"


def test_manifest_catches_bit_flips_truncation_missing_and_planted_files(tmp_path):
    with atomic_dir(tmp_path / "ck", verified=True) as tmp:
        (tmp / "w.bin").write_bytes(bytes(range(256)) * 8)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "s.json").write_text("{}")
    ck = tmp_path / "ck"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert set(manifest["files"]) == {"w.bin", "sub/s.json"} and manifest["files"]["w.bin"]["size"] == 2048
    assert verify_manifest(ck) is True

    _flip_bit(ck / "w.bin")  # same size: only the hash can see it
    with pytest.raises(ManifestError, match=r"w\.bin: sha256 differs"):
        verify_manifest(ck)
    _flip_bit(ck / "w.bin")
    verify_manifest(ck)

    (ck / "w.bin").write_bytes((ck / "w.bin").read_bytes()[:100])
    with pytest.raises(ManifestError, match=r"w\.bin: 100 bytes, manifest.json says 2048"):
        verify_manifest(ck)

    write_manifest(ck)
    (ck / "sub" / "evil.pkl").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"sub/evil\.pkl: not listed"):
        verify_manifest(ck)
    (ck / "sub" / "evil.pkl").unlink()
    (ck / "sub" / "s.json").unlink()
    with pytest.raises(ManifestError, match=r"s\.json: missing"):
        verify_manifest(ck)
    (ck / "manifest.json").unlink()
    assert verify_manifest(ck, required=False) is False
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        verify_manifest(ck)


def test_verified_atomic_dir_fsyncs_files_and_folder_before_the_rename(tmp_path, monkeypatch):
    synced: list[tuple[str, bool]] = []
    real_fsync, real_open = os.fsync, os.open
    opened: dict[int, str] = {}

    def tracking_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        opened[fd] = str(path)
        return fd

    def tracking_fsync(fd):
        synced.append((opened.get(fd, "?"), (tmp_path / "ck").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(fs.os, "open", tracking_open)
    monkeypatch.setattr(fs.os, "fsync", tracking_fsync)
    with atomic_dir(tmp_path / "ck", verified=True) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
    names = [Path(p).name for p, _ in synced]
    # The data file, the manifest and the staging folder are synced while the target does not exist yet;
    # then the parent folder (the rename).
    before = [Path(p).name for p, target_exists in synced if not target_exists]
    assert "a.bin" in before and "manifest.json" in before and any(n.startswith(".ck.") for n in before)
    assert names[-1] == tmp_path.name and synced[-1][1]


def test_remove_stale_temps_cleans_killed_saves_only(tmp_path):
    for name in (".checkpoint-000002.ab12.tmp", ".step-000004.x.tmp", ".checkpoint-000006.state-partial",
                 ".final.old-99"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / ".latest.q1.tmp").write_text("step-000002\n")
    (tmp_path / "final").mkdir()  # the new final is in place: its .old- copy is garbage
    (tmp_path / ".keepme.tmp").mkdir()  # not one of ours
    (tmp_path / "checkpoint-000002").mkdir()
    removed = remove_stale_temps(tmp_path, ("checkpoint-", "step-", "latest", "final"))
    assert sorted(p.name for p in removed) == sorted([
        ".checkpoint-000002.ab12.tmp", ".step-000004.x.tmp", ".checkpoint-000006.state-partial", ".final.old-99",
        ".latest.q1.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keepme.tmp", "checkpoint-000002", "final"]
    # Killed between the two renames of atomic_dir: the old folder is all there is; keep it.
    (tmp_path / "final").rmdir()
    (tmp_path / ".final.old-7").mkdir()
    assert remove_stale_temps(tmp_path, ("final",)) == [] and (tmp_path / ".final.old-7").is_dir()


def test_cut_jsonl_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert cut_jsonl_log(log, 4) == 4
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert cut_jsonl_log(log, 4) == 0
    assert cut_jsonl_log(tmp_path / "absent.jsonl", 3) == 0


# --------------------------------------------------------------------------------------------
# train-clip
# --------------------------------------------------------------------------------------------


def _clip_argv(dataset, out, *extra):
    return ["--dataset", str(dataset), "--model", "addressclip-tiny", "--pretrained", "none",
            "--output-dir", str(out), "--num-workers", "0", "--progress-bar", "false", "--learning-rate", "1e-3",
            "--min-lr", "1e-5", "--per-device-batch-size", "16", "--report-to", "none", *map(str, extra)]


CLIP_COMMON = ("--max-steps", "8", "--save-every", "2", "--save-total-limit", "3", "--warmup-steps", "2",
               "--seed", "5")


@pytest.fixture(scope="module")
def clip_full_run(toy_dataset, tmp_path_factory):
    from clip_stage.train import main

    out = tmp_path_factory.mktemp("clip_full") / "run"
    assert main(_clip_argv(toy_dataset, out, *CLIP_COMMON)) == 0
    return out


def _clip_final(run) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / "final" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_clip_resume_falls_back_from_a_bit_flipped_checkpoint(toy_dataset, clip_full_run, tmp_path, capsys):
    from clip_stage.model import CheckpointError, load_checkpoint
    from clip_stage.train import main

    part = tmp_path / "part"
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--stop-at-step", "6")) == 0
    ck = part
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006"]
    log_before = (part / "metrics.jsonl").read_text().splitlines()
    # The killed run had logged two more steps than its last checkpoint.
    (part / "metrics.jsonl").write_text("\n".join(log_before) + '\n{"step": 7, "loss": 0}\n{"step": 8, "lo')
    _flip_bit(ck / "checkpoint-000006" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint-000006/model\.safetensors: sha256 differs"):
        load_checkpoint(ck / "checkpoint-000006")
    capsys.readouterr()
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "checkpoint-000006/model.safetensors: sha256 differs" in err and "falling back to checkpoint-000004" in err
    assert json.loads((part / "run_summary.json").read_text())["resumed_from"].endswith("checkpoint-000004")
    assert _same(_clip_final(part), _clip_final(clip_full_run), atol=1e-6)
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # no step logged twice, no torn line


def test_clip_resume_with_every_checkpoint_damaged_is_one_line_exit_2(toy_dataset, tmp_path, capsys):
    from clip_stage.train import main

    part = tmp_path / "part"
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--stop-at-step", "2")) == 0
    f = part / "checkpoint-000002" / "training_state.pt"
    f.write_bytes(f.read_bytes()[:-10])
    capsys.readouterr()
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "training_state.pt" in err and "truncated" in err and "no intact checkpoint" in err
    assert "Traceback" not in err


def _foreign_checkpoints(run: Path, names=("checkpoint-2", "checkpoint-3", "checkpoint-500", "checkpoint-1000")):
    """HF Trainer-style folders (and one of our name without our manifest) that are someone else's."""
    for name in (*names, "checkpoint-000010"):
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.json").write_text('{"theirs": true}')
    return sorted(names) + ["checkpoint-000010"]


def test_checkpoint_rotation_lists_and_prunes_only_our_own_folders(tmp_path):
    from clip_stage.core.training import checkpoint_name, list_checkpoints, prune_checkpoints

    run = tmp_path / "run"
    for step in (4, 6, 8):
        with atomic_dir(run / checkpoint_name(step), verified=True) as tmp:
            (tmp / "w.bin").write_bytes(b"w")
    foreign = _foreign_checkpoints(run)
    elsewhere = tmp_path / "elsewhere"  # a link to a folder outside the run: never followed into
    with atomic_dir(elsewhere, verified=True) as tmp:
        (tmp / "w.bin").write_bytes(b"keep")
    (run / checkpoint_name(12)).symlink_to(elsewhere, target_is_directory=True)
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(s) for s in (4, 6, 8)]
    assert [p.name for p in prune_checkpoints(run, 1)] == [checkpoint_name(4), checkpoint_name(6)]
    left = sorted(p.name for p in run.iterdir())
    assert left == sorted([*foreign, checkpoint_name(8), checkpoint_name(12)])
    assert all((run / n / "trainer_state.json").read_text() == '{"theirs": true}' for n in foreign)
    assert (elsewhere / "w.bin").read_bytes() == b"keep"


def test_clip_resume_beside_foreign_checkpoints_keeps_them_and_resumes_its_own(toy_dataset, clip_full_run, tmp_path):
    from clip_stage.train import main

    part = tmp_path / "part"
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--stop-at-step", "4")) == 0
    foreign = _foreign_checkpoints(part)  # checkpoint-500/-1000 "newer" than ours: must not crowd ours out
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--resume", "latest")) == 0
    summary = json.loads((part / "run_summary.json").read_text())
    assert summary["complete"] and summary["resumed_from"].endswith("checkpoint-000004")
    assert _same(_clip_final(part), _clip_final(clip_full_run), atol=1e-6)
    ours = sorted(p.name for p in part.glob("checkpoint-0*") if (p / "manifest.json").exists())
    assert ours == ["checkpoint-000004", "checkpoint-000006", "checkpoint-000008"]  # --save-total-limit 3
    assert all((part / n / "trainer_state.json").read_text() == '{"theirs": true}' for n in foreign)


def test_clip_does_not_adopt_a_marker_less_folder_of_foreign_checkpoints(toy_dataset, tmp_path, capsys):
    from clip_stage.train import main

    theirs = tmp_path / "hf_run"
    foreign = _foreign_checkpoints(theirs)
    (theirs / "metrics.jsonl").write_text('{"step": 1}\n')
    (theirs / "run_summary.json").write_text("{}")
    before = sorted(p.name for p in theirs.iterdir())
    assert main(_clip_argv(toy_dataset, theirs, *CLIP_COMMON, "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train-clip: error: ") and "not a train-clip output" in err and "\n" not in err
    assert sorted(p.name for p in theirs.iterdir()) == before and len(foreign) == 5


def test_clip_planted_pickle_in_training_state_is_refused_and_never_run(toy_dataset, tmp_path, capsys):
    from clip_stage.train import main

    part = tmp_path / "part"
    marker = tmp_path / "marker"
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--stop-at-step", "2")) == 0
    ckpt = part / "checkpoint-000002"
    _plant(ckpt / "training_state.pt", marker)
    capsys.readouterr()
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--resume", "latest")) == 2  # the manifest sees it
    assert "training_state.pt" in capsys.readouterr().err
    write_manifest(ckpt)  # an attacker who also rewrites the manifest: the file is still not unpickled
    assert main(_clip_argv(toy_dataset, part, *CLIP_COMMON, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "training_state.pt: not a plain training-state file" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# train-llava
# --------------------------------------------------------------------------------------------


def _llava_argv(model_dir, data_dir, out, *extra):
    return [
        "--config", "address_lora", "--model-name-or-path", str(model_dir),
        "--data-path", str(Path(data_dir) / "train.json"), "--output-dir", str(out),
        "--model.torch-dtype", "float32", "--mixed-precision", "no", "--no-progress-bar", "--report-to", "none",
        "--trainables.lora-r", "8", "--lora-alpha", "16", "--per-device-batch-size", "4",
        "--gradient-accumulation-steps", "1", "--global-batch-size", "none", "--learning-rate", "3e-3",
        "--seed", "3", *map(str, extra),
    ]


LLAVA_COMMON = ("--num-epochs", "2", "--save-every", "2")  # 12 records / 4 = 3 steps per epoch, 6 steps


@pytest.fixture(scope="module")
def llava_full_run(tiny_llava_dir, tiny_llava_data, tmp_path_factory):
    from llava_address.train import main

    out = tmp_path_factory.mktemp("llava_full") / "run"
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, out, *LLAVA_COMMON)) == 0
    return out


@pytest.fixture
def llava_stopped(tiny_llava_dir, tiny_llava_data, tmp_path):
    """A run stopped at step 4 (checkpoints 2 and 4), as if killed."""
    from llava_address.train import main

    out = tmp_path / "part"
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, out, *LLAVA_COMMON, "--stop-at-step", 4)) == 0
    return out


def test_llava_checkpoint_holds_no_pickled_objects(llava_full_run):
    ckpt = llava_full_run / "checkpoint-000006"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert not [f for f in files if "custom_checkpoint" in f]
    sched = json.loads((ckpt / "trainer_state.json").read_text())["scheduler"]
    assert sched["last_epoch"] == 6


def test_llava_refuses_a_folder_with_checkpoints_without_resume(tiny_llava_dir, tiny_llava_data, llava_stopped,
                                                               capsys):
    from llava_address.train import main

    before = (llava_stopped / "checkpoint-000004" / "manifest.json").read_text()
    capsys.readouterr()
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, llava_stopped, *LLAVA_COMMON)) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds checkpoints (checkpoint-000004)" in err and "--resume" in err and "\n" not in err
    assert (llava_stopped / "checkpoint-000004" / "manifest.json").read_text() == before


@pytest.mark.parametrize("where", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_llava_planted_pickle_is_refused_and_never_run(tiny_llava_dir, tiny_llava_data, llava_stopped, tmp_path,
                                                       capsys, where):
    from llava_address.train import main

    marker = tmp_path / "marker"
    ckpt = llava_stopped / "checkpoint-000004"
    _plant(ckpt / "state" / where, marker)
    argv = _llava_argv(tiny_llava_dir, tiny_llava_data, llava_stopped, *LLAVA_COMMON, "--resume", ckpt)
    capsys.readouterr()
    assert main(argv) == 2  # the manifest does not list / match the planted file
    assert f"state/{where}" in capsys.readouterr().err
    write_manifest(ckpt)  # an attacker who also rewrote the manifest: still refused, still not unpickled
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (above it: transformers' weight-loading bar)
    assert last.startswith("train-llava: ") and (f"state/{where}" in last or "state: cannot be loaded" in last), last
    assert "Traceback" not in err
    assert "weights_only` set to `False`" not in last  # torch's advice is the one thing not to follow
    assert not marker.exists()


def test_llava_resume_latest_falls_back_from_a_damaged_checkpoint(tiny_llava_dir, tiny_llava_data, llava_full_run,
                                                                  llava_stopped, capsys):
    from llava_address.checkpoint import CheckpointError, load_checkpoint, resolve_resume
    from llava_address.train import main

    # A killed run had logged step 5 (and half of 6) after its last checkpoint.
    with open(llava_stopped / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.0}\n{"step": 6, "lo')
    _flip_bit(llava_stopped / "checkpoint-000004" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-000004/adapter_model\.safetensors: sha256 differs"):
        load_checkpoint(llava_stopped / "checkpoint-000004")
    with pytest.raises(CheckpointError, match="sha256 differs"):  # named explicitly: no fallback
        resolve_resume(str(llava_stopped / "checkpoint-000004"), llava_stopped)
    capsys.readouterr()
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, llava_stopped, *LLAVA_COMMON, "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "adapter_model.safetensors: sha256 differs" in err and "falling back to checkpoint-000002" in err
    steps = [json.loads(x)["step"] for x in (llava_stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    a, b = checkpoint_tensors(llava_full_run / "checkpoint-000006"), checkpoint_tensors(llava_stopped / "checkpoint-000006")
    assert a and _same(a, b, atol=1e-6)


def test_deepspeed_resume_from_outside_the_run_needs_trust(tmp_path):
    from llava_address.checkpoint import CheckpointError, check_resume_trust

    run, elsewhere = tmp_path / "run", tmp_path / "downloaded" / "checkpoint-000004"
    check_resume_trust(run / "checkpoint-000004", run, deepspeed=True, trust=False)
    check_resume_trust(elsewhere, run, deepspeed=False, trust=False)  # no DeepSpeed: nothing is unpickled
    check_resume_trust(elsewhere, run, deepspeed=True, trust=True)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        check_resume_trust(elsewhere, run, deepspeed=True, trust=False)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):  # ../ tricks resolve first
        check_resume_trust(run / ".." / "downloaded" / "checkpoint-000004", run, deepspeed=True, trust=False)


# --------------------------------------------------------------------------------------------
# fault injection: SIGKILL at a random moment after the first checkpoint, then resume
# --------------------------------------------------------------------------------------------


def _kill_after_first_checkpoint(cmd: list[str], first: Path, seed: int, timeout: float = 120) -> int:
    """Starts cmd, waits for `first` to appear, sleeps a random 0-0.4 s and SIGKILLs it; its return code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not first.exists():
        if proc.poll() is not None:
            raise AssertionError(f"finished before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode


@pytest.mark.parametrize("seed", [1])
def test_clip_killed_at_random_resumes_to_the_uninterrupted_weights(toy_dataset, clip_full_run, tmp_path, seed):
    from clip_stage.train import main

    out = tmp_path / "run"
    # Checkpoints at every step: the kill often lands inside a save.
    args = _clip_argv(toy_dataset, out, "--max-steps", "8", "--save-every", "1", "--save-total-limit", "3",
                      "--warmup-steps", "2", "--seed", "5")
    rc = _kill_after_first_checkpoint([sys.executable, "-m", "clip_stage.train", *args],
                                      out / "checkpoint-000001", seed)
    assert rc == -signal.SIGKILL, "the run ended before it was killed: make it longer"
    assert main([*args, "--resume", "latest"]) == 0
    assert _same(_clip_final(out), _clip_final(clip_full_run), atol=1e-6)
    assert _no_temps(out) == []


@pytest.mark.parametrize("seed", [2])
def test_llava_killed_at_random_resumes_to_the_uninterrupted_weights(tiny_llava_dir, tiny_llava_data, llava_full_run,
                                                                     tmp_path, seed):
    from llava_address.train import main

    out = tmp_path / "run"
    # llava_full_run's 6 steps, with a checkpoint after every step (saving does not change the weights).
    args = _llava_argv(tiny_llava_dir, tiny_llava_data, out, "--num-epochs", 2, "--save-every", 1,
                       "--save-total-limit", 2)
    rc = _kill_after_first_checkpoint([sys.executable, "-m", "llava_address.train", *args],
                                      out / "checkpoint-000001", seed)
    assert rc == -signal.SIGKILL, "the run ended before it was killed: make it longer"
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert main([*args, "--resume", "latest"]) == 0
    a, b = checkpoint_tensors(llava_full_run / "checkpoint-000006"), checkpoint_tensors(out / "checkpoint-000006")
    assert a and _same(a, b, atol=1e-6), killed_at
    assert _no_temps(out) == []
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (llava_full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6, abs=1e-7)


def test_checkpoint_args_of_another_version_are_a_one_line_error(tmp_path):
    import dataclasses

    from clip_stage.core.training import CheckpointError
    from llava_address.checkpoint_layout import ARGS_FILE, CHECKPOINT_FORMAT, read_checkpoint_args
    from llava_address.config import ModelArgs, TrainablesArgs

    model = dataclasses.asdict(ModelArgs(model_name_or_path="some/model"))
    trainables = dataclasses.asdict(TrainablesArgs())
    ckpt = tmp_path / "checkpoint-000001"
    ckpt.mkdir()
    (ckpt / ARGS_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "model": model, "trainables": trainables}))
    assert read_checkpoint_args(ckpt)[0] == ModelArgs(model_name_or_path="some/model")
    # a field this version does not have (an older release kept model_max_length in the model section)
    (ckpt / ARGS_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "model": {**model, "model_max_length": 512},
                                              "trainables": trainables}))
    with pytest.raises(CheckpointError, match=r"model field\(s\) \['model_max_length'\] are not this version's"):
        read_checkpoint_args(ckpt)
