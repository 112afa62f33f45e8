"""Address-localisation metrics: SSA-k, SA-k, neighbourhood accuracy and distance error in metres.

Scoring goes through each candidate's sub-street set (see `clip_stage.gallery`), so it is defined for
every gallery style:

- **SSA-k** (sub-street accuracy): one of the top-k candidates names exactly the true sub-street
  (its sub-street set is {true}). A candidate naming a whole street is not a sub-street answer, so with a
  street-only gallery SSA counts only streets that have a single sub-street: read SA there.
- **SA-k** (street accuracy): one of the top-k candidates names exactly the true main street (its
  street set is {true street}); with a full-address gallery: the predicted sub-street is on the right street.
- **neighbourhood-1**: the top-1 candidate lies entirely in the true neighbourhood.
- **distance error**: metres from the image's UTM point to the nearest point of the top-1 candidate's
  geometry (the union of its sub-streets' lines, from sub_streets.geojson projected to the dataset's
  `utm_epsg`). Candidates that match no sub-street have no distance; they are counted, not averaged.

Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from clip_stage.gallery import Gallery
from clip_stage.core.schema import DatasetFormatError, read_info, read_sub_streets

TOPK = (1, 5)


def sub_street_geometries_utm(dataset_dir: str | Path, epsg: int | None = None) -> dict[str, BaseGeometry]:
    """sub_street id -> its WGS84 geometry projected to the dataset's UTM zone (metres)."""
    from pyproj import Transformer

    if epsg is None:
        info = read_info(dataset_dir)
        if "utm_epsg" not in info:
            raise DatasetFormatError(f"{dataset_dir}: dataset_info.json has no utm_epsg")
        epsg = int(info["utm_epsg"])
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    out: dict[str, BaseGeometry] = {}
    for feat in read_sub_streets(dataset_dir):
        geom = shapely.transform(feat["geometry"], lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))
        sub = str(feat["sub_street"])
        out[sub] = shapely.union(out[sub], geom) if sub in out else geom
    return out


def candidate_geometries(gallery: Gallery, geoms: dict[str, BaseGeometry]) -> list[BaseGeometry | None]:
    """Per candidate: the union of its sub-streets' geometries (None when it has none)."""
    out = []
    for c in gallery.candidates:
        parts = [geoms[s] for s in sorted(c.sub_streets) if s in geoms]
        out.append(shapely.union_all(parts) if parts else None)
    return out


def score(truth: list[dict], topk: np.ndarray, gallery: Gallery, cand_geoms: list[BaseGeometry | None]) -> tuple[list[dict], dict]:
    """Scores ranked predictions.

    truth: per image {'sub_street', 'street', 'neighbourhood', 'utm_x', 'utm_y'}; topk: [N, K] candidate
    indices, best first. Returns (per-image result dicts, metrics dict).
    """
    n = len(truth)
    topk = np.asarray(topk).reshape(n, -1)
    cands = gallery.candidates
    per_image = []
    ssa = {k: 0 for k in TOPK}
    sa = {k: 0 for k in TOPK}
    hood = 0
    dists = np.full(n, np.nan)
    # distances grouped by predicted candidate: one vectorised shapely call per candidate
    pts = shapely.points(np.array([[t["utm_x"], t["utm_y"]] for t in truth], dtype=float).reshape(-1, 2)) if n else []
    top1 = topk[:, 0] if n else np.zeros(0, int)
    for ci in np.unique(top1):
        g = cand_geoms[ci]
        if g is not None:
            idx = np.nonzero(top1 == ci)[0]
            dists[idx] = shapely.distance(pts[idx], g)
    for i, t in enumerate(truth):
        ranked = [cands[j] for j in topk[i]]
        ssa_rank = next((r for r, c in enumerate(ranked) if c.sub_streets == {t["sub_street"]}), None)
        sa_rank = next((r for r, c in enumerate(ranked) if c.streets == {t["street"]}), None)
        for k in TOPK:
            ssa[k] += ssa_rank is not None and ssa_rank < k
            sa[k] += sa_rank is not None and sa_rank < k
        hood_ok = ranked[0].neighbourhoods == {t["neighbourhood"]}
        hood += hood_ok
        per_image.append({"ssa_rank": ssa_rank, "sa_rank": sa_rank, "neighbourhood_ok": bool(hood_ok),
                          "distance_m": None if math.isnan(dists[i]) else float(dists[i])})
    finite = dists[np.isfinite(dists)]
    metrics = {
        **{f"SSA-{k}": ssa[k] / n if n else 0.0 for k in TOPK},
        **{f"SA-{k}": sa[k] / n if n else 0.0 for k in TOPK},
        "neighbourhood-1": hood / n if n else 0.0,
        "median_distance_m": float(np.median(finite)) if finite.size else None,
        "mean_distance_m": float(np.mean(finite)) if finite.size else None,
        "num_images": n,
        "num_without_distance": int(n - finite.size),
    }
    return per_image, metrics
