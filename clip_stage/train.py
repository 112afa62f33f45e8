"""Fine-tune an open_clip model with the AddressCLIP losses (command `address-llava train-clip`).

    python -m clip_stage.train --dataset DATA --model addressclip-small --pretrained none --output-dir runs/x
    accelerate launch -m clip_stage.train --dataset DATA ...          # multi-GPU data parallel
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m clip_stage.train ...   # 2 CPU ranks

One step: encode the per-rank images once and the address texts (and "caption + address" texts) in the
same forward, gather features across ranks (clip_stage.losses), back-propagate a*L_addr + b*L_sem + c*L_geo,
AdamW step under a warm-up + cosine schedule. Mixed precision and DDP come from accelerate.

Outputs under --output-dir: checkpoints/step-NNNNNN/ (atomic; see clip_stage.model), checkpoints/latest,
final/, tensorboard/, train_log.jsonl, run_summary.json (world size, steps, losses, throughput).
`--report-to tensorboard,wandb,mlflow | none` picks the trackers (clip_stage.core.trackers; wandb/ and mlruns/
are written offline under --output-dir unless WANDB_MODE / MLFLOW_TRACKING_URI say otherwise).
`--resume` continues from the newest complete checkpoint; data order and augmentation are functions of
(seed, epoch, row), so the resumed run reproduces the uninterrupted one. Every checkpoint carries a
manifest (size + sha256 per file) checked before resuming: a damaged newest checkpoint is reported and the
previous one is used. train_log.jsonl is cut back to the checkpoint's step, and what killed saves left
(`.step-*.tmp`, ...) is removed at the start. Errors about checkpoints are one line, exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from clip_stage.train_config import DEFAULT_GEO_WEIGHT, TrainConfig, parse_config
from clip_stage.train_data import (
    AddressImageDataset,
    Collate,
    check_batch_size,
    cosine_lr,
    drop_fold,
    epoch_batches,
    plan_losses,
    steps_per_epoch,
    total_steps,
)
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, cut_jsonl_log, load_error_text, remove_stale_temps
from clip_stage.losses import AddressClipLoss, logit_scale_clamp_
from clip_stage.model import (
    STATE_FILE,
    CheckpointError,
    create_clip,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
    save_checkpoint,
    step_checkpoints,
    step_dir_name,
    verify_checkpoint,
)
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.core.schema import read_records
from clip_stage.text_encoder import ContrastiveForward, padding_trim
from clip_stage.core.trackers import finish_trackers, plan_trackers, start_trackers

log = logging.getLogger("clip_stage.train")


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return {"fp32": "no"}.get(precision, precision)


def make_accelerator(precision: str, log_with=None):
    """An Accelerator for one run (gloo when launched without a GPU); `log_with` from clip_stage.core.trackers."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without a GPU, multi-process runs must use gloo (accelerate picks no working backend on CPU otherwise);
    # a single process must get no backend,
    # or accelerate believes it is distributed.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        # accelerate keeps process-wide singletons; a second in-process run (tests, notebooks) with another
        # precision would be refused. A single process has no process group to lose, so start afresh.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    return Accelerator(mixed_precision=_mixed_precision(precision), kwargs_handlers=handlers, log_with=log_with)


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


def resume_checkpoint(ck_dir: Path, report: bool = True) -> Path | None:
    """The newest step checkpoint that passes its manifest check; a damaged one is reported (`report`) and
    the previous one tried. None when there is no checkpoint; CheckpointError when none is intact."""
    candidates = step_checkpoints(ck_dir)[::-1]
    for i, ckpt in enumerate(candidates):
        try:
            verify_checkpoint(ckpt, required=True)
            return ckpt
        except CheckpointError as e:
            if report:
                then = (f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates)
                        else "no earlier checkpoint")
                print(f"train-clip: {e}; {then}", file=sys.stderr, flush=True)
    if candidates:
        raise CheckpointError(f"{ck_dir}: no intact checkpoint to resume from (all {len(candidates)} failed their "
                              "manifest check, see above)")
    return None


def _load_training_state(ckpt: Path) -> dict:
    import pickle

    try:
        # weights_only refuses anything but tensors and primitives: nothing in the file runs.
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: not a plain training-state file ({load_error_text(e)})") from None


def _path_or_none(spec: str | None) -> str | None:
    """spec when it names an existing file or folder (a weights file or checkpoint), else None (a hub tag)."""
    return spec if spec and os.path.exists(spec) else None


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) one training run; returns the run summary (also written to run_summary.json)."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    out_dir = Path(cfg.run.output_dir)
    ck_dir = out_dir / "checkpoints"
    # One rule for every command's output folder (clip_stage.core.outdir): a run folder (marker, or the files of runs
    # from before it) is continued, anything else non-empty is refused, as is a folder holding an input.
    check_out_dir(out_dir, "train-clip", inputs=[cfg.data.dataset, _path_or_none(cfg.model.pretrained)], resume=True,
                  legacy=["checkpoints", "train_log.jsonl", "run_summary.json"], flag="--output-dir")
    # The trackers' packages are checked before any data or model is loaded; they start once the step is known.
    trackers = plan_trackers(cfg.run.report_to, out_dir, "train_clip", tensorboard_dir=out_dir / "tensorboard")
    accelerator = make_accelerator(cfg.model.precision, log_with=trackers.log_with)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process

    # --- data and loss plan ---
    df = drop_fold(read_records(cfg.data.dataset, cfg.data.split), cfg.data.holdout_fold)
    with warnings.catch_warnings():
        if not main_proc:
            warnings.simplefilter("ignore")
        plan = plan_losses(df, cfg.loss.address_weight, cfg.loss.semantic_weight, cfg.loss.geo_weight,
                           DEFAULT_GEO_WEIGHT, where=f"{cfg.data.dataset} [{cfg.data.split}]")
    check_batch_size(len(df), cfg.optim.batch_size, world, cfg.data.dataset)

    # --- model (same seed on every rank; DDP also broadcasts rank 0's weights) ---
    if main_proc:
        # Before anything of this run is saved: staging folders of a killed save are garbage.
        remove_stale_temps(ck_dir, ("step-", "latest"))
        remove_stale_temps(out_dir, ("final", "run_summary.json", "train_log.jsonl"))
    resume_from = resume_checkpoint(ck_dir, report=main_proc) if cfg.run.resume else None
    if not cfg.run.resume and latest_checkpoint(ck_dir) is not None:
        raise CheckpointError(f"{out_dir} already holds checkpoints: pass --resume to continue, or another --output-dir")
    torch.manual_seed(cfg.optim.seed)
    if resume_from is not None:
        bundle = load_checkpoint(resume_from, device="cpu", model_name=cfg.model.model)
        bundle.pretrained = cfg.model.pretrained
    else:
        bundle = create_clip(cfg.model.model, cfg.model.pretrained, device="cpu")
    model = bundle.model
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()

    transform = bundle.preprocess_train if cfg.data.augment else bundle.preprocess_val
    dataset = AddressImageDataset(cfg.data.dataset, cfg.data.split, transform, cfg.data.address_style,
                                  cfg.data.semantic_template, seed=cfg.optim.seed, df=df)
    # Texts are cut after their batch's last EOT (exact for causal towers; see clip_stage.text_encoder).
    collate = Collate(bundle.tokenizer, with_semantic=plan.semantic_weight > 0, trim=padding_trim(model))
    if main_proc:
        _warn_truncation(bundle.tokenizer, dataset, plan.semantic_weight > 0)
    per_epoch = steps_per_epoch(len(dataset), cfg.optim.batch_size, world)
    total = total_steps(len(dataset), cfg.optim.batch_size, world, cfg.optim.epochs, cfg.optim.max_steps)
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(round(0.02 * total))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        state = _load_training_state(Path(resume_from))
        if state["global_batch"] != cfg.optim.batch_size * world:
            raise CheckpointError(
                f"{resume_from} was trained with a global batch of {state['global_batch']}, now "
                f"{cfg.optim.batch_size} x {world}: resume with the same batch size x processes"
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
                              cfg.loss.geo_tau, rank=rank, world_size=world, gather_with_grad=cfg.loss.gather_with_grad)

    log_file = None
    if main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_marker(out_dir, "train-clip")
    start_trackers(accelerator, trackers, config=cfg.to_dict(), resume_step=step if resume_from else None)
    if main_proc:
        # The log holds this run's steps only: none after the checkpoint (or a killed run's before any).
        cut_jsonl_log(out_dir / "train_log.jsonl", step)
        log_file = open(out_dir / "train_log.jsonl", "a", encoding="utf-8")
        print(f"train-clip: {cfg.model.model} on {len(dataset)} images, {world} process(es) x batch "
              f"{cfg.optim.batch_size}, {total} steps ({per_epoch}/epoch), warm-up {warmup}, "
              f"weights a={plan.address_weight} b={plan.semantic_weight} c={plan.geo_weight}, "
              f"precision {accelerator.mixed_precision}, trackers: {trackers.describe()}"
              + (f", resumed from {resume_from}" if resume_from else ""),
              flush=True)

    from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal

    bar = tqdm(total=total, initial=step, disable=not (main_proc and cfg.run.progress), desc="train-clip",
               dynamic_ncols=True)

    def save(final: bool = False) -> None:
        if main_proc:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": {"step": step, "total": total, "warmup": warmup},
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "global_batch": cfg.optim.batch_size * world, "world_size": world,
                "rng_torch": torch.get_rng_state(),
            }
            d = save_checkpoint(ck_dir / step_dir_name(step), model, bundle.model_name, bundle.pretrained,
                                cfg.to_dict(), state, step=step, epoch=epoch)
            mark_latest(ck_dir, d)
            old = sorted(p for p in ck_dir.glob("step-*") if p.is_dir() and p.name != d.name)
            for p in old[: max(0, len(old) - (cfg.run.keep_checkpoints - 1))]:
                shutil.rmtree(p, ignore_errors=True)
            if final:
                save_checkpoint(out_dir / "final", model, bundle.model_name, bundle.pretrained, cfg.to_dict(),
                                None, step=step, epoch=epoch)
        accelerator.wait_for_everyone()

    last_terms: dict[str, float] = {}
    window_images, window_t0 = 0, time.perf_counter()
    t_start = time.perf_counter()
    images_seen = 0
    stopped = False
    last_saved = step if resume_from is not None else -1
    while step < total and not stopped:
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), cfg.optim.batch_size, world, rank, cfg.optim.seed, epoch, batch_in_epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=cfg.data.num_workers)
        for batch in loader:
            lr = cosine_lr(step, total, cfg.optim.lr, cfg.optim.min_lr, warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images = batch["image"].to(accelerator.device)
            b = images.shape[0]
            semantic = batch["semantic_tokens"].to(accelerator.device) if plan.semantic_weight > 0 else None
            out = forward(images, batch["address_tokens"].to(accelerator.device), semantic)
            terms = loss_fn(out["image_features"].float(), out["address_features"].float(), out["logit_scale"].float(),
                            semantic_features=out["semantic_features"].float() if semantic is not None else None,
                            coords=batch["coords"].to(accelerator.device) if plan.geo_weight > 0 else None)
            accelerator.backward(terms["loss"])
            if cfg.optim.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logit_scale_clamp_(model)
            step += 1
            batch_in_epoch += 1
            n_img = b * world
            images_seen += n_img
            window_images += n_img
            last_terms = {k: float(v.detach()) for k, v in terms.items()}
            bar.update(1)
            if main_proc and (step % cfg.run.log_every == 0 or step == total):
                dt = max(time.perf_counter() - window_t0, 1e-9)
                ips = window_images / dt
                window_images, window_t0 = 0, time.perf_counter()
                accelerator.log({**{f"train/{k}": v for k, v in last_terms.items()}, "train/lr": lr,
                                 "train/images_per_s": ips,
                                 "train/logit_scale": float(model.logit_scale.detach().exp())}, step=step)
                bar.set_postfix(loss=f"{last_terms['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
                log_file.write(json.dumps({"step": step, "epoch": epoch, "lr": lr, "images_per_s": ips, **last_terms}) + "\n")
                log_file.flush()
            if step % cfg.run.save_every == 0 and step < total:
                save()
                last_saved = step
                window_images, window_t0 = 0, time.perf_counter()  # keep checkpoint I/O out of throughput
            if cfg.run.stop_at_step is not None and step >= cfg.run.stop_at_step and step < total:
                stopped = True
                break
            if step >= total:
                break
        if not stopped and batch_in_epoch >= per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    wall = time.perf_counter() - t_start

    if stopped:
        if last_saved != step:
            save()
    else:
        if last_saved != step or not (out_dir / "final").exists():
            save(final=True)
    summary = {
        "model": bundle.model_name,
        "world_size": world,
        "rank0_pid": os.getpid(),
        "mixed_precision": str(accelerator.mixed_precision),
        "steps": step,
        "total_steps": total,
        "epochs_completed": epoch,
        "complete": step >= total,
        "resumed_from": str(resume_from) if resume_from else None,
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
        log_file.close()
        atomic_write_json(out_dir / "run_summary.json", summary)
        if step >= total:
            print(f"train-clip: done, {step} steps in {wall:.1f}s; final model in {out_dir / 'final'}", flush=True)
        else:
            print(f"train-clip: stopped at step {step}/{total}; continue with --resume", flush=True)
    accelerator.wait_for_everyone()
    return summary


@command_main("train-clip")
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, prog="train-clip", description=__doc__.split("\n\n")[0])
    try:
        train(cfg)
    except CheckpointError as e:
        print(f"train-clip: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
