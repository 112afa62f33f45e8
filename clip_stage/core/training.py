"""The training skeleton `train-clip` and `train-llava` share: one run-folder layout, one vocabulary.

Both trainers write the same run folder and keep the same rules, so this module owns them:

    <output-dir>/checkpoint-000120/   one folder per saved step (`checkpoint_name`), written atomically
    <output-dir>/metrics.jsonl        one JSON row per logged step (`MetricsLogger`), cut back on resume
    <output-dir>/training_curves.png  loss terms and learning rate against the step (clip_stage.core.curves),
                                      redrawn at every checkpoint and at the end
    <output-dir>/tensorboard/         TensorBoard events (clip_stage.core.trackers)

and the pieces both loops are made of:

* `make_accelerator`: an Accelerator that works on CPU ranks (gloo) and can be created again in the same
  process (tests, notebooks);
* `EpochSampler` / `epoch_permutation`: the data order of an epoch as a function of (seed, epoch) alone, so a
  resumed run needs only (epoch, batch) to see the batches the uninterrupted run would;
* `list_checkpoints` / `prune_checkpoints` (`--save-total-limit`) / `resolve_resume` (`--resume PATH|latest`:
  the newest intact checkpoint, falling back to the previous one when the newest fails its manifest check).
  Only folders in this project's own format count (`own_checkpoint_step`: the exact zero-padded name and the
  manifest.json of a verified save): another tool's `checkpoint-500/` in the same folder is never listed,
  resumed or pruned;
* `MetricsLogger`: metrics.jsonl on rank 0 plus the `--report-to` trackers, and the curves' PNG;
* `Hooks`: the seam a caller (the training benchmark) uses to observe a loop without patching it.

Floor 0: imports no stage; the trainers pass in what is theirs (how to verify a checkpoint folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clip_stage.core.curves import METRICS_FILE, PLOT_FILE, plot_run
from clip_stage.core.fs import MANIFEST_FILE, cut_jsonl_log, remove_stale_temps

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFESTED_CHECKPOINT_GLOB = "checkpoint-[0-9][0-9][0-9][0-9][0-9][0-9]*/manifest.json"  # a finished save (legacy runs)
TENSORBOARD_DIR = "tensorboard"
RESUME_LATEST = "latest"


class DeviceError(ValueError):
    """A --device this machine cannot use (a user error: one line, exit 2)."""


def check_device(device: str, flag: str = "--device") -> None:
    """Refuses a device torch cannot parse, or CUDA where there is none, before anything loads ('auto' passes)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag} {device}: not a device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{flag} {device}: no CUDA GPU is available here (use --device cpu)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, untrusted or does not fit the run (a one-line user error)."""


# --- accelerator ---------------------------------------------------------------------------------------


def world_size_from_env() -> int:
    """The number of processes the launcher started (before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(mixed_precision: str | None = None, *, gradient_accumulation_steps: int = 1, log_with=None,
                     project_dir: str | os.PathLike | None = None):
    """An Accelerator for one run: gloo when launched on several CPU ranks, `log_with` from
    clip_stage.core.trackers; `mixed_precision` None takes what `accelerate launch` was given."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    launched = world_size_from_env() > 1
    # accelerate keeps process-wide singletons: a second run in the same process (tests, notebooks) with other
    # settings would be refused. A single process has no process group to lose, so it starts afresh entirely.
    AcceleratorState._reset_state(reset_partial_state=not launched)
    GradientState._reset_state()
    # Without a GPU, several processes must use gloo (accelerate picks no working backend on CPU otherwise, and
    # with DeepSpeed believes it has one process); a single process gets no backend, or it counts as distributed.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    project = None
    if project_dir is not None:
        project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / TENSORBOARD_DIR))
    return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
                       log_with=log_with, project_config=project, kwargs_handlers=handlers)


# --- data order ------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of n rows in one epoch: a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffling sampler deterministic in (seed, epoch): resumable without saving sampler state."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(epoch_permutation(self.n, self.seed, self.epoch))


# --- checkpoint rotation and resume ------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def own_checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder this project wrote, else None.

    Ours is named exactly `checkpoint_name(step)` and holds the manifest.json of a verified save: HF Trainer's
    `checkpoint-500/`, a user's `checkpoint-2/` or a link elsewhere is someone else's and must never be pruned.
    """
    m = CHECKPOINT_RE.match(path.name)
    if m is None or path.name != checkpoint_name(int(m.group(1))):
        return None
    if path.is_symlink() or not path.is_dir() or not (path / MANIFEST_FILE).is_file():
        return None
    return int(m.group(1))


def list_checkpoints(run_dir: str | os.PathLike, complete: Callable[[Path], bool] | None = None) -> list[Path]:
    """This project's step checkpoints in a run folder (`own_checkpoint_step`), oldest first (only those
    `complete` accepts; not verified)."""
    out = Path(run_dir)
    if not out.is_dir():
        return []
    found = [(step, p) for p in out.iterdir() if (step := own_checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found) if complete is None or complete(p)]


def prune_checkpoints(run_dir: str | os.PathLike, keep: int | None,
                      complete: Callable[[Path], bool] | None = None) -> list[Path]:
    """Removes all but the newest `keep` of this project's step checkpoints (`--save-total-limit`; None keeps
    all); `complete` narrows which count as the trainer's own. Nothing else in the folder is touched."""
    if keep is None:
        return []
    ckpts = list_checkpoints(run_dir, complete)
    removed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def resolve_resume(resume: str, run_dir: str | os.PathLike, *, verify: Callable[[Path], None],
                   resumable: Callable[[Path], bool], command: str, report: Callable[[str], None] | None = print
                   ) -> Path | None:
    """The verified checkpoint folder `--resume` names.

    'latest' is the newest checkpoint in run_dir that `resumable` accepts and `verify` passes (None if there is
    none); a damaged candidate is reported through `report` (None: silent, for ranks other than 0) and the
    previous one is tried. An explicit folder that is not resumable or fails `verify` is an error.
    """
    if resume == RESUME_LATEST:
        ckpts = list_checkpoints(run_dir, resumable)[::-1]
        for i, ckpt in enumerate(ckpts):
            try:
                verify(ckpt)
                return ckpt
            except CheckpointError as e:
                if report is not None:
                    then = f"falling back to {ckpts[i + 1].name}" if i + 1 < len(ckpts) else "no earlier checkpoint"
                    report(f"{command}: {e}; {then}")
        if ckpts:
            raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from (all {len(ckpts)} failed "
                                  "their manifest check, see above)")
        return None
    path = Path(resume)
    if not resumable(path):
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder with training state")
    verify(path)
    return path


def refuse_foreign_checkpoints(run_dir: str | os.PathLike, resume: str | None) -> None:
    """A run folder that already holds checkpoints is continued only with --resume: another run's checkpoints
    would be overwritten and its metrics mixed with this run's."""
    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise CheckpointError(f"{run_dir} already holds checkpoints ({existing[-1].name}): pass --resume latest to "
                              "continue, or another --output-dir")


# --- metrics ------------------------------------------------------------------------------------------------


class MetricsLogger:
    """One JSON row per logged step into `<run>/metrics.jsonl` (rank 0), and the same values to the trackers.

    At the start the file is cut back to `start_step` (the resumed checkpoint's, 0 for a fresh run): it holds
    this run's steps only, none after the checkpoint or from a killed run before it.
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator, start_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.history: list[dict[str, Any]] = []
        if self.is_main:
            cut_jsonl_log(self.path, start_step)
            self.path.touch()  # the file exists from the first step on, even before a row is due
            remove_stale_temps(self.path.parent, (PLOT_FILE,))  # a figure whose atomic write was killed

    def log(self, row: dict[str, Any], tracker_values: dict[str, Any] | None = None) -> None:
        """Writes `row` (with its "step") and sends `tracker_values` (default: row without "step")."""
        step = int(row["step"])
        if self.is_main:
            self.history.append(row)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        values = tracker_values if tracker_values is not None else {k: v for k, v in row.items() if k != "step"}
        self.accelerator.log(values, step=step)

    def plot(self) -> None:
        """Redraws `<run>/training_curves.png` from the whole metrics.jsonl (rank 0; the trainers call it at
        each checkpoint and at the end). A plot that fails is reported, never the end of the training run."""
        if not self.is_main:
            return
        try:
            plot_run(self.path.parent)
        except Exception as e:  # noqa: BLE001 - a figure is not worth a lost run
            print(f"warning: could not draw {self.path.parent / PLOT_FILE}: {e}", flush=True)


# --- the seam ----------------------------------------------------------------------------------------------


@dataclass
class Hooks:
    """Callbacks a caller passes to a trainer's `train(cfg, hooks)` to observe the loop without patching it."""

    on_fit_start: list[Callable[[], None]] = field(default_factory=list)
    """called once on every rank after set-up (model, data, optimizer, resume), just before the first step"""
    on_step_end: list[Callable[[int], None]] = field(default_factory=list)
    """called after every optimizer step with the global step"""

    def fit_start(self) -> None:
        for fn in self.on_fit_start:
            fn()

    def step_end(self, step: int) -> None:
        for fn in self.on_step_end:
            fn(step)
