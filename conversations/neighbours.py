"""Nearby sub-streets of every sub-street: the pool of hard negatives for yes/no and multiple choice.

Distances are measured in metres in the dataset's UTM zone between the sub-street geometries of
`sub_streets.geojson`. A sub-street with no geometry (or a dataset without the file or without
`utm_epsg` in `dataset_info.json`) is placed at the mean UTM position of its images instead. Siblings
(other sub-streets of the same street) are kept in their own list, nearest first. Used by
`conversations.build`; not a command of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clip_stage.core.schema import Address, DatasetFormatError, DatasetPaths, read_info, read_sub_streets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbourhood:
    """Sub-street id -> Address, and the nearest other sub-streets of each (ids, nearest first)."""

    addresses: dict[str, Address]
    nearby: dict[str, tuple[str, ...]]
    """nearest sub-streets of any street (siblings included), up to `k`"""
    siblings: dict[str, tuple[str, ...]]
    """all other sub-streets of the same street, nearest first"""


def _project(geoms, epsg: int):
    import shapely
    from pyproj import Transformer

    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    return [shapely.transform(g, lambda c: np.column_stack(tr.transform(c[:, 0], c[:, 1]))) for g in geoms]


def build_neighbourhood(records: pd.DataFrame, dataset_dir, k: int = 16, prefilter: int = 64) -> Neighbourhood:
    """Finds the `k` nearest sub-streets of each sub-street in `records` ∪ `sub_streets.geojson`."""
    import shapely

    addresses: dict[str, Address] = {}
    for row in records.drop_duplicates("sub_street").to_dict("records"):
        addresses[str(row["sub_street"])] = Address.from_row(row)
    centroids = records.groupby("sub_street")[["utm_x", "utm_y"]].mean()

    geoms: dict[str, object] = {}
    paths = DatasetPaths(dataset_dir)
    epsg = None
    try:
        epsg = read_info(dataset_dir).get("utm_epsg")
    except DatasetFormatError as e:
        log.warning("%s; nearby streets from image positions only", e)
    if paths.sub_streets.exists() and epsg:
        feats = read_sub_streets(dataset_dir)
        for i, f in enumerate(feats):
            sid = f.get("sub_street")
            if not sid or not f.get("street"):
                raise DatasetFormatError(f"{paths.sub_streets}: feature {i}: missing 'sub_street' or 'street' property")
            addresses.setdefault(str(sid), Address.from_row({**f, "cross_streets": f.get("cross_streets") or []}))
        projected = _project([f["geometry"] for f in feats], int(epsg))
        geoms = {str(f["sub_street"]): g for f, g in zip(feats, projected)}
    else:
        log.warning("no %s or no utm_epsg in %s: nearby streets from image positions only", paths.sub_streets, paths.info)

    ids = sorted(addresses)
    shapes = []
    for sid in ids:
        if sid in geoms and not geoms[sid].is_empty:
            shapes.append(geoms[sid])
        elif sid in centroids.index:
            shapes.append(shapely.Point(*centroids.loc[sid].to_numpy()))
        else:  # unreachable: every id comes from the records or a feature
            raise DatasetFormatError(f"sub-street {sid!r} has neither geometry nor images")
    shapes = np.array(shapes, dtype=object)
    centre = np.array([[p.x, p.y] for p in shapely.centroid(shapes)])

    nearby: dict[str, tuple[str, ...]] = {}
    siblings: dict[str, tuple[str, ...]] = {}
    by_street: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        by_street.setdefault(addresses[sid].street, []).append(i)
    for i, sid in enumerate(ids):
        d_centre = np.hypot(*(centre - centre[i]).T)
        d_centre[i] = np.inf
        # cheap centroid prefilter, then exact geometry distances; ties (touching at a junction)
        # are broken by centroid distance
        cand = np.argsort(d_centre, kind="stable")[: min(prefilter, len(ids) - 1)]
        exact = shapely.distance(shapes[i], shapes[cand])
        order = np.lexsort((d_centre[cand], exact))
        nearby[sid] = tuple(ids[j] for j in cand[order][:k])
        sib = [j for j in by_street[addresses[sid].street] if j != i]
        siblings[sid] = tuple(ids[j] for j in sorted(sib, key=lambda j: (d_centre[j], ids[j])))
    return Neighbourhood(addresses, nearby, siblings)
