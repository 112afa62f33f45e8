"""Baselines and the loss ablation of AddressCLIP, trained and evaluated in one harness.

    address-llava clip-baselines --dataset data/demo --model addressclip-small --pretrained none \\
        --out runs/baselines --seeds 0 1 -- --max-steps 300 --per-device-batch-size 32 --learning-rate 1e-3

Variants (registry `VARIANTS`; paper: AddressCLIP, ECCV 2024, Table "loss ablation"):

    zero-shot          the base model, no fine-tuning (same weights the fine-tuned runs start from)
    address-only       L_address                         weights a/b/c = 1 / 0   / 0    (paper's "CLIP + address")
    address+semantic   L_address + L_semantic            1 / 0.2 / 0
    address+geo        L_address + L_geo                 1 / 0   / 0.8
    addressclip        all three (the full method)       1 / 0.2 / 0.8

Every fine-tuned variant runs `clip_stage.train.main` in-process with identical arguments (dataset, model,
seed, and everything after `--`, e.g. steps, batch, lr), differing only in the three loss weights; each
is then evaluated by `clip_stage.evaluate.evaluate` on the same gallery. Writes to `--out`:

    runs/<variant>-seed<S>/     the train-clip run folders (with eval/ inside)
    baselines.json              per (variant, seed): weights, metrics, training summary; means over seeds;
                                the comparisons full-vs-zero-shot and full-vs-address-only (SSA-1)
    baselines.md                the markdown table (mean over seeds, and per seed when several)

Everything is checked before the first model loads: the variants, the train-clip arguments (parsed as
train-clip would), the dataset and its split, the model name, and `--out` (the output-folder rule of
`clip_stage.core.outdir`: never the dataset or inside it; a new or empty folder, or an earlier
clip-baselines folder with `--reuse`, which keeps its finished runs after checking that each was trained with
the same arguments; anything else is refused, and so is an earlier folder without `--reuse`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.outdir import check_out_dir, on_disk, write_marker
from clip_stage.evaluate import TABLE_METRICS, evaluate, format_table, split_records
from clip_stage.core.fs import atomic_write_json, atomic_write_text
from clip_stage.gallery import GalleryEncoder, gallery_from_dataset
from clip_stage.core.registry import Registry
from clip_stage.core.schema import ADDRESS_STYLES, SPLITS
from clip_stage.model import check_pretrained, create_clip, load_checkpoint, model_config, read_checkpoint_config
from clip_stage.train import check_options as check_train_options
from clip_stage.train import main as train_main
from clip_stage.train_config import parse_config


@dataclass(frozen=True)
class Variant:
    name: str
    weights: tuple[float, float, float] | None
    """(address, semantic, geo) loss weights; None = no fine-tuning."""
    description: str


class BaselineError(ValueError):
    """A bad clip-baselines request (an unknown variant, a reserved train-clip flag, a run to reuse that differs)."""


KIND = "clip-baselines"
# What a clip-baselines folder held before output markers existed.
LEGACY_FILES = ("baselines.json", "runs/*-seed*")

VARIANTS: Registry[Variant] = Registry("baseline variant", error=BaselineError)
get_variant = VARIANTS.lookup


def register_variant(v: Variant) -> None:
    VARIANTS.register(v.name, v)


register_variant(Variant("zero-shot", None, "base model, no fine-tuning"))
register_variant(Variant("address-only", (1.0, 0.0, 0.0), "CLIP fine-tuned on addresses (paper: CLIP + address)"))
register_variant(Variant("address+semantic", (1.0, 0.2, 0.0), "address + image-semantic contrastive"))
register_variant(Variant("address+geo", (1.0, 0.0, 0.8), "address + image-geography matching"))
register_variant(Variant("addressclip", (1.0, 0.2, 0.8), "AddressCLIP: all three losses"))

# train-clip flags the harness sets itself; passing them after `--` would make the variants differ silently
_RESERVED = ("--dataset", "--model", "--pretrained", "--output-dir", "--seed", "--address-weight",
             "--semantic-weight", "--geo-weight", "--resume", "--config")


def _check_train_args(train_args: list[str]) -> None:
    for a in train_args:
        flag = a.split("=", 1)[0]
        if flag in _RESERVED:
            raise BaselineError(f"{flag} is set by the baseline harness for every variant; do not pass it after '--'")


def train_argv(variant: Variant, dataset: str, model: str, pretrained: str | None, run_dir: Path, seed: int,
               train_args: list[str]) -> list[str]:
    a, b, c = variant.weights
    return ["--dataset", str(dataset), "--model", model, "--pretrained", pretrained or "none",
            "--output-dir", str(run_dir), "--seed", str(seed),
            "--address-weight", str(a), "--semantic-weight", str(b), "--geo-weight", str(c), *train_args]


# Fields that change a run's result; the rest (output folder, logging, workers, threads) do not.
_RESULT_GROUPS = ("model", "data", "loss", "optim")
_RESULT_NEUTRAL = {("data", "num_workers")}


def reuse_mismatches(run_dir: Path, argv: list[str]) -> list[str]:
    """'group.field: was X, now Y' for every result-relevant train-clip option a finished run differs in."""
    saved = read_checkpoint_config(run_dir).get("train_config") or {}
    wanted = parse_config(argv).to_dict()
    out = []
    for group in _RESULT_GROUPS:
        for name, now in wanted[group].items():
            was = saved.get(group, {}).get(name, "<not recorded>")
            if (group, name) in _RESULT_NEUTRAL:
                continue
            if (group, name) == ("data", "dataset") and was != "<not recorded>":
                was, now = str(Path(was).resolve()), str(Path(now).resolve())
            if was != now:
                out.append(f"{group}.{name}: was {was!r}, now {now!r}")
    return out


def _mean_metrics(rows: list[dict]) -> dict:
    out = {}
    for key in TABLE_METRICS:
        vals = [r["metrics"][key] for r in rows if r["metrics"].get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
        if len(vals) > 1:
            out[key + "_std"] = statistics.stdev(vals)
    return out


def _run_dir(out_dir: Path, v: Variant, seed: int) -> Path:
    return out_dir / "runs" / f"{v.name}-seed{seed}"


def check_request(dataset: str | Path, out_dir: str | Path, *, model: str, pretrained: str | None,
                  variants: list[str], seeds: list[int], train_args: list[str], split: str = "test",
                  reuse: bool = False) -> list[Variant]:
    """Everything run_baselines needs, checked before any model loads or anything is written; returns the variants.

    Each fine-tuned variant's train-clip arguments are parsed as train-clip will; with --reuse, each finished run
    must have been trained with them."""
    chosen = [get_variant(v) for v in variants]
    _check_train_args(train_args)
    split_records(dataset, split)
    if ":" not in model:
        model_config(model)
    check_pretrained(model, pretrained)
    out_dir = Path(out_dir)
    state = check_out_dir(out_dir, KIND, inputs=[dataset, on_disk(pretrained)], resume=True, legacy=LEGACY_FILES)
    if state == "resume" and not reuse:
        raise BaselineError(f"--out {out_dir} holds an earlier clip-baselines run; pass --reuse to keep its finished "
                            "runs (checked against these arguments), or choose another --out")
    for seed in seeds:
        for v in (v for v in chosen if v.weights is not None):
            run_dir = _run_dir(out_dir, v, seed)
            argv = train_argv(v, str(dataset), model, pretrained, run_dir, seed, train_args)
            check_train_options(parse_config(argv))
            if (run_dir / "final").is_dir():
                differ = reuse_mismatches(run_dir / "final", argv)
                if differ:
                    raise BaselineError(f"--reuse: {run_dir} was trained with other arguments ({'; '.join(differ)}); "
                                        "delete it, or use another --out")
    return chosen


def run_baselines(dataset: str | Path, out_dir: str | Path, *, model: str, pretrained: str | None,
                  variants: list[str], seeds: list[int], train_args: list[str], split: str = "test",
                  style: str = "full", reuse: bool = False, device: str = "cpu") -> dict:
    """Trains and evaluates every (variant, seed); returns the report written to baselines.json."""
    chosen = check_request(dataset, out_dir, model=model, pretrained=pretrained, variants=variants, seeds=seeds,
                           train_args=train_args, split=split, reuse=reuse)
    out_dir = Path(out_dir)
    gallery = gallery_from_dataset(dataset, style)
    write_marker(out_dir, KIND)  # the runs are written in place: a killed harness is continued with --reuse
    encoder = GalleryEncoder(None, device=device)  # in memory: every model is evaluated once
    rows = []
    for seed in seeds:
        for v in chosen:
            run_dir = _run_dir(out_dir, v, seed)
            summary = None
            if v.weights is None:
                torch.manual_seed(seed)  # train-clip seeds the same way before creating the model
                bundle = create_clip(model, pretrained, device=device)
            else:
                argv = train_argv(v, str(dataset), model, pretrained, run_dir, seed, train_args)
                if not (reuse and (run_dir / "final").is_dir()):
                    # An unfinished run of a killed harness (only reachable with --reuse) is continued.
                    resume = ["--resume", "latest"] if run_dir.exists() else []
                    print(f"clip-baselines: training {v.name} (seed {seed}): train-clip {' '.join(argv + resume)}",
                          flush=True)
                    if train_main(argv + resume) != 0:  # its guard has printed why, on one line
                        raise BaselineError(f"train-clip failed for {v.name} (seed {seed}); {run_dir} is kept for --reuse")
                bundle = load_checkpoint(run_dir, device=device)
                summary = _read_json(run_dir / "run_summary.json")
            metrics = evaluate(bundle, dataset, run_dir / "eval", split=split, gallery=gallery, style=style,
                               encoder=encoder, device=device)
            rows.append({"variant": v.name, "seed": seed, "weights": v.weights, "description": v.description,
                         "run_dir": str(run_dir), "metrics": metrics,
                         "train": None if summary is None else {k: summary.get(k) for k in
                                                                 ("steps", "wall_s", "images_per_s", "last_losses",
                                                                  "loss_weights", "notes")}})
            print(f"clip-baselines: {v.name} seed {seed}: SSA-1 {100 * metrics['SSA-1']:.1f}%, "
                  f"SA-1 {100 * metrics['SA-1']:.1f}%", flush=True)

    means = {v.name: _mean_metrics([r for r in rows if r["variant"] == v.name]) for v in chosen}
    comparisons = {}
    full = means.get("addressclip")
    for other in ("zero-shot", "address-only"):
        if full is not None and other in means:
            comparisons[f"addressclip - {other} (SSA-1, points)"] = 100 * (full["SSA-1"] - means[other]["SSA-1"])
    report = {
        "dataset": str(dataset), "split": split, "gallery": gallery.describe(), "model": model,
        "pretrained": pretrained, "seeds": seeds, "train_args": train_args, "variants": [v.name for v in chosen],
        "mean": means, "comparisons": comparisons, "rows": rows,
    }
    atomic_write_json(out_dir / "baselines.json", report)
    atomic_write_text(out_dir / "baselines.md", render_markdown(report))
    return report


def _read_json(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def render_markdown(report: dict) -> str:
    seeds = report["seeds"]
    lines = [f"AddressCLIP baselines on `{report['dataset']}` ({report['split']}, gallery "
             f"{report['gallery']['source']}, {report['gallery']['num_candidates']} candidates), model "
             f"`{report['model']}` (pretrained {report['pretrained']}), seeds {seeds}; train-clip args: "
             f"`{' '.join(report['train_args']) or '(defaults)'}`. Accuracies in %, distances in m"
             + (", mean over seeds." if len(seeds) > 1 else "."), ""]
    names = {}
    for name in report["variants"]:
        w = get_variant(name).weights
        names[name] = f"{name} ({'/'.join(f'{x:g}' for x in w)})" if w else name
    lines.append(format_table({names[n]: report["mean"][n] for n in report["variants"]}))
    if len(seeds) > 1:
        lines += ["", "Per seed:", ""]
        lines.append(format_table({f"{names[r['variant']]} seed {r['seed']}": r["metrics"] for r in report["rows"]}))
    if report["comparisons"]:
        lines += [""] + [f"- {k}: {v:+.1f}" for k, v in report["comparisons"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava clip-baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="address dataset folder")
    p.add_argument("--out", required=True, help="output folder (runs/, baselines.json, baselines.md)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (paper: ViT-B-16)")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or weights file; 'none' = random init")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"which variants (default all: {list(VARIANTS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; every variant runs with each")
    p.add_argument("--split", default="test", choices=SPLITS, help="evaluation split")
    p.add_argument("--style", "--address-style", default="full", choices=sorted(ADDRESS_STYLES), help="gallery address style")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs that already have final/ instead of retraining; a run trained with other "
                        "train-clip arguments (model, data, loss, optimiser) is an error")
    p.add_argument("--device", default="cpu", help="evaluation device")
    return p


@command_main("clip-baselines")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    pretrained = None if str(args.pretrained).lower() in ("none", "") else args.pretrained
    report = run_baselines(args.dataset, args.out, model=args.model, pretrained=pretrained, variants=args.variants,
                           seeds=args.seeds, train_args=train_args, split=args.split, style=args.style,
                           reuse=args.reuse, device=args.device)
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
