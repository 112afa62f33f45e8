"""The measuring harness the benchmark scripts share: each measurement runs in a fresh subprocess.

A benchmark script re-runs itself with `--worker KIND --work DIR ...`; the worker prints one line
`BENCH {json}` and `run_worker` returns that dict (peak memory is per process, so every measurement
gets its own). Used by scripts/bench_infer.py and scripts/bench_llava_train.py:

    from bench_worker import emit, peak_rss_mb, rss_mb, run_worker
    result = run_worker(__file__, "ours", work, ["--steps", "30"], threads=1)
    ...; emit(result_dict)          # in the worker
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "BENCH "


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """The worker's answer: one line its parent's `run_worker` reads back."""
    print(PREFIX + json.dumps(result), flush=True)


def run_worker(script: str | os.PathLike, kind: str, work: Path, argv: list[str], threads: int,
               env: dict[str, str] | None = None) -> dict:
    """Runs `script --worker KIND --work WORK *argv` in a fresh process (single-threaded BLAS as asked, offline
    hub, this repository first on the path) and returns the dict it emitted; a failed worker raises with the
    end of its output."""
    cmd = [sys.executable, str(script), "--worker", kind, "--work", str(work), *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len(PREFIX):])
