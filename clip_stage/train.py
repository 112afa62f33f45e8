"""Fine-tune an open_clip model with the AddressCLIP losses (command `address-llava train-clip`).

    python -m clip_stage.train --dataset DATA --model addressclip-small --pretrained none --output-dir runs/x
    accelerate launch -m clip_stage.train --dataset DATA ...          # multi-GPU data parallel
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m clip_stage.train ...   # 2 CPU ranks

One step: encode the per-rank images once and the address texts (and "caption + address" texts) in the
same forward, gather features across ranks (clip_stage.losses), back-propagate a*L_addr + b*L_sem + c*L_geo,
AdamW step under a warm-up + cosine schedule (clip_stage.schedule). Mixed precision and DDP come from accelerate.

The run is `setup` (model, data, optimizer, resume position), `fit` (the loop), `save` and `log_step`; the
skeleton, the flag names and the run-folder layout are train-llava's (clip_stage.core.training):
checkpoint-NNNNNN/ (atomic; see clip_stage.model), final/, tensorboard/, metrics.jsonl, run_summary.json
(world size, steps, losses, throughput). `--report-to tensorboard,wandb,mlflow | none` picks the trackers
(clip_stage.core.trackers; wandb/ and mlruns/ are written offline under --output-dir unless WANDB_MODE /
MLFLOW_TRACKING_URI say otherwise). `--resume latest` continues from the newest intact checkpoint (or
`--resume PATH` from that one); data order and augmentation are functions of (seed, epoch, row), so the
resumed run reproduces the uninterrupted one. Every checkpoint carries a manifest (size + sha256 per file)
checked before resuming: a damaged newest checkpoint is reported and the previous one is used.
metrics.jsonl is cut back to the checkpoint's step, and what killed saves left (`.checkpoint-*.tmp`, ...) is
removed at the start. A resume with settings that change the result (`resume_mismatches`: dataset, split,
address style, loss weights, schedule, epochs, seed, ...) is refused; only the output folder, logging,
checkpointing, workers, threads, gradient checkpointing and the per-device batch (same global batch) may
change. Only this project's own checkpoint folders are listed, resumed or pruned (clip_stage.core.training).
Errors (options, inputs, checkpoints) are one line, `train-clip: error: ...`, exit code 2, before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_stage.core.curves import read_metric_rows
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, load_error_text, remove_stale_temps
from clip_stage.core.outdir import check_out_dir, on_disk, write_marker
from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal
from clip_stage.core.schema import ADDRESS_STYLES, SPLITS, check_record_images, read_records
from clip_stage.core.trackers import TrackerPlan, finish_trackers, plan_trackers, start_trackers
from clip_stage.core.training import (
    MANIFESTED_CHECKPOINT_GLOB,
    METRICS_FILE,
    TENSORBOARD_DIR,
    CheckpointError,
    Hooks,
    MetricsLogger,
    checkpoint_name,
    make_accelerator,
    prune_checkpoints,
    refuse_foreign_checkpoints,
    resolve_resume,
)
from clip_stage.losses import AddressClipLoss, logit_scale_clamp_
from clip_stage.model import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    ClipBundle,
    create_clip,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from clip_stage.schedule import (
    LossPlan,
    check_batch_size,
    cosine_lr,
    epoch_batches,
    plan_losses,
    steps_per_epoch,
    total_steps,
)
from clip_stage.text_encoder import ContrastiveForward, padding_trim
from clip_stage.train_config import DEFAULT_GEO_WEIGHT, TrainConfig, parse_config
from clip_stage.train_data import AddressImageDataset, Collate, drop_fold

log = logging.getLogger("clip_stage.train")
# A run folder train-clip wrote before output markers existed: all of these (a manifested step checkpoint, not
# any `checkpoint-*`, which HF Trainer folders have too).
LEGACY_RUN_FILES = [MANIFESTED_CHECKPOINT_GLOB, METRICS_FILE, "run_summary.json"]


class TrainClipError(ValueError):
    """A train-clip option that cannot work here (unknown split or address style, fp16 without CUDA)."""


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise TrainClipError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    return precision


def check_options(cfg: TrainConfig) -> None:
    """The options the config's own checks cannot see (registries, the machine), before anything loads."""
    if cfg.data.split not in SPLITS:
        raise TrainClipError(f"--split {cfg.data.split!r}: unknown split; valid: {', '.join(SPLITS)}")
    if cfg.data.address_style not in ADDRESS_STYLES:
        raise TrainClipError(f"--address-style {cfg.data.address_style!r}: unknown address style; valid: "
                             f"{', '.join(sorted(ADDRESS_STYLES))}")
    _mixed_precision(cfg.model.mixed_precision)


# Settings a resumed run may change: where and how it reports and saves, and how fast it runs. Everything else
# of model/data/loss/optim changes the result (the per-device batch is checked as the global batch instead).
RESUME_NEUTRAL = {("model", "gradient_checkpointing"), ("data", "num_workers"), ("optim", "per_device_batch_size")}
RESUME_GROUPS = ("model", "data", "loss", "optim")
PATH_FIELDS = {("data", "dataset"), ("model", "pretrained")}


def _same_path(a, b) -> bool:
    return os.path.realpath(os.path.expanduser(str(a))) == os.path.realpath(os.path.expanduser(str(b)))


def resume_mismatches(saved: dict, cfg: TrainConfig) -> list[str]:
    """'group.field: was X, now Y' for every result-changing setting in which `cfg` differs from a checkpoint's
    recorded train_config (fields it does not record, from older versions, are not compared)."""
    wanted = cfg.to_dict()
    out = []
    for group in RESUME_GROUPS:
        for name, now in wanted[group].items():
            if (group, name) in RESUME_NEUTRAL or name not in (saved.get(group) or {}):
                continue
            was = saved[group][name]
            if isinstance(was, list):
                was = tuple(was)  # JSON has no tuples
            if (group, name) in PATH_FIELDS and was and now and _same_path(was, now):
                continue  # the same folder spelled another way
            if was != now:
                out.append(f"{group}.{name}: was {was!r}, now {now!r}")
    return out


def check_resume_config(ckpt: Path, cfg: TrainConfig) -> None:
    """Refuses to continue `ckpt` with settings that would make the result differ from an uninterrupted run."""
    saved = json.loads((ckpt / CONFIG_FILE).read_text(encoding="utf-8")).get("train_config") or {}
    differ = resume_mismatches(saved, cfg)
    if differ:
        raise CheckpointError(f"{ckpt} was trained with other settings ({'; '.join(differ)}): the resumed run would not "
                              "reach an uninterrupted run's result; resume with its settings, or use another --output-dir")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no decay on gains, biases, embeddings' scalars and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _warn_truncation(tokenizer, dataset: AddressImageDataset, semantic: bool) -> None:
    """Warns when texts fill the text tower's context: they are cut at the end (for "caption + address", the address)."""
    kinds = [("address", dataset.addresses)] + ([("caption + address", dataset.semantic)] if semantic else [])
    pad = tokenizer([""])[0, -1]
    for kind, texts in kinds:
        unique = sorted(set(texts))
        full = int((tokenizer(unique)[:, -1] != pad).sum())
        if full:
            warnings.warn(
                f"{full} of {len(unique)} distinct {kind} texts reach the model's context length "
                f"({tokenizer(unique[:1]).shape[1]} tokens) and are truncated at the end",
                stacklevel=2,
            )


def _resumable(ckpt: Path) -> bool:
    return (ckpt / CONFIG_FILE).exists() and (ckpt / WEIGHTS_FILE).exists()


def resume_checkpoint(resume: str, run_dir: Path, report: bool = True) -> Path | None:
    """The checkpoint `--resume PATH|latest` names, checked against its manifest; for 'latest' a damaged one is
    reported (`report`) and the previous one tried. None when there is no checkpoint; CheckpointError when
    none is intact."""
    return resolve_resume(resume, run_dir, verify=lambda p: verify_checkpoint(p, required=True), resumable=_resumable,
                          command="train-clip",
                          report=(lambda m: print(m, file=sys.stderr, flush=True)) if report else None)


def _load_training_state(ckpt: Path) -> dict:
    import pickle

    try:
        # weights_only refuses anything but tensors and primitives: nothing in the file runs.
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: not a plain training-state file ({load_error_text(e)})") from None



@dataclass
class ClipRun:
    """One train-clip run as `setup` builds it; `fit` advances its position (step, epoch, batch_in_epoch)."""

    cfg: TrainConfig
    out_dir: Path
    accelerator: Any
    trackers: TrackerPlan
    bundle: ClipBundle
    dataset: AddressImageDataset
    collate: Collate
    plan: LossPlan
    optimizer: Any
    forward: Any
    loss_fn: AddressClipLoss
    per_epoch: int
    total: int
    warmup: int
    resume_from: Path | None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    metrics: MetricsLogger | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The bare open_clip model (what checkpoints hold); `forward` is its DDP-wrapped step."""
        return self.bundle.model

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: TrainConfig) -> ClipRun | dict:
    """Model, data, loss plan, optimizer and the resume position of one run; the finished run's summary (a
    dict) instead when `--resume` finds the run already complete."""
    check_options(cfg)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    out_dir = Path(cfg.run.output_dir)
    # One rule for every command's output folder (clip_stage.core.outdir): a run folder (marker, or the files of runs
    # from before it) is continued, anything else non-empty is refused, as is a folder holding an input.
    check_out_dir(out_dir, "train-clip", inputs=[cfg.data.dataset, on_disk(cfg.model.pretrained)], resume=True,
                  legacy=LEGACY_RUN_FILES, flag="--output-dir")
    # The trackers' packages are checked before any data or model is loaded; they start once the step is known.
    trackers = plan_trackers(cfg.run.report_to, out_dir, "train_clip", tensorboard_dir=out_dir / TENSORBOARD_DIR)
    accelerator = make_accelerator(_mixed_precision(cfg.model.mixed_precision), log_with=trackers.log_with,
                                   project_dir=out_dir)
    world, main_proc = accelerator.num_processes, accelerator.is_main_process

    # --- data and loss plan ---
    df = drop_fold(read_records(cfg.data.dataset, cfg.data.split), cfg.data.holdout_fold)
    check_record_images(cfg.data.dataset, df)
    with warnings.catch_warnings():
        if not main_proc:
            warnings.simplefilter("ignore")
        plan = plan_losses(df, cfg.loss.address_weight, cfg.loss.semantic_weight, cfg.loss.geo_weight,
                           DEFAULT_GEO_WEIGHT, where=f"{cfg.data.dataset} [{cfg.data.split}]")
    batch = cfg.optim.per_device_batch_size
    check_batch_size(len(df), batch, world, cfg.data.dataset)

    # --- model (same seed on every rank; DDP also broadcasts rank 0's weights) ---
    if main_proc:
        # Before anything of this run is saved: staging folders of a killed save are garbage.
        remove_stale_temps(out_dir, ("checkpoint-", "final", "run_summary.json", METRICS_FILE))
    resume_from = resume_checkpoint(cfg.run.resume, out_dir, report=main_proc) if cfg.run.resume else None
    refuse_foreign_checkpoints(out_dir, cfg.run.resume)
    if resume_from is not None:
        check_resume_config(resume_from, cfg)
    torch.manual_seed(cfg.optim.seed)
    if resume_from is not None:
        bundle = load_checkpoint(resume_from, device="cpu", model_name=cfg.model.model)
        bundle.pretrained = cfg.model.pretrained
    else:
        bundle = create_clip(cfg.model.model, cfg.model.pretrained, device="cpu")
    model = bundle.model
    if cfg.model.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()

    transform = bundle.preprocess_train if cfg.data.augment else bundle.preprocess_val
    dataset = AddressImageDataset(cfg.data.dataset, cfg.data.split, transform, cfg.data.address_style,
                                  cfg.data.semantic_template, seed=cfg.optim.seed, df=df)
    # Texts are cut after their batch's last EOT (exact for causal towers; see clip_stage.text_encoder).
    collate = Collate(bundle.tokenizer, with_semantic=plan.semantic_weight > 0, trim=padding_trim(model))
    if main_proc:
        _warn_truncation(bundle.tokenizer, dataset, plan.semantic_weight > 0)
    per_epoch = steps_per_epoch(len(dataset), batch, world)
    total = total_steps(len(dataset), batch, world, cfg.optim.num_epochs, cfg.optim.max_steps)
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(round(0.02 * total))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.learning_rate,
                                  betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_epsilon)
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        state = _load_training_state(Path(resume_from))
        if state["global_batch"] != batch * world:
            raise CheckpointError(
                f"{resume_from} was trained with a global batch of {state['global_batch']}, now "
                f"{batch} x {world}: resume with the same batch size x processes"
            )
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        torch.set_rng_state(state["rng_torch"])
        if batch_in_epoch >= per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    if resume_from is not None and step >= total and (out_dir / "final").exists():
        # nothing left to do: keep the finished run's summary (pipelines may call --resume repeatedly)
        if main_proc:
            print(f"train-clip: {out_dir} is already complete ({step} steps); final model in {out_dir / 'final'}")
        summary_path = out_dir / "run_summary.json"
        return json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {"steps": step, "complete": True}
    # One module call per step for the DDP wrapper; `model` stays the bare open_clip model (checkpoints).
    forward, optimizer = accelerator.prepare(ContrastiveForward(model), optimizer)
    loss_fn = AddressClipLoss(plan.address_weight, plan.semantic_weight, plan.geo_weight, cfg.loss.geo_target,
                              cfg.loss.geo_tau, rank=accelerator.process_index, world_size=world,
                              gather_with_grad=cfg.loss.gather_with_grad)
    return ClipRun(cfg, out_dir, accelerator, trackers, bundle, dataset, collate, plan, optimizer, forward, loss_fn,
                   per_epoch, total, warmup, resume_from, step, epoch, batch_in_epoch)


def save(run: ClipRun, final: bool = False) -> None:
    """Writes checkpoint-<step>/ (and final/ at the end) from rank 0, keeps `--save-total-limit` of them.
    Every rank calls it (they wait for the write)."""
    cfg = run.cfg
    if run.is_main:
        state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": {"step": run.step, "total": run.total, "warmup": run.warmup},
            "step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
            "global_batch": cfg.optim.per_device_batch_size * run.world, "world_size": run.world,
            "rng_torch": torch.get_rng_state(),
        }
        save_checkpoint(run.out_dir / checkpoint_name(run.step), run.model, run.bundle.model_name,
                        run.bundle.pretrained, cfg.to_dict(), state, step=run.step, epoch=run.epoch)
        prune_checkpoints(run.out_dir, cfg.run.save_total_limit, complete=_resumable)
        run.metrics.plot()
        if final:
            save_checkpoint(run.out_dir / "final", run.model, run.bundle.model_name, run.bundle.pretrained,
                            cfg.to_dict(), None, step=run.step, epoch=run.epoch)
    run.accelerator.wait_for_everyone()


def log_step(run: ClipRun, lr: float, terms: dict[str, float], images_per_s: float) -> None:
    """One metrics.jsonl row and the trackers' points of the current step (rank 0)."""
    run.metrics.log({"step": run.step, "epoch": run.epoch, "lr": lr, "images_per_s": images_per_s, **terms},
                    tracker_values={**{f"train/{k}": v for k, v in terms.items()}, "train/lr": lr,
                                    "train/images_per_s": images_per_s,
                                    "train/logit_scale": float(run.model.logit_scale.detach().exp())})


def _start_logging(run: ClipRun) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run.out_dir, "train-clip")
    start_trackers(accelerator, run.trackers, config=cfg.to_dict(), resume_step=run.step if run.resume_from else None)
    # The log holds this run's steps only: none after the checkpoint (or a killed run's before any).
    run.metrics = MetricsLogger(run.out_dir, accelerator, run.step)
    if run.is_main:
        plan = run.plan
        print(f"train-clip: {cfg.model.model} on {len(run.dataset)} images, {run.world} process(es) x batch "
              f"{cfg.optim.per_device_batch_size}, {run.total} steps ({run.per_epoch}/epoch), warm-up {run.warmup}, "
              f"weights a={plan.address_weight} b={plan.semantic_weight} c={plan.geo_weight}, "
              f"precision {accelerator.mixed_precision}, trackers: {run.trackers.describe()}"
              + (f", resumed from {run.resume_from}" if run.resume_from else ""),
              flush=True)


def fit(run: ClipRun, hooks: Hooks | None = None) -> dict:
    """The training loop from the run's position to the end (or `--stop-at-step`); returns the run summary."""
    hooks = hooks or Hooks()
    cfg, accelerator, model, plan = run.cfg, run.accelerator, run.model, run.plan
    rank, world, main_proc = accelerator.process_index, run.world, run.is_main
    batch_size, total = cfg.optim.per_device_batch_size, run.total
    _start_logging(run)
    bar = tqdm(total=total, initial=run.step, disable=not (main_proc and cfg.run.progress_bar), desc="train-clip",
               dynamic_ncols=True)

    last_terms: dict[str, float] = {}
    window_images, window_t0 = 0, time.perf_counter()
    t_start = time.perf_counter()
    images_seen = 0
    stopped = False
    last_saved = run.step if run.resume_from is not None else -1
    hooks.fit_start()
    while run.step < total and not stopped:
        run.dataset.set_epoch(run.epoch)
        batches = epoch_batches(len(run.dataset), batch_size, world, rank, cfg.optim.seed, run.epoch, run.batch_in_epoch)
        loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=batches, collate_fn=run.collate,
                                             num_workers=cfg.data.num_workers)
        for batch in loader:
            lr = cosine_lr(run.step, total, cfg.optim.learning_rate, cfg.optim.min_lr, run.warmup)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            images = batch["image"].to(accelerator.device)
            b = images.shape[0]
            semantic = batch["semantic_tokens"].to(accelerator.device) if plan.semantic_weight > 0 else None
            out = run.forward(images, batch["address_tokens"].to(accelerator.device), semantic)
            terms = run.loss_fn(out["image_features"].float(), out["address_features"].float(),
                                out["logit_scale"].float(),
                                semantic_features=out["semantic_features"].float() if semantic is not None else None,
                                coords=batch["coords"].to(accelerator.device) if plan.geo_weight > 0 else None)
            accelerator.backward(terms["loss"])
            if cfg.optim.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            logit_scale_clamp_(model)
            run.step += 1
            run.batch_in_epoch += 1
            n_img = b * world
            images_seen += n_img
            window_images += n_img
            last_terms = {k: float(v.detach()) for k, v in terms.items()}
            bar.update(1)
            hooks.step_end(run.step)
            if main_proc and (run.step % cfg.run.log_every == 0 or run.step == total):
                dt = max(time.perf_counter() - window_t0, 1e-9)
                ips = window_images / dt
                window_images, window_t0 = 0, time.perf_counter()
                log_step(run, lr, last_terms, ips)
                bar.set_postfix(loss=f"{last_terms['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            if run.step % cfg.run.save_every == 0 and run.step < total:
                save(run)
                last_saved = run.step
                window_images, window_t0 = 0, time.perf_counter()  # keep checkpoint I/O out of throughput
            if cfg.run.stop_at_step is not None and run.step >= cfg.run.stop_at_step and run.step < total:
                stopped = True
                break
            if run.step >= total:
                break
        if not stopped and run.batch_in_epoch >= run.per_epoch:
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    bar.close()
    wall = time.perf_counter() - t_start
    if not last_terms and main_proc and run.metrics.history == [] and run.step > 0:
        # Resumed with nothing left to train (killed while saving the last step): the last losses are the logged ones.
        logged = read_metric_rows(run.out_dir)[0]
        last_terms = {k: v for k, v in (logged[-1] if logged else {}).items() if k.endswith("loss")}

    if stopped:
        if last_saved != run.step:
            save(run)
    elif last_saved != run.step or not (run.out_dir / "final").exists():
        save(run, final=True)
    step, out_dir = run.step, run.out_dir
    summary = {
        "model": run.bundle.model_name,
        "world_size": world,
        "rank0_pid": os.getpid(),
        "mixed_precision": str(accelerator.mixed_precision),
        "steps": step,
        "total_steps": total,
        "epochs_completed": run.epoch,
        "complete": step >= total,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "loss_weights": {"address": plan.address_weight, "semantic": plan.semantic_weight, "geo": plan.geo_weight},
        "notes": list(plan.notes),
        "last_losses": last_terms,
        "images_per_s": images_seen / wall if wall > 0 and images_seen else None,
        "wall_s": wall,
        "final": str(out_dir / "final") if step >= total else None,
        "config": cfg.to_dict(),
    }
    finish_trackers(accelerator)  # flushes TensorBoard, ends the wandb / MLflow runs
    if main_proc:
        atomic_write_json(out_dir / "run_summary.json", summary)
        if step >= total:
            print(f"train-clip: done, {step} steps in {wall:.1f}s; final model in {out_dir / 'final'}", flush=True)
        else:
            print(f"train-clip: stopped at step {step}/{total}; continue with --resume latest", flush=True)
    accelerator.wait_for_everyone()
    return summary


def train(cfg: TrainConfig, hooks: Hooks | None = None) -> dict:
    """Runs (or resumes) one training run; returns the run summary (also written to run_summary.json)."""
    run = setup(cfg)
    if isinstance(run, dict):  # already complete
        return run
    return fit(run, hooks)


@command_main("train-clip")
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, prog="address-llava train-clip", description=__doc__.split("\n\n")[0])
    train(cfg)  # user errors (CheckpointError, TrainClipError, ...) are printed by the guard: one line, exit 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
