#!/usr/bin/env python
"""Inference benchmark: our HF engine (`llava_address.eval.infer.Generator`: batched, left-padded, KV cache) vs the
usual way, a transformers `pipeline("image-text-to-text")` called one question at a time, in one run.

Both serve the same tiny LLaVA (built here from `llava_address/model_configs`, random weights, nothing
downloaded) whose processor carries the training chat template, answer the same questions about the same
square images greedily with the same answer length, and both are timed after one warm-up call. Reported:
answers per second (wall clock and per CPU-second of the process, steadier on a shared machine), peak memory
(CUDA: the allocator's peak; CPU: the process's peak resident set minus its resident set after loading) and
the fraction of identical answers (a correctness check: same prompt, same greedy decoding). Each
measurement runs in its own subprocess; repeats alternate the two and the best of each is reported.
Target: >= 2x the pipeline loop's answers/s.

    python scripts/bench_infer.py --questions 64 --batch-size 16 --max-new-tokens 16 --out bench_infer.json
"""

from __future__ import annotations

import argparse
import json
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

QUESTIONS = ["Where was this photo taken?", "What street is this?", "Which neighbourhood is this?",
             "Give the address of this place.", "What is the nearest cross street?"]
TARGET = 2.0


# --- workers (each in its own process) -------------------------------------------------------------------

def _inputs(work: Path, n: int):
    from PIL import Image

    images = [Image.open(work / "images" / f"{i:04d}.png").convert("RGB") for i in range(n)]
    return [QUESTIONS[i % len(QUESTIONS)] for i in range(n)], images


def _memory_start(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


def _memory_peak(device: str, start: float) -> dict:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_memory_mb": peak, "generation_memory_mb": peak - start, "memory_kind": "cuda allocated"}
    return {"peak_memory_mb": peak_rss_mb(), "generation_memory_mb": peak_rss_mb() - start,
            "memory_kind": "process RSS"}


def worker_ours(a, work: Path) -> dict:
    import torch

    from llava_address.eval.infer import load_generator, user_turn

    torch.set_num_threads(a.threads)
    questions, images = _inputs(work, a.questions)
    gen = load_generator(work / "model", device=a.device, dtype="float32")
    gen.pad_to_square = False  # the images are square already: both sides see the same pixels

    def run(qs, ims):
        out = []
        for s in range(0, len(qs), a.batch_size):
            out += gen.generate([[user_turn(q, True)] for q in qs[s:s + a.batch_size]], ims[s:s + a.batch_size],
                                a.max_new_tokens)
        return out

    run(questions[:a.batch_size], images[:a.batch_size])  # warm-up
    start = _memory_start(a.device)
    t0, c0 = time.perf_counter(), time.process_time()
    answers = run(questions, images)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"answers": answers, "seconds": wall, "answers_per_s": len(answers) / wall,
            "answers_per_cpu_s": len(answers) / cpu, **_memory_peak(a.device, start)}


def worker_pipeline(a, work: Path) -> dict:
    import torch
    from transformers import pipeline

    torch.set_num_threads(a.threads)
    questions, images = _inputs(work, a.questions)
    pipe = pipeline("image-text-to-text", model=str(work / "model"), device=a.device, dtype=torch.float32)

    def ask(q, im) -> str:
        messages = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
        out = pipe(text=messages, max_new_tokens=a.max_new_tokens, do_sample=False, return_full_text=False)
        out = out[0] if isinstance(out, list) else out
        text = out["generated_text"]
        return (text[-1]["content"] if isinstance(text, list) else str(text)).strip()

    ask(questions[0], images[0])  # warm-up
    start = _memory_start(a.device)
    t0, c0 = time.perf_counter(), time.process_time()
    answers = [ask(q, im) for q, im in zip(questions, images)]  # one question at a time: the usual loop
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"answers": answers, "seconds": wall, "answers_per_s": len(answers) / wall,
            "answers_per_cpu_s": len(answers) / cpu, **_memory_peak(a.device, start)}


# --- driver ----------------------------------------------------------------------------------------------

def prepare_work(work: Path, a) -> None:
    import numpy as np
    from PIL import Image

    from llava_address.prompting import attach_chat_template
    from llava_address.tiny import build_tiny_llava, demo_texts, load_tiny_config, train_tokenizer

    tok = train_tokenizer(demo_texts(), work / "tokenizer")
    _, processor = build_tiny_llava(tok, seed=0, config_name=a.config, out_dir=work / "model")
    attach_chat_template(processor, "vicuna_v1")  # what merge saves: the pipeline prompts as training did
    processor.save_pretrained(work / "model")
    size = load_tiny_config(a.config)["vision_config"]["image_size"]
    rng = np.random.default_rng(0)
    (work / "images").mkdir()
    for i in range(a.questions):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(work / "images" / f"{i:04d}.png")


def measure(kind: str, a, work: Path) -> dict:
    """One worker run of `kind` in its own process (scripts/bench_worker.py)."""
    return run_worker(__file__, kind, work, [
        "--questions", str(a.questions), "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
        "--threads", str(a.threads), "--device", a.device, "--config", a.config], threads=a.threads)


def parse(argv=None):
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=64, help="questions (one image each) answered by both")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate() call of our engine")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit of both")
    p.add_argument("--config", default="tiny-llava", help="model shape (llava_address/model_configs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best of each is reported")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "pipeline"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.questions < 1 or a.batch_size < 1 or a.max_new_tokens < 1 or a.repeats < 1:
        p.error("--questions, --batch-size, --max-new-tokens and --repeats must be >= 1")
    from clip_stage.core.training import check_device

    try:
        check_device(a.device)  # `--device cuda` without a GPU: one line, not a driver traceback
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        fn = {"ours": worker_ours, "pipeline": worker_pipeline}[a.worker]
        emit(fn(a, a.work))
        return 0
    import platform

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        work = Path(tmp)
        prepare_work(work, a)
        ours, theirs = [], []
        for _ in range(a.repeats):  # alternate so that load on a shared machine hits both alike
            ours.append(measure("ours", a, work))
            theirs.append(measure("pipeline", a, work))
    best_ours = max(ours, key=lambda r: r["answers_per_s"])
    best_pipe = max(theirs, key=lambda r: r["answers_per_s"])
    same = sum(x == y for x, y in zip(best_ours["answers"], best_pipe["answers"])) / a.questions
    summary = {
        "ours_answers_per_s": best_ours["answers_per_s"], "pipeline_answers_per_s": best_pipe["answers_per_s"],
        "speedup": best_ours["answers_per_s"] / best_pipe["answers_per_s"],
        "speedup_cpu_time": max(r["answers_per_cpu_s"] for r in ours) / max(r["answers_per_cpu_s"] for r in theirs),
        "ours_peak_memory_mb": min(r["peak_memory_mb"] for r in ours),
        "pipeline_peak_memory_mb": min(r["peak_memory_mb"] for r in theirs),
        "ours_generation_memory_mb": min(r["generation_memory_mb"] for r in ours),
        "pipeline_generation_memory_mb": min(r["generation_memory_mb"] for r in theirs),
        "memory_kind": best_ours["memory_kind"], "same_answers": same, "target": TARGET,
    }
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads, "device": a.device,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "setup": {k: getattr(a, k) for k in ("questions", "batch_size", "max_new_tokens", "config", "repeats")},
        "ours": [{k: v for k, v in r.items() if k != "answers"} for r in ours],
        "pipeline": [{k: v for k, v in r.items() if k != "answers"} for r in theirs],
        "summary": summary,
    }
    s = summary
    print(f"{'engine':<44} {'answers/s':>10} {'per CPU-s':>10} {'peak MiB':>9} {'+ generating':>12}")
    print(f"{'ours: Generator, batch ' + str(a.batch_size) + ', KV cache':<44} {s['ours_answers_per_s']:10.2f} "
          f"{max(r['answers_per_cpu_s'] for r in ours):10.2f} {s['ours_peak_memory_mb']:9.1f} "
          f"{s['ours_generation_memory_mb']:12.1f}")
    print(f"{'transformers pipeline, one at a time':<44} {s['pipeline_answers_per_s']:10.2f} "
          f"{max(r['answers_per_cpu_s'] for r in theirs):10.2f} {s['pipeline_peak_memory_mb']:9.1f} "
          f"{s['pipeline_generation_memory_mb']:12.1f}")
    print(f"speed-up: {s['speedup']:.2f}x wall clock, {s['speedup_cpu_time']:.2f}x per CPU-second "
          f"(target >= {TARGET:.0f}x); identical answers: {same:.0%}; memory: {s['memory_kind']}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
