"""Benchmark: `build-dataset` at 100k / 300k / 1M synthetic GPS rows along the central-Helsinki streets.

    .venv/bin/python scripts/bench_build.py                                  # 100k, 300k, 1M rows
    .venv/bin/python scripts/bench_build.py --sizes 20000 --json bench.json

What runs: the real command (`clip_stage.data.build.main`), each size in a fresh child process, with
`--image-check none --image-mode root`: the GPS table (CSV) is streamed in `--chunk-rows` chunks,
every row is checked and reverse-geocoded, duplicates are looked up, every image path is resolved
under the root and stat'ed (in `--workers` threads), the sub-streets are partitioned, splits assigned
and records.parquet, sub_streets.geojson and rejects.jsonl written. The image files exist (one empty
file per row, made once before timing, by default in RAM under /dev/shm) but are not read: no hashing, no
decoding and no per-file link (`<out>/images` is one symlink to the root). Reading pixels costs what
the disk and the decoder cost per image and is not part of this benchmark.

Points: drawn along the streets uniformly by length with Gaussian noise (--noise-m). Reported per
size: wall time, the child's CPU time (user + system, all threads), its stages (from build_report.json), seconds per 100k rows (flat = linear growth),
the child's peak resident memory (`resource.getrusage().ru_maxrss`: the whole process, interpreter,
network and libraries included) and the 1-minute load average before and after (the machine may be
shared). Targets: 1M rows in under 60 s and under 2 GB peak on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_geocode import sample_points  # noqa: E402


def make_inputs(workdir: Path, n: int, noise_m: float, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """n empty image files (1,000 per folder) and the (lat, lon) of n points along the Helsinki streets."""
    from clip_stage.data.geocode import ReverseGeocoder
    from clip_stage.data.network import helsinki_pbf_path, load_street_network

    net = load_street_network(helsinki_pbf_path())
    x, y = sample_points(ReverseGeocoder(net).lines_utm, n, noise_m, np.random.default_rng(seed))
    lon, lat = net.to_wgs84(x, y)
    images = workdir / "images"
    for i in range(n):
        if i % 1000 == 0:
            (images / f"{i // 1000:04d}").mkdir(parents=True, exist_ok=True)
        os.close(os.open(images / f"{i // 1000:04d}" / f"{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    return images, lat, lon


def write_table(path: Path, lat: np.ndarray, lon: np.ndarray, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "lat", "lon"])
        w.writerows((f"{i // 1000:04d}/{i:07d}.jpg", f"{lat[i]:.7f}", f"{lon[i]:.7f}") for i in range(n))


def child(images: str, table: str, out: str, workers: int, chunk_rows: int) -> int:
    """One timed build in this (fresh) process; prints a JSON line with the numbers."""
    from clip_stage.data.build import main

    t = time.perf_counter()
    rc = main(["--images", images, "--gps", table, "--out", out, "--quiet", "--overwrite", "--image-check", "none",
               "--image-mode", "root", "--workers", str(workers), "--chunk-rows", str(chunk_rows)])
    wall = time.perf_counter() - t
    report = json.loads((Path(out) / "build_report.json").read_text(encoding="utf-8"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime  # this process's own CPU time: what a shared machine does not inflate
    print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": cpu, "peak_mb": usage.ru_maxrss / 1024, "report": report}))
    return rc


def main(argv: list[str] | None = None) -> int:
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated row counts")
    parser.add_argument("--noise-m", type=float, default=5.0, help="GPS offset from the street centreline (std, m)")
    parser.add_argument("--workers", type=int, default=2, help="build-dataset --workers")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="build-dataset --chunk-rows")
    parser.add_argument("--workdir", default="", help="folder for the inputs and outputs ('' = a temporary one in /dev/shm if there is one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("IMAGES", "TABLE", "OUT"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.child:
        return child(*ns.child, ns.workers, ns.chunk_rows)

    sizes = [int(s) for s in ns.sizes.split(",") if s.strip()]
    # the default is RAM (/dev/shm): a million empty files take 15 s to create there, 8 minutes on this disk
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.TemporaryDirectory(prefix="bench_build_", dir=shm) if not ns.workdir else None
    workdir = Path(ns.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        images, lat, lon = make_inputs(workdir, max(sizes), ns.noise_m, ns.seed)
        print(f"setup (not timed): {max(sizes):,} points and empty image files in {time.perf_counter() - t:.1f} s")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; inputs and outputs in {workdir}")
        results = []
        for n in sizes:
            table = workdir / f"gps_{n}.csv"
            write_table(table, lat, lon, n)
            load_before = os.getloadavg()[0]
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(images), str(table), str(workdir / f"ds_{n}"),
                 "--workers", str(ns.workers), "--chunk-rows", str(ns.chunk_rows)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rep = r["report"]
            # correctness checks: every row accounted for, most points along the streets kept
            assert rep["kept"] + rep["rejected_total"] == n, rep
            assert rep["kept"] > 0.8 * n, rep
            results.append({"rows": n, "wall_s": round(r["wall_s"], 2), "cpu_s": round(r["cpu_s"], 2),
                            "s_per_100k": round(r["wall_s"] / n * 1e5, 2), "cpu_s_per_100k": round(r["cpu_s"] / n * 1e5, 2),
                            "peak_mb": round(r["peak_mb"]), "kept": rep["kept"], "sub_streets": rep["sub_streets"],
                            "stages_s": rep["timings_s"], "load_before": round(load_before, 2),
                            "load_after": round(os.getloadavg()[0], 2)})
            (workdir / f"gps_{n}.csv").unlink()
    finally:
        if tmp is not None:
            tmp.cleanup()

    print()
    print("| rows | wall (s) | CPU (s) | wall / CPU s per 100k rows | peak RSS (MB) | kept | sub-streets | table+geocode / images / sub-streets / write (s) | load avg before / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        st = r["stages_s"]
        stages = " / ".join(f"{st.get(k, 0):.1f}" for k in ("table_geocode", "images", "sub_streets", "write"))
        print(f"| {r['rows']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['s_per_100k']:.2f} / {r['cpu_s_per_100k']:.2f} | {r['peak_mb']:,} | {r['kept']:,} | "
              f"{r['sub_streets']} | {stages} | {r['load_before']:.2f} / {r['load_after']:.2f} |")
    print("\ntargets: 1M rows < 60 s and < 2,048 MB peak on 2 cores; s / 100k rows flat = linear growth")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"results": results}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
