"""`train-llava`: projector alignment, LoRA, QLoRA and full fine-tuning of LLaVA, driven by accelerate.

One process, DDP or DeepSpeed ZeRO-2/3 (with or without CPU offload): the launcher decides, the code is
the same. This module is the command and the run; the model and data it builds are
llava_address.train_inputs, the optimizer, schedule and DeepSpeed "auto" values llava_address.optim.

    python -m llava_address.train --config address_lora --data-path convs.json --output-dir runs/lora
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml -m llava_address.train --config ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m llava_address.train ...  # CPU

Each optimizer step: gradient accumulation (global batch = per-device x processes x accumulation),
clipping, one scheduler step. Rank 0 shows a tqdm bar and logs loss, learning rates, tokens/s and memory
to <output>/metrics.jsonl and the `--report-to` trackers (clip_stage.core.trackers: TensorBoard in
<output>/tensorboard by default; wandb, MLflow offline under <output> unless WANDB_MODE / MLFLOW_TRACKING_URI
say otherwise). Checkpoints: see llava_address.checkpoint. The run is `setup` (model, data, optimizer, resume
position), `fit` (the loop), `save` and `log_step`; the skeleton, the flag names and the run-folder layout
are train-clip's (clip_stage.core.training), and `train(cfg, hooks)` takes the callbacks a caller (the
training benchmark) observes the loop with. `--stop-at-step N` checkpoints and exits at step N without
changing the schedule (time-sliced jobs).
`--resume` restores model, optimizer, scheduler, RNG and the position in the data, after checking the
checkpoint's manifest (`--resume latest` falls back to the previous checkpoint if the newest is damaged),
and cuts metrics.jsonl back to the checkpoint's step. A resume with settings that change the result
(llava_address.train_args.resume_mismatches: data, learning rates, schedule, total steps, optimizer, seed,
model, trainables, ...) is refused before any model loads; logging, saving and speed settings may change.
An output folder that already holds checkpoints is refused without --resume; the inputs and the checkpoint
are checked before the output folder is created or marked, and staging folders of a killed save are
removed then. Checkpoint errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clip_stage.core.config import Section
from clip_stage.core.errors import command_main
from clip_stage.core.fs import load_error_text, remove_stale_temps
from clip_stage.core.outdir import check_out_dir, on_disk, write_marker
from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal
from clip_stage.core.trackers import TrackerPlan, plan_trackers, start_trackers
from clip_stage.core.training import (
    MANIFESTED_CHECKPOINT_GLOB,
    METRICS_FILE,
    TENSORBOARD_DIR,
    Hooks,
    MetricsLogger,
    make_accelerator,
    refuse_foreign_checkpoints,
    world_size_from_env,
)
from conversations.records import RecordError
from llava_address.checkpoint import (
    STATE_DIR,
    TRAINER_STATE,
    CheckpointError,
    check_resume_trust,
    check_state_files,
    checkpoint_name,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from llava_address.checkpoint_layout import ADAPTER_CONFIG, read_checkpoint_args
from llava_address.config import DataArgs, ModelArgs, TrainablesArgs
from llava_address.convert_llava import refuse_original_llava
from llava_address.data import validate_data
from llava_address.model import check_model_paths
from llava_address.optim import fill_deepspeed_auto, make_optimizer, make_scheduler
from llava_address.train_args import TrainArgs, build_parser, resume_mismatches, to_plain
from llava_address.train_inputs import build_dataloader, build_dataset, build_model

GROUPS = [
    Section("model", ModelArgs),
    Section("trainables", TrainablesArgs),
    Section("data", DataArgs),
    Section("train", TrainArgs),
]


@dataclass(frozen=True)
class RunConfig:
    """Everything one run is made of (what every checkpoint's config.json stores)."""

    model: ModelArgs
    trainables: TrainablesArgs
    data: DataArgs
    train: TrainArgs
    recipe: str | None = None
    """path of the YAML recipe the run started from (its text is stored too)"""

    def to_json(self) -> dict[str, Any]:
        recipe_text = Path(self.recipe).read_text() if self.recipe and Path(self.recipe).is_file() else None
        return {
            "model": to_plain(self.model),
            "trainables": to_plain(self.trainables),
            "data": to_plain(self.data),
            "train": to_plain(self.train),
            "recipe": self.recipe,
            "recipe_text": recipe_text,
        }


def parse_args(argv: list[str] | None = None) -> RunConfig:
    parsed = build_parser(GROUPS, prog="address-llava train-llava", description=__doc__.split("\n\n")[0]).parse_config(argv)
    if parsed["data"].data_path is None:
        raise SystemExit("train-llava: --data-path is required (LLaVA-format conversations)")
    return RunConfig(parsed["model"], parsed["trainables"], parsed["data"], parsed["train"], parsed.config_file)


@dataclass
class TrainResult:
    """What `train` returns (rank 0 has the metrics; every rank has the model)."""

    model: torch.nn.Module
    """the unwrapped trained model"""
    processor: Any
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    """the metrics rows logged by this process (rank 0)"""
    checkpoints: list[Path] = field(default_factory=list)
    world_size: int = 1
    stopped_early: bool = False


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB



@dataclass
class LlavaRun:
    """One train-llava run as `setup` builds it; `fit` advances its position (global_step, epoch, batches_done)."""

    cfg: RunConfig
    out: Path
    accelerator: Any
    trackers: TrackerPlan
    model: torch.nn.Module
    """the prepared (wrapped) model"""
    processor: Any
    summary: Any
    """what llava_address.model.apply_trainables reported"""
    loader: Any
    optimizer: Any
    scheduler: Any
    accumulation: int
    total_steps: int
    micro_per_epoch: int
    resume_from: Path | None
    run_json: dict[str, Any]
    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """micro-batches of the current epoch already trained"""
    metrics: MetricsLogger | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def check_text_only_can_train(cfg: RunConfig, text_only: int) -> None:
    """Text-only records give no gradient when the LLM is frozen (projector alignment): refuse them up front."""
    if text_only and cfg.trainables.llm == "frozen":
        raise RecordError(f"{cfg.data.data_path}: {text_only} text-only record{'s' * (text_only != 1)}, but the LLM is frozen (only the "
                          "projector/tower train), so they would teach nothing; give this stage image records only")


def check_resume(ckpt: Path, cfg: RunConfig, accelerator, accumulation: int) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, once `ckpt` may be continued by this run: same processes x
    accumulation, same result-changing settings (llava_address.train_args.resume_mismatches: one line naming
    each with its recorded and its new value), a trusted origin under DeepSpeed, no pickled objects in state/.
    Reads JSON and the RNG files only: it runs before the output folder is claimed and before any model loads."""
    st = json.loads((ckpt / TRAINER_STATE).read_text())
    if "scheduler" not in st:
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: no scheduler state (a checkpoint of an older "
                              "version, whose scheduler was pickled): start a new run")
    if st["world_size"] != accelerator.num_processes or st["accumulation"] != accumulation:
        raise CheckpointError(
            f"{ckpt} was written with {st['world_size']} processes x {st['accumulation']} accumulation; "
            f"resuming needs the same (now {accelerator.num_processes} x {accumulation})"
        )
    try:
        saved = read_checkpoint_args(ckpt)[2]
    except FileNotFoundError as e:
        raise CheckpointError(f"{e}: its settings cannot be checked against this run's") from None
    # The length the run now asks for, on the data the checkpoint's run had (a changed data file is caught once
    # the loader is built, by its micro-batch count).
    micro = st.get("micro_batches_per_epoch")
    steps = (st["total_steps"], cfg.train.total_steps(micro, accumulation)) if micro and "total_steps" in st else None
    differ = resume_mismatches(saved, cfg.to_json(), steps)
    if differ:
        start_from = ("`address-llava merge` it and pass the merged folder as --model-name-or-path"
                      if (ckpt / ADAPTER_CONFIG).is_file() else f"--init-from {ckpt}")
        raise CheckpointError(
            f"{ckpt} was trained with other settings ({'; '.join(differ)}): the resumed run would not reach an "
            f"uninterrupted run's result; resume with the checkpoint's settings, or start a new run in a new "
            f"--output-dir (from its weights: {start_from})"
        )
    check_resume_trust(ckpt, cfg.train.output_dir, deepspeed=accelerator.state.deepspeed_plugin is not None,
                       trust=cfg.train.trust_checkpoint)
    check_state_files(ckpt / STATE_DIR)
    return st


def check_inputs(cfg: RunConfig) -> None:
    """The data, the model options and --init-from, checked before the output folder is claimed: a run
    refused for its inputs leaves no folder behind (and an existing one as it was). The data comes first:
    its error names the record, before minutes of model loading."""
    data_report = validate_data(cfg.data)
    check_text_only_can_train(cfg, data_report.text_only)
    check_model_paths(cfg.model)
    if cfg.model.model_name_or_path is not None:
        refuse_original_llava(cfg.model.model_name_or_path)
    init_from = cfg.train.init_from
    if init_from and not os.path.exists(os.path.expanduser(init_from)):
        raise FileNotFoundError(f"--init-from {init_from}: no such checkpoint folder or mm_projector.bin")


def setup(cfg: RunConfig) -> LlavaRun:
    """Output folder checks, accelerator, model, data, optimizer, schedule and the resume position of one run."""
    from accelerate.utils import set_seed

    args = cfg.train
    out = Path(args.output_dir)
    # One rule for every command's output folder (clip_stage.core.outdir), before any model loads: a run folder
    # (marker, or the files of a run from before it) is continued; anything else non-empty, or a folder holding
    # an input, is refused.
    check_out_dir(out, "train-llava", resume=True, legacy=[MANIFESTED_CHECKPOINT_GLOB, METRICS_FILE],
                  flag="--output-dir",
                  inputs=[cfg.data.data_path, cfg.data.image_root, *(on_disk(p) for p in (
                      cfg.model.model_name_or_path, cfg.model.llm, cfg.model.vision_tower, args.init_from))])
    refuse_foreign_checkpoints(out, args.resume)
    world = world_size_from_env()
    accumulation = args.accumulation_for(world)
    # The trackers' packages are checked before any model loads; they start once the resume step is known.
    trackers = plan_trackers(args.report_to, out, "train_llava", tensorboard_dir=out / TENSORBOARD_DIR)
    accelerator = make_accelerator(args.mixed_precision, gradient_accumulation_steps=accumulation,
                                   log_with=trackers.log_with, project_dir=out)
    if accelerator.num_processes != world:
        raise RuntimeError(f"launcher said {world} processes, accelerate sees {accelerator.num_processes}")
    is_main = accelerator.is_main_process
    check_inputs(cfg)
    resume_from, st = None, None
    if args.resume:
        resume_from = resolve_resume(args.resume, out, report=(lambda m: print(m, file=sys.stderr, flush=True))
                                     if is_main else None)
    if resume_from is not None:
        st = check_resume(resume_from, cfg, accelerator, accumulation)
    if is_main:
        # Everything is checked: the folder is this run's now. What a killed save left is garbage.
        remove_stale_temps(out, ("checkpoint-", METRICS_FILE))
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "train-llava")
    set_seed(args.seed)

    model, processor, summary = build_model(cfg)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads (the embeddings are frozen under LoRA).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # bitsandbytes trap: an eval-mode no-grad forward repacks 4-bit weights without a backward.
    model.train()

    dataset = build_dataset(cfg, processor, model)
    loader = build_dataloader(dataset, cfg, processor)
    optimizer = make_optimizer(model, args)
    fill_deepspeed_auto(accelerator, model, args)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    micro_per_epoch = len(loader)
    total_steps = args.total_steps(micro_per_epoch, accumulation)
    # Made after prepare, on the optimizer that really steps (DeepSpeed may swap in its own CPU Adam).
    # Not registered with accelerate (it would pickle it): its state goes into trainer_state.json.
    scheduler = make_scheduler(optimizer, args, total_steps)

    global_step, epoch, batches_done = 0, 0, 0
    if resume_from is not None:
        recorded = st.get("micro_batches_per_epoch", micro_per_epoch)
        if recorded != micro_per_epoch:
            raise CheckpointError(
                f"{resume_from} was trained on {recorded} micro-batches per epoch, the data now gives "
                f"{micro_per_epoch} (was {cfg.data.data_path} changed?): its data position means nothing here; "
                "resume on the checkpoint's data, or start a new run in a new --output-dir")
        try:
            # weights_only=True: accelerate's default today, stated so that no version can turn it off.
            accelerator.load_state(str(resume_from / STATE_DIR), load_kwargs={"weights_only": True})
        except Exception as e:  # noqa: BLE001 - one line naming the folder instead of a library traceback
            raise CheckpointError(f"{resume_from / STATE_DIR}: cannot be loaded ({load_error_text(e)})") from e
        scheduler.load_state_dict(st["scheduler"])
        global_step, epoch, batches_done = st["global_step"], st["epoch"], st["batches_done_in_epoch"]
    return LlavaRun(cfg, out, accelerator, trackers, model, processor, summary, loader, optimizer, scheduler,
                    accumulation, total_steps, micro_per_epoch, resume_from, cfg.to_json(), global_step, epoch,
                    batches_done)


def save(run: LlavaRun) -> None:
    """Writes checkpoint-<global_step>/ at the run's position and keeps `--save-total-limit` of them.
    Collective: every process calls it."""
    path = run.out / checkpoint_name(run.global_step)
    accelerator = run.accelerator
    state = {
        "global_step": run.global_step, "epoch": run.epoch, "batches_done_in_epoch": run.batches_done,
        "total_steps": run.total_steps, "world_size": accelerator.num_processes, "accumulation": run.accumulation,
        "micro_batches_per_epoch": run.micro_per_epoch, "scheduler": _jsonable(run.scheduler.state_dict()),
    }
    extra = {k: v for k, v in run.run_json.items() if k not in ("model", "trainables")}
    save_checkpoint(path, accelerator=accelerator, model=run.model, processor=run.processor,
                    model_args=run.cfg.model, trainables=run.cfg.trainables,
                    config={**extra, "trainables_summary": _jsonable(run.summary)}, trainer_state=state)
    run.checkpoints.append(path)
    if run.is_main:
        prune_checkpoints(run.out, run.cfg.train.save_total_limit)
        run.metrics.plot()


def log_step(run: LlavaRun, window: torch.Tensor, elapsed: float, step_lrs: dict[str, float]) -> dict[str, Any]:
    """Reduces the log window over the ranks (collective) and writes one metrics row; returns it."""
    stats = run.accelerator.reduce(window.clone(), reduction="sum").tolist()
    row = {
        "step": run.global_step,
        "epoch": run.epoch + run.batches_done / run.micro_per_epoch,
        "loss": float(stats[0] / max(stats[1], 1)),
        "tokens": int(stats[2]),
        "elapsed_s": elapsed,
        "tokens_per_s": float(stats[2] / max(elapsed, 1e-9)),
        "memory_mb": peak_memory_mb(run.accelerator.device),
    }
    row.update(step_lrs)
    run.metrics.log(row)
    return row


def _start_logging(run: LlavaRun) -> None:
    accelerator = run.accelerator
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        accelerator.print(
            f"train-llava: {accelerator.num_processes} process(es), {accelerator.distributed_type}, "
            f"accumulation {run.accumulation}, {run.total_steps} optimizer steps, trackers: {run.trackers.describe()}, "
            f"trainables: {run.summary}"
        )
    # The log holds this run's steps only: none after the checkpoint (or a killed run's before any).
    run.metrics = MetricsLogger(run.out, accelerator, run.global_step)
    start_trackers(accelerator, run.trackers, config={s: run.run_json[s] for s in ("model", "trainables", "data", "train")},
                   resume_step=run.global_step if run.resume_from is not None else None)


def fit(run: LlavaRun, hooks: Hooks | None = None) -> TrainResult:
    """The training loop from the run's position to the end (or `--stop-at-step`)."""
    hooks = hooks or Hooks()
    args, accelerator, model, optimizer = run.cfg.train, run.accelerator, run.model, run.optimizer
    total_steps = run.total_steps
    _start_logging(run)
    bar = tqdm(total=total_steps, initial=run.global_step, desc="train-llava",
               disable=not (run.is_main and args.progress_bar))
    # [loss sum, micro-batches, tokens] of the current log window, kept on the device (no sync per micro-step).
    window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    t_window = time.perf_counter()
    stopped_early = False
    resumed_at = run.global_step if run.resume_from is not None else None

    model.train()
    hooks.fit_start()
    done = run.global_step >= total_steps
    while not done:
        loader = run.loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(run.epoch)
        it = accelerator.skip_first_batches(loader, run.batches_done) if run.batches_done else loader
        for batch in it:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            run.batches_done += 1
            n_tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
            window += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=window.device),
                                   torch.as_tensor(n_tokens, dtype=torch.float64, device=window.device)])
            if not accelerator.sync_gradients:
                continue
            # The learning rates this step used (logged below), before the schedule moves on.
            step_lrs = {f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            run.scheduler.step()
            run.global_step += 1
            bar.update(1)
            hooks.step_end(run.global_step)
            if run.global_step % args.log_every == 0 or run.global_step == total_steps:
                row = log_step(run, window, time.perf_counter() - t_window, step_lrs)
                if run.is_main:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{next(iter(step_lrs.values())):.2e}")
                window.zero_()
                t_window = time.perf_counter()
            if args.stop_at_step is not None and run.global_step >= args.stop_at_step and run.global_step < total_steps:
                save(run)  # a time-sliced job ends on a checkpoint
                stopped_early = True
                done = True
                break
            if run.global_step >= total_steps:
                done = True
                break
            if args.save_every and run.global_step % args.save_every == 0:
                save(run)
                t_window = time.perf_counter()  # tokens/s measures training, not saving
        if done:
            break
        run.epoch += 1
        run.batches_done = 0
    bar.close()
    already = (run.checkpoints and run.checkpoints[-1].name == checkpoint_name(run.global_step)) or \
        resumed_at == run.global_step
    if not stopped_early and run.global_step > 0 and not already:
        save(run)
    accelerator.end_training()
    return TrainResult(
        model=accelerator.unwrap_model(model), processor=run.processor, global_step=run.global_step,
        history=run.metrics.history, checkpoints=run.checkpoints, world_size=accelerator.num_processes,
        stopped_early=stopped_early,
    )


def train(cfg: RunConfig, hooks: Hooks | None = None) -> TrainResult:
    """Sets up and runs (or resumes) one training run; `hooks` observe the loop (clip_stage.core.training.Hooks)."""
    return fit(setup(cfg), hooks)


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return _jsonable(dataclasses.asdict(obj))
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return str(obj)


def with_absolute_model_paths(cfg: RunConfig) -> RunConfig:
    """Local model folders as absolute paths: checkpoints store them, and `chat --adapter` / `merge` read
    them from wherever they are run (a relative path would then be tried as a hub id)."""
    fields = {f: os.path.abspath(os.path.expanduser(v)) for f in ("model_name_or_path", "llm", "vision_tower")
              if (v := getattr(cfg.model, f)) and os.path.exists(os.path.expanduser(v))}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields)) if fields else cfg


@command_main("train-llava")
def main(argv: list[str] | None = None) -> int:
    cfg = with_absolute_model_paths(parse_args(argv))
    try:
        result = train(cfg)
    except CheckpointError as e:
        print(f"train-llava: {e}", file=sys.stderr)
        return 2
    if result.model is not None and int(os.environ.get("RANK", "0")) == 0:
        last = result.checkpoints[-1] if result.checkpoints else None
        print(json.dumps({"global_step": result.global_step, "world_size": result.world_size,
                          "last_checkpoint": str(last) if last else None,
                          "stopped_early": result.stopped_early}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
