"""Fault injection: build-dataset, conversations and merge killed with SIGKILL at seeded random moments.

Each command first writes a complete "old" output (another seed or checkpoint) and is then run with
--overwrite to write the "new" one, as a subprocess that is killed at a random moment: while it starts,
or shortly after its temporary folder appears (the write phase). Afterwards the output folder holds
exactly the old files or exactly the new ones (compared with an uninterrupted run), and the next run
leaves no temporary folder behind (`atomic_dir` removes what a killed write of the same folder left).
train-clip and train-llava are killed the same way in tests/test_checkpoint_safety.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_data_build import _argv as build_argv
from tests.test_data_build import make_inputs
from tests.test_checkpoint_safety import _llava_argv

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# Fields that record when or how fast a run went: they differ between two identical runs.
VOLATILE_KEYS = {"timings_s", "created", "created_at", "date"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def snapshot(folder: Path) -> dict[str, str] | None:
    """{relative path: content hash} of every file (JSON files without their timing fields); None if absent."""
    if not folder.exists():
        return None
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        data = p.read_bytes()
        if p.suffix == ".json" and p.name != "manifest.json":
            try:
                data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
            except json.JSONDecodeError:
                pass
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(out: Path) -> list[str]:
    """Temporary or replaced folders of `out` beside it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(REPO)}


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]


def run_killed(cmd: list[str], out: Path, seed: int, timeout: float = 300) -> int:
    """Starts cmd and SIGKILLs it at a seeded random moment; its return code (0 if it finished first).

    Seed 0 kills at a random time after the start (often before any output exists); the others wait for the
    temporary folder of `out` and kill a random 0-60 ms into the write phase."""
    rng = random.Random(seed)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    if seed == 0:
        deadline = t0 + rng.uniform(0.1, 0.8)
    else:
        while proc.poll() is None and not any(n.endswith(".tmp") for n in leftovers(out)):
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise AssertionError("no temporary folder appeared")
            time.sleep(0.002)
        deadline = time.monotonic() + rng.uniform(0.0, 0.06)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    return proc.returncode


def check_command(make_cmd, out: Path, seeds=SEEDS, fresh: bool = True) -> list[int]:
    """The fault-injection protocol for one command; make_cmd(out, new: bool) -> argv. Returns the kill codes."""
    run(make_cmd(out, True))  # the reference, at the same path: the outputs record their own paths
    new = snapshot(out)
    shutil.rmtree(out)
    run(make_cmd(out, False))
    old = snapshot(out)
    assert old != new, "the old and the new output must differ for the test to tell them apart"
    codes = []
    for seed in seeds:
        codes.append(run_killed(make_cmd(out, True), out, seed))
        state = snapshot(out)
        print(f"seed {seed}: rc {codes[-1]}, {'new' if state == new else 'old' if state == old else '?'}, "
              f"left {leftovers(out)}")
        assert state in (old, new), f"seed {seed}: a mixed or partial output folder"
        # the next run (old state again) completes and removes what the killed one left
        run(make_cmd(out, False))
        assert snapshot(out) == old and leftovers(out) == [], f"seed {seed}: {leftovers(out)}"
    # and a killed first write (no old state) leaves nothing or the complete new folder
    if not fresh:
        assert codes.count(-signal.SIGKILL) >= 1, f"the runs ended before they were killed: {codes}"
        return codes
    shutil.rmtree(out)
    codes.append(run_killed(make_cmd(out, True), out, 1))
    assert snapshot(out) in (None, new)
    run(make_cmd(out, True))
    assert snapshot(out) == new and leftovers(out) == []
    assert codes.count(-signal.SIGKILL) >= 1, f"the runs ended before they were killed: {codes}"
    return codes


def test_build_dataset_killed_at_random_is_old_or_new(tmp_path):
    images, table, network, *_ = make_inputs(tmp_path / "inputs")

    def cmd(out, new):
        return [sys.executable, "-m", "clip_stage.data.build", *build_argv(images, table, network, out),
                "--image-mode", "copy", "--seed", "0" if new else "1", "--overwrite"]

    check_command(cmd, tmp_path / "dataset")


def test_conversations_killed_at_random_is_old_or_new(toy_dataset, tmp_path):
    def cmd(out, new):
        return [sys.executable, "-m", "conversations.build", "--dataset", str(toy_dataset), "--out", str(out),
                "--formats", "llava,jsonl,messages", "--seed", "0" if new else "1", "--overwrite"]

    check_command(cmd, tmp_path / "conversations")


@pytest.fixture(scope="module")
def llava_checkpoints(tiny_llava_dir, tiny_llava_data, tmp_path_factory):
    from llava_address.train import main

    out = tmp_path_factory.mktemp("fault_llava") / "run"
    assert main(_llava_argv(tiny_llava_dir, tiny_llava_data, out, "--num-epochs", "1", "--save-every", "1",
                            "--stop-at-step", "2")) == 0
    return out / "checkpoint-000001", out / "checkpoint-000002"


def test_merge_killed_at_random_is_old_or_new(llava_checkpoints, tmp_path):
    first, second = llava_checkpoints

    def cmd(out, new):
        return [sys.executable, "-m", "llava_address.merge", "--checkpoint", str(second if new else first),
                "--out", str(out), "--torch-dtype", "float32", "--overwrite"]

    # merge's subprocess spends seconds importing torch: two kills, both in the write phase
    check_command(cmd, tmp_path / "merged", seeds=(1, 2), fresh=False)
