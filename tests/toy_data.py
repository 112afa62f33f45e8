"""A tiny hand-made address dataset in the on-disk format of `clip_stage.core.schema`.

Three east-west streets crossed by four north-south streets in central Helsinki coordinates give
nine labelled sub-streets in two neighbourhoods. Each image's colour depends on its street, its
stripe pattern on its sub-street, its brightness drifts with position, plus per-image noise: a tiny
CLIP can learn it, and chance (1/9) is far below what it reaches. Used by tests of every stage that
need a dataset without running the builder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pyproj import Transformer

from clip_stage.core.fs import atomic_write_json
from clip_stage.core.schema import Address, DatasetPaths, address_columns, write_records

STREETS = ["Aleksanterinkatu", "Esplanadi", "Bulevardi"]  # east-west, y = 0, 150, 300 m
AVENUES = ["Mikonkatu", "Kaivokatu", "Fredrikinkatu", "Annankatu"]  # north-south, x = 0..600 m
STREET_COLOURS = [(200, 60, 50), (60, 170, 70), (60, 80, 200)]
COLOUR_NAMES = ["red", "green", "blue"]
ORIGIN_UTM = (385000.0, 6672000.0)  # EPSG:32635, central Helsinki
UTM_EPSG = 32635


def _neighbourhood(x: float) -> str:
    return "Kluuvi" if x < 250 else "Kamppi"


def sub_street_table() -> list[dict]:
    rows = []
    for i, street in enumerate(STREETS):
        for j in range(len(AVENUES) - 1):
            x0, x1, y = 200.0 * j, 200.0 * (j + 1), 150.0 * i
            addr = Address(street, f"{street}/{j}", (AVENUES[j], AVENUES[j + 1]), _neighbourhood((x0 + x1) / 2), "Helsinki")
            rows.append({"street_idx": i, "seg_idx": j, "x0": x0, "x1": x1, "y": y, "address": addr})
    return rows


def render_image(street_idx: int, seg_idx: int, x_frac: float, rng: np.random.Generator, size: int) -> Image.Image:
    img = np.zeros((size, size, 3), dtype=np.float32)
    img[:] = STREET_COLOURS[street_idx]
    stripes = seg_idx + 1
    cols = (np.arange(size) * stripes * 2 // size) % 2 == 0
    img[:, cols] *= 0.45
    img *= 0.8 + 0.4 * x_frac
    img += rng.normal(0, 18, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_toy_dataset(root: str | Path, per_sub_street: int = 16, image_size: int = 32, seed: int = 0) -> Path:
    """Writes the toy dataset to `root` and returns it. Every 4th image of each sub-street is test."""
    rng = np.random.default_rng(seed)
    paths = DatasetPaths(root)
    paths.images.mkdir(parents=True, exist_ok=True)
    to_wgs84 = Transformer.from_crs(UTM_EPSG, 4326, always_xy=True)
    records, features = [], []
    for sub in sub_street_table():
        addr: Address = sub["address"]
        for k in range(per_sub_street):
            x = rng.uniform(sub["x0"] + 10, sub["x1"] - 10)
            y = sub["y"] + rng.normal(0, 4)
            utm_x, utm_y = ORIGIN_UTM[0] + x, ORIGIN_UTM[1] + y
            lon, lat = to_wgs84.transform(utm_x, utm_y)
            image_id = f"{sub['street_idx']}-{sub['seg_idx']}-{k:03d}"
            rel = f"{addr.street}/{image_id}.png"
            (paths.images / addr.street).mkdir(exist_ok=True)
            render_image(sub["street_idx"], sub["seg_idx"], x / 600.0, rng, image_size).save(paths.images / rel)
            records.append({
                "image_id": image_id, "image": rel, "lat": lat, "lon": lon, "utm_x": utm_x, "utm_y": utm_y,
                "street": addr.street, "sub_street": addr.sub_street, "cross_streets": list(addr.cross_streets),
                "neighbourhood": addr.neighbourhood, "city": addr.city, **address_columns(addr),
                "caption": f"a street view of {COLOUR_NAMES[sub['street_idx']]} buildings with {sub['seg_idx'] + 1} rows of windows",
                "split": "test" if k % 4 == 3 else "train",
            })
        (lon0, lat0), (lon1, lat1) = (to_wgs84.transform(ORIGIN_UTM[0] + sub[k], ORIGIN_UTM[1] + sub["y"]) for k in ("x0", "x1"))
        features.append({
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [[lon0, lat0], [lon1, lat1]]},
            "properties": {"sub_street": addr.sub_street, "street": addr.street, "cross_streets": list(addr.cross_streets),
                           "neighbourhood": addr.neighbourhood, "city": addr.city, **address_columns(addr)},
        })
    write_records(pd.DataFrame(records), paths.records)
    paths.sub_streets.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    atomic_write_json(paths.info, {"city": "Helsinki", "utm_epsg": UTM_EPSG, "source": "tests/toy_data.py", "seed": seed,
                                   "num_images": len(records)})
    atomic_write_json(paths.report, {"kept": len(records), "rejected": {}})
    paths.rejects.write_text("", encoding="utf-8")
    return Path(root)
