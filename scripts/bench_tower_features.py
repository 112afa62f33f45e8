"""Which tower features give the demo's LLaVA the most: stock LLaVA's `vision_feature_layer` x
`vision_feature_select_strategy`, measured on a finished demo run.

    python scripts/bench_tower_features.py --demo runs/demo [--layers -2 -1] [--strategies default full] \
        [--align-steps 60] [--tune-steps 700] [--questions 200]

For each combination, the demo's own base model gets the AddressCLIP tower with those features, a fresh
projector is aligned and the model is address-tuned exactly as in `address-llava demo` (same recipes, steps
and seed, from `llava_address.apps.pipeline`), then the benchmark scores it with and without candidates on the same
evaluation questions. Runs go to `<demo>/tower_features/<layer>_<strategy>_a<align>_t<tune>_q<questions>/` (the
settings are in the name, so a measurement is reused only for the same settings); the table is printed and
written to `<demo>/tower_features/table.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_address.apps.pipeline import DemoConfig, Paths, align_and_tune, run_command  # noqa: E402

METRICS = [("street_acc", "street"), ("sub_street_acc", "sub-street"), ("neighbourhood_acc", "neighbourhood"),
           ("yesno_acc", "yes/no"), ("mc_acc", "multiple choice")]


def measure(demo: Path, layer: int, strategy: str, args) -> tuple[dict, Path]:
    done = json.loads((demo / ".done" / "conversations.json").read_text())["config"]
    cfg = dataclasses.replace(DemoConfig(**{k: v for k, v in done.items() if k in DemoConfig.__dataclass_fields__}),
                              vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                              align_steps=args.align_steps or done["align_steps"],
                              tune_steps=args.tune_steps or done["tune_steps"])
    p = Paths(demo)
    out = combination_folder(demo, layer, strategy, cfg, args.questions)
    result_file = out / "benchmark" / "benchmark.json"
    if not result_file.exists():
        t0 = time.time()
        # the run's own data and base model; only the llava/ and benchmark/ folders are per combination
        merged = align_and_tune(cfg, _Redirect(p, out), p.llava / "base", suffix="")
        run_command("benchmark", ["--dataset", str(p.dataset), "--eval", str(p.conversations / "eval.json"),
                                  "--out", str(out / "benchmark"), "--limit", str(args.questions),
                                  "--system", f"ours=llava:{merged}",
                                  "--system", f"ours_candidates=llava:{merged},candidates={p.clip_run},"
                                              f"top_k={cfg.top_k}"])
        (out / "seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
    return json.loads(result_file.read_text()), out


def combination_folder(demo: Path, layer: int, strategy: str, cfg: DemoConfig, questions: int) -> Path:
    return demo / "tower_features" / f"{layer}_{strategy}_a{cfg.align_steps}_t{cfg.tune_steps}_q{questions}"


class _Redirect(Paths):
    """The demo's paths, except that LLaVA runs are written under the combination's own folder."""

    def __init__(self, demo: Paths, out: Path):
        object.__setattr__(self, "root", demo.root)
        object.__setattr__(self, "_llava", out / "llava")

    @property
    def llava(self):
        return self._llava


def main(argv: list[str] | None = None) -> int:
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a demo run folder with its conversations and base LLaVA")
    ap.add_argument("--layers", type=int, nargs="+", default=[-2, -1])
    ap.add_argument("--strategies", nargs="+", default=["default", "full"], choices=["default", "full"])
    ap.add_argument("--align-steps", type=int, default=0, help="0: the demo's")
    ap.add_argument("--tune-steps", type=int, default=0, help="0: the demo's")
    ap.add_argument("--questions", type=int, default=200)
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    for need, what in ((demo / ".done" / "conversations.json", "finished conversations stage (.done/conversations.json)"),
                       (demo / "llava" / "base" / "config.json", "its base LLaVA (llava/base)")):
        if not need.exists():
            print(f"bench_tower_features: error: {demo}: no {what}; run `address-llava demo --out {demo}` first",
                  file=sys.stderr)
            return 2
    rows = ["| layer | strategy | image tokens | system | " + " | ".join(m[1] for m in METRICS) + " | median error |",
            "|---|---|---:|---|" + "---:|" * (len(METRICS) + 1)]
    for layer in args.layers:
        for strategy in args.strategies:
            res, folder = measure(demo, layer, strategy, args)
            cfg = json.loads((folder / "llava" / "merged" / "config.json").read_text())
            for system in ("ours", "ours_candidates"):
                r = res[system]
                if "error" in r:
                    rows.append(f"| {layer} | {strategy} | | {system} | failed: {r['error'][:60]} |")
                    continue
                m = r["report"].get("strict_metrics") or r["report"]["metrics"]  # as the benchmark's table
                cells = ["-" if m[k]["value"] is None else f"{100 * m[k]['value']:.1f}" for k, _ in METRICS]
                med = r["report"]["distance"]["median_m"]
                rows.append(f"| {layer} | {strategy} | {cfg['image_seq_length']} | {system} | " + " | ".join(cells)
                            + f" | {'-' if med is None else f'{med:.0f} m'} |")
    table = "\n".join(rows)
    print(table)
    (demo / "tower_features").mkdir(exist_ok=True)
    (demo / "tower_features" / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
