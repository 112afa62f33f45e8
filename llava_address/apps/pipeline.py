"""The main job: the whole address-llava pipeline on the built-in demo city, stage by stage.

    address-llava demo --out runs/demo            # everything, a few minutes on 2 CPU cores
    address-llava demo --out runs/demo --until clip --force

Each stage calls the same `main(argv)` a user would run from the shell (printed before it runs), so
the demo doubles as a worked example. A finished stage leaves `<out>/.done/<stage>.json`; a re-run
skips it unless `--force`, so an interrupted demo continues where it stopped.

Stages: city (render images + GPS) -> dataset (reverse-geocode, sub-streets, splits) -> clip (train
AddressCLIP, evaluate it and the zero-shot model, export to Hugging Face) -> candidates (cross-fitted
AddressCLIP top-K addresses of every image) -> conversations (address Q&A, half of it candidate-grounded;
plain scene descriptions for the base) -> llava (a tiny LLaVA "base" model trained on scene descriptions
that name no address; swap in the AddressCLIP tower, align the projector, tune on the address Q&A, merge)
-> benchmark (ours, ours with candidates, the base, AddressCLIP retrieval, scored the same way; one chat).

`--network FILE [--city NAME]` runs every stage on another street network (.osm.pbf, .osm, .osm.bz2,
GraphML, GeoJSON) instead of central Helsinki.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from clip_stage.core.config import ConfigParser, Section
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json
from clip_stage.core.outdir import check_out_dir, write_marker
from conversations.records import IMAGE_TOKEN, load_records
from llava_address.apps import cli
from llava_address.prompting import render_text


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run. Defaults finish in minutes on 2 CPU cores."""

    out: str = "runs/demo"
    """output folder of the whole run"""
    seed: int = 0
    """seed of every stage"""
    network: str = ""
    """street network of the demo city (.osm.pbf/.osm/.osm.bz2/.graphml/.geojson); '' = central Helsinki"""
    city: str = ""
    """city name for the addresses ('' = from the network's place data)"""
    num_images: int = 3000
    """pictures rendered for the demo city"""
    image_size: int = 96
    """side of the rendered pictures in pixels"""
    clip_model: str = "addressclip-small"
    """open_clip architecture trained from scratch (clip_stage/model_configs)"""
    clip_epochs: int = 8
    """AddressCLIP training epochs"""
    llava_config: str = "demo-llava"
    """tiny LLaVA shape (llava_address/model_configs)"""
    folds: int = 2
    """cross-fitting folds of the candidate addresses of training images"""
    top_k: int = 5
    """AddressCLIP candidate addresses per question (candidate-grounded answers)"""
    candidate_fraction: float = 0.5
    """share of training conversations that carry candidates"""
    vision_feature_layer: int = -1
    """tower layer the projector reads after the swap (stock LLaVA config field; chosen by scripts/bench_tower_features.py)"""
    vision_feature_select_strategy: Literal["default", "full"] = "full"
    """'default' (patches only) or 'full' (patches + CLS, which carries the retrieval signal) after the swap"""
    type_weights: str = "full_address=3,street=2,cross_streets=1.5,place=1,yes_no=4,multiple_choice=3,caption=0.5"
    """question types of the address conversations (verification and choice weighted up: the tiny LLM needs practice)"""
    max_turns: int = 1
    """most question-answer pairs per training conversation, from 1 (1: every answer must be read from the image,
    none copied from an earlier turn, and a step costs less; see docs/benchmarks.md)"""
    conversations_per_image: int = 3
    """training conversations per image (each with its own question types)"""
    base_steps: int = 200
    """steps of the base LLaVA's scene-description pre-training"""
    align_steps: int = 60
    """steps of projector alignment after the tower swap"""
    tune_steps: int = 1400
    """steps of address tuning (full fine-tuning of the tiny LLM + projector)"""
    tune_lr: str = "1.5e-3"
    """peak learning rate of address tuning"""
    eval_questions: int = 200
    """evaluation questions per system in the benchmark"""
    until: str = ""
    """stop after this stage ('' = run all)"""
    force: bool = False
    """re-run stages that already finished"""

    def __post_init__(self):
        if self.until and self.until not in STAGES:
            raise ValueError(f"--until {self.until!r}: valid stages are {list(STAGES)}")
        if self.max_turns < 1 or self.conversations_per_image < 1:
            raise ValueError("--max-turns and --conversations-per-image must be >= 1")
        check_stage_options(self)


def check_stage_options(cfg: DemoConfig) -> None:
    """The stages' own checks of the values the demo hands them, all before the first stage runs: a bad
    --type-weights, --clip-model or --folds then fails at once, not after minutes of earlier stages."""
    # lazy: these import torch / open_clip, which `demo --help` must not wait for
    from clip_stage.candidates import build_parser as candidates_parser, check_options
    from clip_stage.model import model_config
    from conversations.config import BuildConfig
    from llava_address.tiny import load_tiny_config

    for name in ("num_images", "image_size", "clip_epochs", "base_steps", "align_steps", "tune_steps",
                 "eval_questions"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    try:
        lr = float(cfg.tune_lr)
    except ValueError:
        raise ValueError(f"--tune-lr {cfg.tune_lr!r} is not a number") from None
    if not lr > 0:
        raise ValueError(f"--tune-lr must be > 0, got {cfg.tune_lr}")
    p = Paths(Path(cfg.out))
    candidates = candidates_parser()  # the demo leaves --style and --splits at the command's defaults
    check_options(cfg.folds, cfg.top_k, candidates.get_default("style"), candidates.get_default("splits").split(","))
    BuildConfig(dataset=str(p.dataset), out=str(p.conversations), type_weights=cfg.type_weights,
                candidate_fraction=cfg.candidate_fraction, candidate_k=cfg.top_k)
    model_config(cfg.clip_model)
    load_tiny_config(cfg.llava_config)


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def city(self): return self.root / "city"
    @property
    def dataset(self): return self.root / "dataset"
    @property
    def clip_run(self): return self.root / "clip"
    @property
    def clip_eval(self): return self.root / "clip" / "eval"
    @property
    def zero_shot_eval(self): return self.root / "clip" / "eval_zero_shot"
    @property
    def export(self): return self.root / "clip" / "hf"
    @property
    def candidates(self): return self.root / "candidates"
    @property
    def conversations(self): return self.root / "conversations"
    @property
    def captions(self): return self.root / "conversations_captions"
    @property
    def llava(self): return self.root / "llava"
    @property
    def benchmark(self): return self.root / "benchmark"
    @property
    def done(self): return self.root / ".done"


def run_command(name: str, argv: list[str]) -> None:
    """Runs one `address-llava` subcommand in-process, after printing it as a shell line."""
    print(f"\n$ address-llava {name} {shlex.join(argv)}", flush=True)
    code = cli.run_command(name, argv)
    if code:
        raise SystemExit(f"`address-llava {name}` failed with exit status {code}")


def _network_args(cfg: DemoConfig) -> list[str]:
    return ["--network", cfg.network] if cfg.network else []


def stage_city(cfg: DemoConfig, p: Paths) -> dict:
    run_command("demo-city", ["--out", str(p.city), "--num-images", str(cfg.num_images), *_network_args(cfg),
                              "--image-size", str(cfg.image_size), "--seed", str(cfg.seed), "--overwrite"])
    return {"gps": str(p.city / "gps.csv")}


def stage_dataset(cfg: DemoConfig, p: Paths) -> dict:
    city = ["--city", cfg.city] if cfg.city else []
    run_command("build-dataset", ["--images", str(p.city / "images"), "--gps", str(p.city / "gps.csv"),
                                  *_network_args(cfg), *city,
                                  "--out", str(p.dataset), "--seed", str(cfg.seed), "--overwrite", "--quiet"])
    run_command("dataset-summary", [str(p.dataset)])
    return json.loads((p.dataset / "build_report.json").read_text())


def stage_clip(cfg: DemoConfig, p: Paths) -> dict:
    run_command("train-clip", ["--dataset", str(p.dataset), "--model", cfg.clip_model, "--pretrained", "none",
                               "--output-dir", str(p.clip_run), "--learning-rate", "5e-4", "--min-lr", "1e-6",
                               "--num-epochs", str(cfg.clip_epochs), "--per-device-batch-size", "64",
                               "--num-workers", "1", "--seed", str(cfg.seed), "--resume", "latest"])
    run_command("eval-clip", ["--checkpoint", str(p.clip_run), "--dataset", str(p.dataset), "--split", "test",
                              "--out", str(p.clip_eval)])
    # Zero-shot: the same architecture before fine-tuning (random init here: nothing can be downloaded).
    run_command("eval-clip", ["--model", cfg.clip_model, "--pretrained", "none", "--dataset", str(p.dataset),
                              "--split", "test", "--out", str(p.zero_shot_eval), "--no-plot"])
    run_command("export-clip", ["--checkpoint", str(p.clip_run), "--out", str(p.export), "--overwrite"])
    ours = json.loads((p.clip_eval / "metrics.json").read_text())
    zero = json.loads((p.zero_shot_eval / "metrics.json").read_text())
    return {"addressclip": ours, "zero_shot": zero}


def stage_candidates(cfg: DemoConfig, p: Paths) -> dict:
    # Cross-fitted: training images are ranked by fold models that never saw them (clip_stage.candidates).
    run_command("candidates", ["--checkpoint", str(p.clip_run), "--dataset", str(p.dataset), "--out", str(p.candidates),
                               "--folds", str(cfg.folds), "--top-k", str(cfg.top_k)])
    return json.loads((p.candidates / "candidates_info.json").read_text())["accuracy"]


def stage_conversations(cfg: DemoConfig, p: Paths) -> dict:
    run_command("conversations", ["--dataset", str(p.dataset), "--out", str(p.conversations),
                                  "--seed", str(cfg.seed), "--candidates", str(p.candidates),
                                  "--candidate-k", str(cfg.top_k), "--candidate-fraction", str(cfg.candidate_fraction),
                                  "--type-weights", cfg.type_weights, "--min-turns", "1", "--max-turns", str(cfg.max_turns),
                                  "--conversations-per-image", str(cfg.conversations_per_image), "--overwrite"])
    run_command("validate", [str(p.conversations / "train.json"), str(p.conversations / "eval.json"),
                             "--image-root", str(p.dataset / "images")])
    # Plain scene descriptions that name no address: what the "general" base model and the projector
    # alignment learn from (so the base is an honest, not address-tuned baseline).
    run_command("conversations", ["--dataset", str(p.dataset), "--out", str(p.captions), "--seed", str(cfg.seed),
                                  "--type-weights", "scene=1", "--min-turns", "1", "--max-turns", "1",
                                  "--overwrite"])
    run_command("conv-stats", [str(p.conversations / "train.json"), "--png", str(p.conversations / "train_stats.png"),
                               "--json", str(p.conversations / "train_stats.json")])
    return json.loads((p.conversations / "build_info.json").read_text()).get("counts", {})


def _texts_for_tokenizer(*files: Path) -> list[str]:
    """Every training conversation as the LLM reads it: the Vicuna system prompt, the USER/ASSISTANT roles and
    the turns (special tokens left out). The tokenizer then learns the prompt's words as the frequent words
    they are; trained on the turns alone, it split the system prompt into 82 pieces and the roles into 6 and
    11, a third of a single-question sample's tokens (docs/benchmarks.md)."""
    texts = []
    for f in files:
        for record in load_records(f):
            text = render_text(record["conversations"], eos_token="", bos_token="")
            texts.append(text.replace(IMAGE_TOKEN, ""))
    return texts


def last_checkpoint(run_dir: Path) -> Path:
    from llava_address.checkpoint import list_checkpoints  # lazy: torch loads when the demo runs, not for --help

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise SystemExit(f"{run_dir} holds no checkpoint")
    return checkpoints[-1]


def build_base_init(cfg: DemoConfig, p: Paths) -> Path:
    """The random-weight tiny LLaVA the demo starts from (tokenizer trained on the demo's dialogues)."""
    from llava_address.tiny import build_tiny_llava, train_tokenizer  # lazy: torch, as above

    base_init = p.llava / "base_init"
    if not (base_init / "config.json").exists():
        texts = _texts_for_tokenizer(p.conversations / "train.json", p.captions / "train.json")
        tokenizer = train_tokenizer(texts, p.llava / "tokenizer", vocab_size=1000)
        build_tiny_llava(tokenizer, seed=cfg.seed, out_dir=base_init, config_name=cfg.llava_config)
        print(f"built a random-weight tiny LLaVA ({cfg.llava_config}) at {base_init}")
    return base_init


def train_and_merge(cfg: DemoConfig, p: Paths, recipe: str, model: Path, data: Path, name: str, steps: int, lr: str,
                    *extra: str) -> Path:
    """One LLaVA stage: `train-llava` from `model`, then `merge` its last checkpoint into llava/<name>."""
    run = p.llava / f"{name}_run"
    # float32 without gradient checkpointing: the fastest settings for a small model on CPU cores.
    run_command("train-llava", ["--config", recipe, "--model-name-or-path", str(model), *extra,
                                "--data-path", str(data), "--image-root", str(p.dataset / "images"),
                                "--output-dir", str(run), "--max-steps", str(steps), "--learning-rate", lr,
                                "--per-device-batch-size", "16", "--global-batch-size", "16",
                                "--seed", str(cfg.seed), "--torch-dtype", "float32", "--mixed-precision", "no",
                                "--no-gradient-checkpointing", "--no-progress-bar", "--resume", "latest"])
    run_command("merge", ["--checkpoint", str(last_checkpoint(run)), "--out", str(p.llava / name), "--overwrite"])
    return p.llava / name


def align_and_tune(cfg: DemoConfig, p: Paths, base: Path, suffix: str = "") -> Path:
    """Swap in the AddressCLIP tower (with the configured features), align a fresh projector, address-tune."""
    aligned = train_and_merge(cfg, p, "align_projector", base, p.captions / "train.json", f"aligned{suffix}",
                              cfg.align_steps, "2e-3", "--model.vision-tower", str(p.export / "vision_tower"),
                              "--vision-feature-layer", str(cfg.vision_feature_layer),
                              "--vision-feature-select-strategy", cfg.vision_feature_select_strategy)
    # Full fine-tuning, not LoRA: the tiny base never saw a street name (its data names no address), so the
    # embedding and output rows of those tokens must train too; a real LLaVA-1.5 uses recipe address_lora.
    return train_and_merge(cfg, p, "address_full", aligned, p.conversations / "train.json", f"merged{suffix}",
                           cfg.tune_steps, cfg.tune_lr, "--projector-lr", "1e-3")


def stage_llava(cfg: DemoConfig, p: Paths) -> dict:
    base_init = build_base_init(cfg, p)
    # 1. The "general" base model: LLM + projector trained on scene descriptions that name no address.
    base = train_and_merge(cfg, p, "address_full", base_init, p.captions / "train.json", "base", cfg.base_steps, "2e-3")
    # 2.-3. Swap in the AddressCLIP tower, align a fresh projector (LLaVA stage 1), tune on the address Q&A
    # (half of it candidate-grounded, so one model answers with and without candidates).
    merged = align_and_tune(cfg, p, base)
    return {"base": str(base), "merged": str(merged)}


def benchmark_systems(cfg: DemoConfig, p: Paths, merged: Path | None = None) -> list[str]:
    merged = merged or p.llava / "merged"
    return ["--system", f"ours=llava:{merged}",
            "--system", f"ours_candidates=llava:{merged},candidates={p.clip_run},top_k={cfg.top_k}",
            "--system", f"base=llava:{p.llava / 'base'}",
            "--system", f"addressclip_retrieval=clip:{p.clip_run}"]


def stage_benchmark(cfg: DemoConfig, p: Paths) -> dict:
    eval_file = p.conversations / "eval.json"
    run_command("benchmark", ["--dataset", str(p.dataset), "--eval", str(eval_file), "--out", str(p.benchmark),
                              "--limit", str(cfg.eval_questions), *benchmark_systems(cfg, p)])
    first = load_records(eval_file)[0]
    image = p.dataset / "images" / first["image"]
    run_command("chat", ["--model", str(p.llava / "merged"), "--image", str(image),
                         "--candidates", str(p.clip_run), "--dataset", str(p.dataset),
                         "--question", "Where was this photo taken?"])
    print(f"(reference: {first['reference'].get('address', first['reference'])})")
    return {"table": (p.benchmark / "benchmark.md").read_text() if (p.benchmark / "benchmark.md").exists() else ""}


# The demo's own sub-folders that a stage's commands resume rather than replace (cleared by --force, and when
# an earlier stage runs again: resumed, they would continue from what that stage wrote before).
RESUMED_OUTPUTS = {"clip": ("clip_run",), "candidates": ("candidates",), "llava": ("llava",), "benchmark": ("benchmark",)}

STAGES: dict[str, Callable[[DemoConfig, Paths], dict]] = {
    "city": stage_city,
    "dataset": stage_dataset,
    "clip": stage_clip,
    "candidates": stage_candidates,
    "conversations": stage_conversations,
    "llava": stage_llava,
    "benchmark": stage_benchmark,
}


def clear_resumed_outputs(stage: str, p: Paths) -> None:
    for folder in RESUMED_OUTPUTS.get(stage, ()):
        shutil.rmtree(getattr(p, folder), ignore_errors=True)


def forget_later_stages(stage: str, p: Paths) -> None:
    """Every stage after `stage` reads what it writes: their markers go (a later demo re-runs them instead of
    printing results of the earlier models) and so do their resumed outputs (the benchmark would otherwise
    continue answers of the earlier model, which it refuses)."""
    names = list(STAGES)
    for later in names[names.index(stage) + 1:]:
        (p.done / f"{later}.json").unlink(missing_ok=True)
        clear_resumed_outputs(later, p)


def _fmt(key: str, v) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:.1f}" if key.endswith("_m") else f"{100 * v:.1f}"


def print_clip_table(result: dict) -> None:
    keys = ["SSA-1", "SSA-5", "SA-1", "SA-5", "neighbourhood-1", "median_distance_m"]
    rows = [("AddressCLIP (ours)", result["addressclip"]), ("zero-shot", result["zero_shot"])]
    present = [k for k in keys if k in result["addressclip"]]
    print("\n| model (test split, %; distance in m) | " + " | ".join(present) + " |")
    print("|---" * (len(present) + 1) + "|")
    for name, m in rows:
        print(f"| {name} | " + " | ".join(_fmt(k, m.get(k)) for k in present) + " |")


def parse_args(argv: list[str] | None) -> DemoConfig:
    return ConfigParser([Section("demo", DemoConfig)], prog="address-llava demo", description=__doc__).parse_config(argv)["demo"]


@command_main("demo")
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    p = Paths(Path(cfg.out))
    # One rule for every command's --out (clip_stage.core.outdir): an earlier demo folder is continued (its .done/
    # markers skip finished stages); anything else non-empty, or a folder holding the network file, is refused.
    check_out_dir(p.root, "demo", resume=True, legacy=[".done/city.json", "city/gps.csv"], inputs=[cfg.network or None])
    p.done.mkdir(parents=True, exist_ok=True)
    write_marker(p.root, "demo")
    started = time.time()
    results: dict[str, dict] = {}
    ran: set[str] = set()
    for name, stage in STAGES.items():
        marker = p.done / f"{name}.json"
        if marker.exists() and not cfg.force:
            print(f"\n=== stage {name}: already done ({marker}); --force re-runs it ===")
            results[name] = json.loads(marker.read_text())["result"]
        else:
            ran.add(name)
            if cfg.force and marker.exists():
                # --force re-runs a finished stage from scratch: its resumable runs must not simply continue
                clear_resumed_outputs(name, p)
            forget_later_stages(name, p)
            print(f"\n=== stage {name} ===", flush=True)
            t0 = time.time()
            results[name] = stage(cfg, p)
            atomic_write_json(marker, {"config": asdict(cfg), "seconds": round(time.time() - t0, 1), "result": results[name]})
            print(f"=== stage {name} done in {time.time() - t0:.0f} s ===")
        if name == "clip":
            print_clip_table(results["clip"])
        if name == cfg.until:
            break
    if "benchmark" in results and "benchmark" not in ran and results["benchmark"].get("table"):
        print("\n" + results["benchmark"]["table"])  # a finished demo re-run still ends with its results
    print(f"\ndemo finished in {time.time() - started:.0f} s; outputs under {p.root}")
    return 0
