"""Training curves from a run's `metrics.jsonl`: every loss term and the learning rate against the step.

Both trainers (train-clip, train-llava) draw `<run>/training_curves.png` whenever they save a checkpoint and
at the end (`MetricsLogger.plot`), as LLaMA-Factory's `--plot_loss` does; `address-llava plot-run` draws any
runs, several overlaid (an ablation, LoRA against full tuning), also while they are still training:

    address-llava plot-run runs/lora runs/full --out runs/lora-vs-full.png

Each panel shows the raw values faintly and an exponential moving average (TensorBoard's smoothing, with its
start-up bias removed) on top. TensorBoard (`--report-to tensorboard`) remains the live view; this is the
file a user can open, attach or diff without a server.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_with, iter_jsonl
from clip_stage.core.outdir import check_out_files

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
DEFAULT_SMOOTHING = 0.6


class CurvesError(ValueError):
    """A run without metrics to draw, or a malformed option."""


def metrics_path(run: str | Path) -> Path:
    """`run/metrics.jsonl` for a run folder; a path that is no folder is taken as the metrics file itself."""
    return Path(run) / METRICS_FILE if Path(run).is_dir() else Path(run)


def read_metric_rows(run: str | Path) -> tuple[list[dict], int]:
    """The rows of `run/metrics.jsonl` (or of the file itself) that have a numeric "step", and how many lines
    were skipped (malformed: the half-written last line of a run still training, or not a metrics row)."""
    path = metrics_path(run)
    if not path.is_file():
        raise CurvesError(f"{run}: no {METRICS_FILE} (is it a train-clip or train-llava run folder?)")
    rows, skipped = [], 0
    for line in iter_jsonl(path):
        value = line.value if line.error is None else None
        if isinstance(value, dict) and isinstance(value.get("step"), (int, float)):
            rows.append(value)
        else:
            skipped += 1
    return rows, skipped


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_keys(rows: Iterable[dict]) -> tuple[list[str], list[str]]:
    """(loss keys, learning-rate keys) in order of first appearance, the total "loss" first. A loss key ends in
    "loss"; a learning-rate key is "lr" or "lr/<group>" (train-llava's `_no_decay` twins are left out: same
    values)."""
    losses, lrs = [], []
    for row in rows:
        for k, v in row.items():
            if not _is_number(v):
                continue
            if k.endswith("loss") and k not in losses:
                losses.append(k)
            elif (k == "lr" or k.startswith("lr/")) and not k.endswith("_no_decay") and k not in lrs:
                lrs.append(k)
    losses.sort(key=lambda k: k != "loss")  # stable: the total first, the terms in their logged order
    return losses, lrs


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with the zero-start bias removed (TensorBoard's smoothing slider)."""
    out, ema, norm = [], 0.0, 0.0
    for v in values:
        ema = weight * ema + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(ema / norm)
    return out


def plot_curves(path: str | Path, runs: dict[str, list[dict]], smoothing: float = DEFAULT_SMOOTHING,
                title: str = "") -> Path:
    """Writes a PNG (atomically) with one panel per loss key and one for the learning rates; `runs` maps a
    label to its metric rows. Raises CurvesError when no run has a loss to draw."""
    if not 0 <= smoothing < 1:
        raise CurvesError(f"smoothing {smoothing}: must be in [0, 1)")
    all_rows = [r for rows in runs.values() for r in rows]
    losses, lrs = curve_keys(all_rows)
    if not losses:
        raise CurvesError(f"{', '.join(runs)}: no loss values logged yet")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # (title, keys, smoothed): a loss is noisy, so drawn raw faintly with the average on top; a schedule is not
    panels = [(k, [k], True) for k in losses] + ([("learning rate", lrs, False)] if lrs else [])
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, keys, smoothed) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                points = [(r["step"], r[key]) for r in rows if _is_number(r.get(key))]
                if not points:
                    continue
                steps, values = zip(*points)
                color = colors[(i * len(keys) + j) % len(colors)]
                name = " ".join(p for p in (label if len(runs) > 1 else "", key if len(keys) > 1 else "") if p)
                if smoothed:
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                    values = smooth(values, smoothing)
                ax.plot(steps, values, color=color, linewidth=1.6, label=name or None)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_run(run_dir: str | Path, smoothing: float = DEFAULT_SMOOTHING) -> Path | None:
    """Draws `run_dir/training_curves.png` from its metrics.jsonl; None when nothing is logged yet."""
    rows, _ = read_metric_rows(run_dir)
    if not curve_keys(rows)[0]:
        return None
    return plot_curves(Path(run_dir) / PLOT_FILE, {Path(run_dir).name: rows}, smoothing, title=str(run_dir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="address-llava plot-run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help=f"train-clip / train-llava run folders (or their {METRICS_FILE} files)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--labels", nargs="+", help="one legend label per RUN (default: the folder names)")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"moving-average weight in [0, 1), 0 = raw (default {DEFAULT_SMOOTHING})")
    return p


@command_main("plot-run")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise CurvesError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    if not 0 <= args.smoothing < 1:
        raise CurvesError(f"--smoothing {args.smoothing}: must be in [0, 1)")
    if Path(args.out).suffix.lower() != ".png":
        raise CurvesError(f"--out {args.out}: give a .png file")
    check_out_files({"--out": args.out}, [metrics_path(r) for r in args.runs])
    if args.labels is not None and len(set(args.labels)) != len(args.labels):
        raise CurvesError(f"--labels {' '.join(args.labels)}: give each run its own label")
    labels = args.labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in args.runs]
    if len(set(labels)) != len(labels):
        labels = [str(r) for r in args.runs]  # runs/a/lora and runs/b/lora: the paths tell them apart
    runs = {}
    for run, label in zip(args.runs, labels):
        rows, skipped = read_metric_rows(run)
        if skipped:
            print(f"plot-run: {run}: skipped {skipped} malformed line(s)", file=sys.stderr)
        runs[label] = rows
    plot_curves(args.out, runs, args.smoothing)
    print(f"wrote {args.out} ({', '.join(f'{k}: {len(v)} rows' for k, v in runs.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
