"""Experiment trackers of both trainers (`--report-to tensorboard,wandb,mlflow | none`), through accelerate.

`train-clip` and `train-llava` take the same flag with the same meaning: a comma list or the flag repeated
(`--report-to tensorboard,wandb`, `--report-to wandb --report-to mlflow`), `none` for no tracker. The
trainers' own JSONL logs are written either way. This module is the one place that:

* parses and checks the names (`parse_report_to`: an unknown name is one line listing the valid ones);
* checks that each tracker's package imports (`check_installed`: one line naming the `pip install`);
* picks offline defaults, so that a run on a machine without a network logs everything to its own folder:
  wandb runs with `mode="offline"` under `<output-dir>/wandb/` unless `WANDB_MODE` is set (`wandb sync
  <output-dir>/wandb/offline-run-*` uploads them later; `WANDB_DIR` moves them); MLflow uses the local file
  store `<output-dir>/mlruns` unless `MLFLOW_TRACKING_URI` is set (browse it with `mlflow ui
  --backend-store-uri <output-dir>/mlruns`);
* builds accelerate's `log_with` list and `init_kwargs` (`plan_trackers`), starts the trackers with the
  run's flattened config (`start_trackers`). The trainer then calls `accelerator.log(values, step=...)`
  and, at the end, `finish_trackers` or `accelerator.end_training()`; accelerate logs from the main
  process only.

A resumed run continues its tracker runs rather than starting new ones: `start_trackers` keeps the wandb run
id and the MLflow run id in `<output-dir>/trackers.json` and, on resume, hands them back (wandb `id` +
`resume="allow"`, MLflow `run_id`), so a killed and resumed run is one MLflow run and one wandb run id, as it
is one series in TensorBoard (offline wandb cannot resume: each start is a folder with that id, uploaded with
`wandb sync --id ID --append`).

TensorBoard writes to the one folder both trainers document, `<output-dir>/tensorboard`: accelerate's
`TensorBoardTracker` writes to `<logging_dir>/<run name>`, so it is built here with the exact folder instead
of deriving it from the project name.

    plan = plan_trackers(cfg.run.report_to, out_dir, "train_clip", tensorboard_dir=out_dir / "tensorboard")
    accelerator = Accelerator(log_with=plan.log_with, ...)
    start_trackers(accelerator, plan, config=cfg.to_dict(), resume_step=step_or_None)
    accelerator.log({"train/loss": loss}, step=step); ...; finish_trackers(accelerator)
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_stage.core.fs import atomic_write_json

# name -> (module that must import, what to pip install). MLflow: accelerate imports `mlflow`, which the much
# lighter `mlflow-skinny` distribution provides as well.
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
NONE = "none"


class TrackerError(ValueError):
    """A tracker that cannot be used: an unknown name or a package that is not installed."""


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The tracker names of a `--report-to` value: a string or list of comma lists; `none` / empty: ().

    Names are lower-cased and de-duplicated in order; an unknown name, or `none` beside a tracker, is a
    TrackerError naming the valid names.
    """
    items = [value] if value is None or isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, str):
            raise TrackerError(f"--report-to: expected tracker names, got {item!r}")
        names += [part.strip().lower() for part in item.split(",") if part.strip()]
    valid = ", ".join([*TRACKERS, NONE])
    for name in names:
        if name not in TRACKERS and name != NONE:
            raise TrackerError(f"--report-to: unknown tracker {name!r}; valid: {valid}")
    if NONE in names and len(set(names)) > 1:
        raise TrackerError(f"--report-to: 'none' cannot be combined with trackers ({', '.join(sorted(set(names) - {NONE}))})")
    return tuple(dict.fromkeys(n for n in names if n != NONE))


def check_installed(names: Iterable[str]) -> None:
    """TrackerError naming the `pip install` for the first tracker whose package does not import."""
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"--report-to {name} needs the {module} package: pip install {package} "
                               "(or pip install 'address-llava[trackers]')")


@dataclass(frozen=True)
class TrackerPlan:
    """What a trainer hands accelerate: `Accelerator(log_with=plan.log_with)`, then `start_trackers`."""

    names: tuple[str, ...]
    """the trackers, in the order given"""
    project: str
    """accelerate's project name: the wandb project and the MLflow experiment (MLFLOW_EXPERIMENT_NAME wins)"""
    log_with: list[Any] | None = None
    """accelerate's `log_with`: tracker names, and the TensorBoard tracker built with its exact folder (None: no tracker)"""
    init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """accelerate's `init_trackers(init_kwargs=...)`, per tracker name"""
    mlflow_uri: str | None = None
    """the local MLflow store this run sets up (None: MLFLOW_TRACKING_URI is set, or no MLflow)"""
    where: dict[str, str] = field(default_factory=dict)
    """tracker -> where it writes, for the trainer's start-up line"""
    run_dir: str = ""
    """the run's output folder: `trackers.json` (the tracker run ids a resume continues) lives there"""

    def describe(self) -> str:
        return ", ".join(f"{n} ({self.where[n]})" for n in self.names) or "none"


def folder_tensorboard_tracker(folder: str | os.PathLike):
    """accelerate's TensorBoardTracker writing its events exactly in `folder`.

    accelerate writes to `<logging_dir>/<run name>`, so the folder is split into those two; the tracker's
    SummaryWriter keyword arguments (`init_kwargs`) stay open until `start_trackers` (the resume step).
    """
    from accelerate.tracking import TensorBoardTracker

    folder = Path(folder)
    return TensorBoardTracker(folder.name, str(folder.parent))


def plan_trackers(names: Iterable[str], run_dir: str | os.PathLike, project: str,
                  tensorboard_dir: str | os.PathLike) -> TrackerPlan:
    """The trackers of one run writing under `run_dir` (TensorBoard: in `tensorboard_dir`); checks that their
    packages import. Made before the Accelerator, which takes `plan.log_with`."""
    names = tuple(names)
    check_installed(names)
    run_dir = Path(run_dir)
    log_with: list[Any] = []
    init_kwargs: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    mlflow_uri = None
    for name in names:
        if name == "tensorboard":
            log_with.append(folder_tensorboard_tracker(tensorboard_dir))
            where[name] = str(tensorboard_dir)
        elif name == "wandb":
            kwargs = {"name": run_dir.resolve().name}
            if not os.environ.get("WANDB_MODE"):
                kwargs["mode"] = "offline"  # no network needed; `wandb sync` uploads the run later
            if not os.environ.get("WANDB_DIR"):
                kwargs["dir"] = str(run_dir)
            init_kwargs[name] = kwargs
            log_with.append(name)
            wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir) / "wandb"
            where[name] = f"{os.environ.get('WANDB_MODE') or 'offline'}, {wandb_dir}"
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow_uri = (run_dir / "mlruns").resolve().as_uri()
            init_kwargs[name] = {"run_name": run_dir.resolve().name}
            log_with.append(name)
            where[name] = mlflow_uri or os.environ["MLFLOW_TRACKING_URI"]
    return TrackerPlan(names, project, log_with or None, init_kwargs, mlflow_uri, where, str(run_dir))


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as `{"group.field": value}` with scalars only (what TensorBoard's hparams, wandb and
    MLflow params all accept); other values are written as text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, prefix=name + "."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


TRACKER_IDS_FILE = "trackers.json"


def _tracker_ids(plan: TrackerPlan) -> dict[str, str]:
    path = Path(plan.run_dir) / TRACKER_IDS_FILE
    if not plan.run_dir or not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):  # a torn file of a killed write: start new tracker runs, not fail the resume
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def start_trackers(accelerator, plan: TrackerPlan, config: dict[str, Any] | None = None,
                   resume_step: int | None = None) -> None:
    """`accelerator.init_trackers` for the plan (main process only), with `config` flattened as the run's parameters.

    `resume_step`: the checkpoint's step when the run resumes; TensorBoard then hides the events a killed run
    wrote after it (SummaryWriter's purge_step), and wandb / MLflow continue the runs `trackers.json` names.
    A fresh start hides every earlier event in the folder (a run killed before its first checkpoint), as
    metrics.jsonl is cut back to nothing.
    """
    if not plan.names or not accelerator.is_main_process:
        return
    ids = _tracker_ids(plan) if resume_step is not None else {}
    init_kwargs = {name: dict(kwargs) for name, kwargs in plan.init_kwargs.items()}
    from accelerate.tracking import TensorBoardTracker

    for tracker in plan.log_with or []:
        if isinstance(tracker, TensorBoardTracker):
            # accelerate passes the tracker's init_kwargs to SummaryWriter when it starts (below).
            tracker.init_kwargs["purge_step"] = (resume_step or 0) + 1
    if "wandb" in init_kwargs:
        init_kwargs["wandb"].update(id=ids.get("wandb") or uuid.uuid4().hex[:8], resume="allow")
    if "mlflow" in init_kwargs and ids.get("mlflow"):
        init_kwargs["mlflow"]["run_id"] = ids["mlflow"]
    if plan.mlflow_uri is not None:
        import mlflow

        # mlflow keeps the tracking URI per process: set it for this run (another run may have used another folder).
        mlflow.set_tracking_uri(plan.mlflow_uri)
        # MLflow 3 refuses the file store unless this is set (it recommends a database, which mlflow-skinny lacks).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # A continued run keeps the parameters of its first start (MLflow refuses to change a logged parameter,
    # and `--resume` itself would be one).
    params = None if ids else flat_config(config or {})
    accelerator.init_trackers(plan.project, config=params, init_kwargs=init_kwargs)
    if plan.run_dir and ("wandb" in init_kwargs or "mlflow" in init_kwargs):
        started = {}
        if "wandb" in init_kwargs:
            started["wandb"] = init_kwargs["wandb"]["id"]
        if "mlflow" in init_kwargs:
            started["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        atomic_write_json(Path(plan.run_dir) / TRACKER_IDS_FILE, started)


def finish_trackers(accelerator) -> None:
    """Ends this run's trackers (flushes TensorBoard, closes the wandb / MLflow runs) on the main process.

    `accelerator.end_training()` does this too but also destroys the process group: a trainer called several
    times in one launched job (the fold models of `candidates`) must keep it.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
