#!/usr/bin/env python
"""Training-step benchmark of train-llava, in one run:

1. tokens/s and peak memory of our training loop vs TRL's SFTTrainer on the same tiny LLaVA (same LoRA
   model object config, same dataset items, same collator, batch, accumulation, optimizer and schedule);
2. LoRA vs full fine-tune memory of our loop;
3. `--real-7b-shape` (GPU): a LLaVA-1.5-7B-shaped model with random weights in bf16, LoRA r=128 +
   gradient checkpointing: tokens/s, peak memory and model-FLOPs utilisation (MFU). On a machine without
   CUDA it only builds the shapes on the meta device and prints the plan (no run).

Every measurement runs in its own subprocess (peak memory is per process). Tokens are non-padding tokens
(image tokens included); the rate is taken over optimizer steps 2..N (step 1 pays one-off costs), both
per wall-clock second and per CPU-second of the process (steadier on a shared machine). On CPU
the memory is the process's peak resident set minus its resident set just before training.

    python scripts/bench_llava_train.py --steps 30 --out bench.json
    python scripts/bench_llava_train.py --real-7b-shape --steps 10 --batch-size 4 --seq-len 2048   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts"):  # the package, and the harness beside this script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_worker import emit, peak_rss_mb, rss_mb, run_worker  # noqa: E402


# --------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# --------------------------------------------------------------------------------------------


def clock_optimizer_steps() -> list[tuple[float, float]]:
    """(wall, CPU) time after every real optimizer step of any torch optimizer in this process: the same
    measuring point for both loops (accumulation micro-steps do not call the inner optimizer)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(
        lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    return stamps


def _common_argv(a, work: Path, out: Path, recipe: str) -> list[str]:
    return [
        "--config", recipe, "--model-name-or-path", str(work / "model"), "--data-path", str(work / "data" / "train.json"),
        "--output-dir", str(out), "--model.torch-dtype", "float32", "--mixed-precision", "no",
        "--trainables.lora-r", str(a.lora_r), "--lora-alpha", str(2 * a.lora_r),
        "--per-device-batch-size", str(a.batch_size), "--global-batch-size", "none",
        "--gradient-accumulation-steps", str(a.accumulation), "--max-steps", str(a.steps),
        "--learning-rate", "1e-3", "--projector-lr", "1e-3", "--save-every", "0", "--no-gradient-checkpointing",
        "--report-to", "none", "--no-progress-bar",
        "--group-by-length" if a.group_by_length else "--no-group-by-length",
    ]


def worker_ours(a, work: Path) -> dict:
    """Our loop (train-llava) with the final checkpoint write excluded from the timing."""
    import torch

    from clip_stage.core.training import Hooks
    from llava_address import train as T

    torch.set_num_threads(a.threads)
    out = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    cfg = T.parse_args(_common_argv(a, work, out, "address_full" if a.full else "address_lora"))
    rss0 = {"value": None}
    # The loop's own seam: the baseline is taken once everything is set up, just before the first step.
    hooks = Hooks(on_fit_start=[lambda: rss0.update(value=rss_mb())])
    stamps = clock_optimizer_steps()
    result = T.train(cfg, hooks)
    tokens = sum(r["tokens"] for r in result.history[1:])
    elapsed = stamps[-1][0] - stamps[0][0]
    cpu = stamps[-1][1] - stamps[0][1]
    return {"tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens, "seconds": elapsed,
            "peak_rss_mb": peak_rss_mb(), "rss_before_train_mb": rss0["value"],
            "train_memory_mb": peak_rss_mb() - rss0["value"], "final_loss": result.history[-1]["loss"],
            "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad)}


def worker_trl(a, work: Path) -> dict:
    """TRL's SFTTrainer on the same model (built by the same code, same seed), items, collator and schedule."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from llava_address import train as T
    from llava_address.data import LlavaCollator
    from llava_address.train_inputs import build_dataset, build_model

    torch.set_num_threads(a.threads)
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=work))
    cfg = T.parse_args(_common_argv(a, work, out, "address_lora"))
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    model, processor, _ = build_model(cfg)
    model.train()
    dataset = build_dataset(cfg, processor, model)
    base_collate = LlavaCollator(processor.tokenizer.pad_token_id)
    micro_tokens: list[int] = []

    def collate(rows):
        # TRL wants a datasets.Dataset: it holds indices, and the items load here exactly as in our loop
        # (lazy image loading + processing per step in both).
        batch = base_collate([dataset[r["idx"]] for r in rows])
        micro_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    stamps = clock_optimizer_steps()

    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.accumulation,
        max_steps=a.steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * a.steps), weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, max_length=None, seed=cfg.train.seed,
        train_sampling_strategy="group_by_length" if a.group_by_length else "random", disable_tqdm=True,
    )
    from datasets import Dataset

    index = Dataset.from_dict({"idx": list(range(len(dataset)))})
    trainer = SFTTrainer(model=model, args=args, train_dataset=index, data_collator=collate,
                         processing_class=processor.tokenizer)
    rss0 = rss_mb()
    trainer.train()
    per_step = [sum(micro_tokens[i * a.accumulation:(i + 1) * a.accumulation]) for i in range(a.steps)]
    tokens = sum(per_step[1:])
    elapsed = stamps[-1][0] - stamps[0][0]
    cpu = stamps[-1][1] - stamps[0][1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens, "seconds": elapsed,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_train_mb": rss0, "train_memory_mb": peak_rss_mb() - rss0,
            "final_loss": losses[-1] if losses else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# --------------------------------------------------------------------------------------------
# LLaVA-1.5-7B shape (GPU)
# --------------------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def llava7b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)


def model_flops_per_step(n_llm: int, n_proj: int, n_tower: int, n_lora: int, layers: int, hidden: int,
                         batch: int, seq: int, image_tokens: int, patches: int) -> float:
    """Model FLOPs of one LoRA step (no recompute counted, as MFU is defined).

    Forward 2N per token for the LLM (+ causal attention 2*L*S*d per token) and projector, 2N_tower per
    patch; backward of the LLM and projector: activation gradients 2N per token (+ attention x2) and weight
    gradients only for LoRA (2N_lora). The frozen tower needs no backward: nothing before it trains.
    """
    tokens = batch * seq
    attn_fwd = 2 * layers * seq * hidden * tokens  # QK^T and AV, causal half of 4*L*S*d
    fwd = 2 * n_llm * tokens + attn_fwd + 2 * n_proj * batch * image_tokens + 2 * n_tower * batch * patches
    bwd = 2 * n_llm * tokens + 2 * attn_fwd + 2 * 2 * n_proj * batch * image_tokens + 2 * n_lora * tokens
    return float(fwd + bwd)


def worker_real7b(a) -> dict:
    import torch

    from llava_address.config import TrainablesArgs
    from llava_address.trainables import apply_trainables
    from transformers import LlavaForConditionalGeneration

    cuda = torch.cuda.is_available()
    config = llava7b_config()
    device = torch.device("cuda" if cuda else "meta")
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random bf16 weights made in place: no fp32 copy of 7B
    try:
        with device:
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    # peft keeps the adapter in fp32 (autocast_adapter_dtype), the base stays bf16: the usual LoRA setup.
    model, _ = apply_trainables(model, TrainablesArgs(llm="lora", projector="full", vision_tower="frozen",
                                                      lora_r=128, lora_alpha=256, lora_dropout=0.05))
    n = {k: 0 for k in ("llm", "proj", "tower", "lora", "trainable")}
    for name, p in model.named_parameters():
        if "lora_" in name:
            n["lora"] += p.numel()
        elif "vision_tower" in name:
            n["tower"] += p.numel()
        elif "multi_modal_projector" in name:
            if "original_module" not in name:
                n["proj"] += p.numel()
        else:
            n["llm"] += p.numel()
        n["trainable"] += p.numel() if p.requires_grad else 0
    image_tokens = (336 // 14) ** 2
    flops = model_flops_per_step(n["llm"], n["proj"], n["tower"], n["lora"], 32, 4096, a.batch_size, a.seq_len,
                                 image_tokens, image_tokens + 1)
    plan = {"mode": "real-7b-shape", "params": n, "batch_size": a.batch_size, "seq_len": a.seq_len,
            "image_tokens": image_tokens, "model_flops_per_step": flops}
    if not cuda:
        plan["note"] = "no CUDA: shapes built on the meta device only (no run)"
        return plan
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    ids = torch.randint(3, 32000, (a.batch_size, a.seq_len), device="cuda")
    ids[:, 1:1 + image_tokens] = config.image_token_id
    labels = ids.clone()
    labels[:, :1 + image_tokens] = -100
    pixels = torch.randn(a.batch_size, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(a.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = sum(times[1:]) / max(1, len(times) - 1)
    name = torch.cuda.get_device_name()
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    plan.update({
        "device": name, "step_s": step_s, "tokens_per_s": a.batch_size * a.seq_len / step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "achieved_tflops": flops / step_s / 1e12, "peak_bf16_tflops": peak,
        "mfu": (flops / step_s / 1e12) / peak if peak else None, "final_loss": float(loss),
    })
    return plan


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def prepare_work(work: Path, records: int) -> None:
    from llava_address.tiny import build_tiny_llava, demo_texts, train_tokenizer, write_toy_llava_data

    tok = train_tokenizer(demo_texts(), work / "tokenizer")
    build_tiny_llava(tok, seed=0, out_dir=work / "model")
    write_toy_llava_data(work / "data", n=records, seed=0)


def measure(kind: str, a, work: Path, extra: list[str] | None = None) -> dict:
    """One worker run of `kind` in its own process (scripts/bench_worker.py)."""
    return run_worker(__file__, kind, work, [
        "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--accumulation", str(a.accumulation),
        "--lora-r", str(a.lora_r), "--threads", str(a.threads), *(["--group-by-length"] if a.group_by_length else []),
        *(extra or [])], threads=a.threads, env={"DS_ACCELERATOR": "cpu"})


def parse(argv=None):
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement (rate over steps 2..N)")
    p.add_argument("--batch-size", type=int, default=4, help="per-device micro-batch")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r) of the tiny runs")
    p.add_argument("--records", type=int, default=64, help="conversation records in the synthetic data")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of ours/TRL; the best of each is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--group-by-length", action="store_true", help="length-grouped batches in both loops")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--real-7b-shape", action="store_true", help="LLaVA-1.5-7B-shaped bf16 LoRA + GC step on the GPU")
    p.add_argument("--seq-len", type=int, default=2048, help="--real-7b-shape: tokens per sample (576 are image tokens)")
    p.add_argument("--peak-tflops", type=float, default=None, help="--real-7b-shape: the GPU's dense bf16 peak (MFU)")
    p.add_argument("--worker", choices=["ours", "trl", "real7b"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        fn = {"ours": lambda: worker_ours(a, a.work), "trl": lambda: worker_trl(a, a.work),
              "real7b": lambda: worker_real7b(a)}[a.worker]
        emit(fn())
        return 0
    if a.real_7b_shape:
        result = worker_real7b(a)
        print(json.dumps(result, indent=2))
        if a.out:
            a.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    import platform

    import torch
    import trl

    with tempfile.TemporaryDirectory(prefix="bench-llava-") as tmp:
        work = Path(tmp)
        prepare_work(work, a.records)
        ours, theirs = [], []
        for _ in range(a.repeats):  # alternate so that load on a shared machine hits both alike
            ours.append(measure("ours", a, work))
            theirs.append(measure("trl", a, work))
        full = measure("ours", a, work, ["--full"])
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_trl = max(theirs, key=lambda r: r["tokens_per_s"])
    lora_mem = min(r["train_memory_mb"] for r in ours)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "trl": trl.__version__},
        "setup": {"steps": a.steps, "batch_size": a.batch_size, "accumulation": a.accumulation, "lora_r": a.lora_r,
                  "records": a.records, "group_by_length": a.group_by_length, "repeats": a.repeats},
        "ours": ours, "trl": theirs, "ours_full_finetune": full,
        "summary": {
            "ours_tokens_per_s": best_ours["tokens_per_s"], "trl_tokens_per_s": best_trl["tokens_per_s"],
            "speedup_vs_trl": best_ours["tokens_per_s"] / best_trl["tokens_per_s"],
            "ours_tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in ours),
            "trl_tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in theirs),
            "speedup_vs_trl_cpu_time": max(r["tokens_per_cpu_s"] for r in ours) / max(r["tokens_per_cpu_s"] for r in theirs),
            "ours_train_memory_mb": lora_mem, "trl_train_memory_mb": min(r["train_memory_mb"] for r in theirs),
            "lora_train_memory_mb": lora_mem, "full_train_memory_mb": full["train_memory_mb"],
            "lora_trainable_params": best_ours["trainable_params"], "full_trainable_params": full["trainable_params"],
        },
    }
    s = result["summary"]
    print(f"ours  {s['ours_tokens_per_s']:9.0f} tok/s   train memory {s['ours_train_memory_mb']:7.1f} MiB")
    print(f"TRL   {s['trl_tokens_per_s']:9.0f} tok/s   train memory {s['trl_train_memory_mb']:7.1f} MiB")
    print(f"speed-up vs TRL SFTTrainer: {s['speedup_vs_trl']:.2f}x wall clock, "
          f"{s['speedup_vs_trl_cpu_time']:.2f}x per CPU-second (target >= 1.2x)")
    print(f"LoRA {s['lora_trainable_params']:,} trainable: {s['lora_train_memory_mb']:.1f} MiB; "
          f"full {s['full_trainable_params']:,} trainable: {s['full_train_memory_mb']:.1f} MiB")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
