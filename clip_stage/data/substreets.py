"""Sub-street partition: split each street at its intersections, merge small pieces, label them.

The paper's construction, offline and in UTM metres:

1. the ways of one street name are merged into connected polylines (`shapely.line_merge`), each
   oriented along the street's principal axis so that both carriageways of a dual road run the same way;
2. all crossings with other named streets are found at once (an STRtree query + vectorised
   `shapely.intersection`); split points along a polyline closer than `min_intersection_gap_m` are
   merged into one (the "drop intersections that are too close" rule), and a crossing that close to an
   end of the polyline becomes that end's cross street; where several streets meet at one split point,
   the one crossing most squarely names it (a street carrying on in line under another name does not);
   parallel ways of one street (the two carriageways of a dual road, other ways of the same name
   within `parallel_merge_m` running alongside) share one set of split points: a split point of one
   is carried across to the other (cutting it there, or merged with the split point it already has
   within `min_intersection_gap_m`, under one cross-street name), so both get the same pieces;
3. pieces between consecutive split points are joined across same-street junctions (forks, the ends of
   a dual carriageway) and pieces with the same cross streets in the same order lying alongside each other
   are one sub-street (blocks between the same names elsewhere stay apart);
4. each image point goes to the nearest piece of its own (geocoded) street; a sub-street with fewer
   than `min_points` images is merged into a touching neighbour on the same street that has images
   (paper: 5); sub-streets whose whole address would read the same are one class;
5. labels: "X between A and B" (cross streets in order along the street), "X near A" (a dead end or
   one cross street), ids "X/0", "X/1", ... in order along the street (west to east, or south to
   north for a north-south street); neighbourhood from a zone
   layer (GeoJSON polygons) or the nearest OSM place node (suburb / quarter / neighbourhood).

    part = partition_sub_streets(network, x, y, street_names, SubStreetConfig(), city="Helsinki")
    part.sub_streets[part.point_sub[i]].address()      # the Address of point i

This module is the partition itself (steps 3-5, `partition_sub_streets`) and its outputs; splitting streets
(steps 1-2) is clip_stage.data.street_pieces, neighbourhoods clip_stage.data.neighbourhoods, the config
and data types clip_stage.data.substreet_types.
"""

from __future__ import annotations

import json

import numpy as np
import shapely
from shapely.geometry import MultiLineString, Point

from clip_stage.core.schema import address_columns
from clip_stage.data.geocode import SegmentIndex
from clip_stage.data.neighbourhoods import neighbourhoods
from clip_stage.data.network import StreetNetwork
from clip_stage.data.street_pieces import UnionFind, split_streets
from clip_stage.data.substreet_types import Piece, SubStreet, SubStreetConfig, SubStreetPartition

# --------------------------------------------------------------------------------------------------
# units: sets of pieces that form one sub-street


def _unit_cross_streets(members: list[Piece]) -> tuple[str, ...]:
    """Cross streets of a set of pieces: named boundaries not crossed inside the set, in axis order."""
    starts = {p.start for p in members if p.start}
    ends = {p.end for p in members if p.end}
    internal = starts & ends
    bounds = [(p.start_proj, p.start) for p in members if p.start] + [(p.end_proj, p.end) for p in members if p.end]
    outer = [b for b in bounds if b[1] not in internal] or bounds
    if not outer:
        return ()
    outer.sort()
    first, last = outer[0][1], outer[-1][1]
    return (first,) if first == last else (first, last)


class _Units:
    """Pieces of one partition grouped into sub-streets, with point counts; merges keep both in sync."""

    def __init__(self, pieces: list[Piece], counts: np.ndarray):
        self.pieces = pieces
        self.uf = UnionFind(len(pieces))
        self.piece_counts = counts

    def groups(self) -> dict[int, list[int]]:
        g: dict[int, list[int]] = {}
        for i in range(len(self.pieces)):
            g.setdefault(self.uf.find(i), []).append(i)
        return g

    def count(self, members: list[int]) -> int:
        return int(self.piece_counts[members].sum())

    def label(self, members: list[int]) -> tuple[str, ...]:
        return _unit_cross_streets([self.pieces[i] for i in members])

    def geom(self, members: list[int]):
        return MultiLineString([self.pieces[i].geom for i in members])


def _join_same_street_junctions(units: _Units, tol: float) -> None:
    """Pieces meeting at an end with no cross street (a fork, a dual carriageway's end) are one stretch."""
    by_street: dict[str, list[int]] = {}
    for i, p in enumerate(units.pieces):
        by_street.setdefault(p.street, []).append(i)
    for idx in by_street.values():
        if len(idx) < 2:
            continue
        geoms = np.array([units.pieces[i].geom for i in idx], dtype=object)
        tree = shapely.STRtree(geoms)
        for k, i in enumerate(idx):
            p = units.pieces[i]
            c = np.asarray(p.geom.coords)
            for free, xy in ((not p.start, c[0]), (not p.end, c[-1])):
                if not free:
                    continue
                for j in tree.query(Point(xy), predicate="dwithin", distance=tol):
                    if j != k:
                        units.uf.union(i, idx[j])


def _merge_same_labels(units: _Units, within_m: float) -> int:
    """Units of one street with the same cross streets in the same order lying within `within_m` of each other
    (the two carriageways of a dual road, the branches of a fork) become one; returns merges.

    Two blocks between the same cross streets elsewhere on the street (a crescent meeting it twice, a
    name used in two parts of town) stay apart: they are different places.
    """
    merged = 0
    groups = units.groups()
    by_key: dict[tuple, list[int]] = {}
    for root, members in groups.items():
        by_key.setdefault((units.pieces[root].street, units.label(members)), []).append(root)
    for roots in by_key.values():
        geom = {r: units.geom(groups[r]) for r in roots}
        for k, a in enumerate(roots):
            for b in roots[k + 1:]:
                if units.uf.find(a) != units.uf.find(b) and float(shapely.distance(geom[a], geom[b])) <= within_m:
                    units.uf.union(a, b)
                    merged += 1
    return merged


def _merge_small(units: _Units, cfg: SubStreetConfig) -> int:
    """Merges every unit with fewer than min_points points into a neighbour on its street; returns merges.

    Streets are independent, so each is processed on its own units only (the smallest unit first).
    """
    merges = 0
    by_street: dict[str, dict[int, list[int]]] = {}
    for root, members in units.groups().items():
        by_street.setdefault(units.pieces[root].street, {})[root] = members
    for groups in by_street.values():
        count = {r: units.count(m) for r, m in groups.items()}
        if len(groups) < 2 or sum(count.values()) == 0:
            continue  # nothing to merge with, or a street without images (dropped later)
        geom = {r: units.geom(m) for r, m in groups.items()}
        blocked: set[int] = set()  # units with no neighbour in reach
        while True:
            # a stretch with no images is no class (dropped later): never merged, so it cannot widen a label
            small = [(count[r], r) for r in groups if r not in blocked and 0 < count[r] < cfg.min_points]
            if not small or len(groups) < 2:
                break
            _, root = min(small)
            dists = [(float(shapely.distance(geom[root], geom[r])), count[r], r) for r in groups if r != root and count[r]]
            if not dists:
                blocked.add(root)
                continue
            touching = [d for d in dists if d[0] <= cfg.snap_tolerance_m]
            if touching:
                target = min(touching, key=lambda d: (d[1], d[2]))[2]  # the touching neighbour with fewest points
            else:
                d, _, target = min(dists)
                if d > cfg.merge_max_gap_m:
                    blocked.add(root)
                    continue
            units.uf.union(root, target)
            new = units.uf.find(root)
            members = groups.pop(root) + groups.pop(target)
            total = count.pop(root) + count.pop(target)
            geom.pop(root), geom.pop(target)
            groups[new], count[new], geom[new] = members, total, units.geom(members)
            blocked.discard(root), blocked.discard(target)
            merges += 1
    return merges


def _piece_roots(units: _Units) -> np.ndarray:
    return np.array([units.uf.find(i) for i in range(len(units.pieces))], dtype=np.int64)


def _neighbourhood_of_units(units: _Units, point_piece: np.ndarray, x: np.ndarray, y: np.ndarray,
                            network: StreetNetwork, cfg: SubStreetConfig, zones) -> dict[int, str]:
    """Neighbourhood of every unit with images (by root): where its images are (their mean position)."""
    ok = point_piece >= 0
    roots = _piece_roots(units)[point_piece[ok]]
    uniq, inv = np.unique(roots, return_inverse=True)
    if not len(uniq):
        return {}
    cnt = np.bincount(inv, minlength=len(uniq))
    centre = np.stack([np.bincount(inv, weights=x[ok]) / cnt, np.bincount(inv, weights=y[ok]) / cnt], axis=1)
    return dict(zip(uniq.tolist(), neighbourhoods(centre, network, cfg, zones)))


def _merge_same_addresses(units: _Units, hood: dict[int, str]) -> int:
    """Units whose addresses would read the same (street, cross streets, neighbourhood) become one class:
    an address text names one sub-street. `hood` (by root) is kept up to date; returns merges."""
    merged = 0
    first: dict[tuple, int] = {}
    for root, members in units.groups().items():
        if root not in hood:
            continue  # no images: no class, no address
        key = (units.pieces[root].street, units.label(members), hood[root])
        if key not in first:
            first[key] = root
            continue
        units.uf.union(first[key], root)
        first[key] = units.uf.find(root)
        hood[first[key]] = key[2]
        merged += 1
    return merged


# --------------------------------------------------------------------------------------------------
# the whole partition


def partition_sub_streets(
    network: StreetNetwork,
    x: np.ndarray,
    y: np.ndarray,
    streets: np.ndarray,
    config: SubStreetConfig | None = None,
    city: str = "",
    zones=None,
    max_point_distance_m: float = 100.0,  # the geocoder's max distance bounds it
) -> SubStreetPartition:
    """Partitions the network's streets into sub-streets and assigns the points (UTM x, y) to them.

    `streets` holds each point's geocoded street name ("" = rejected point, not assigned). Only
    sub-streets that receive points are returned, ordered by street then along the street.
    """
    cfg = config or SubStreetConfig()
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    streets = np.asarray(streets, dtype=object)
    pieces, stats = split_streets(network, cfg)
    street_names = sorted({p.street for p in pieces})
    sid = {n: i for i, n in enumerate(street_names)}
    piece_street = np.array([sid[p.street] for p in pieces], dtype=np.int64)
    point_street = np.array([sid.get(s, -1) if s else -1 for s in streets], dtype=np.int64)

    point_piece = np.full(len(x), -1, dtype=np.int64)
    has = point_street >= 0
    if has.any():
        index = SegmentIndex([np.asarray(p.geom.coords) for p in pieces], np.arange(len(pieces)))
        best, _ = index.nearest_label(x[has], y[has], max_point_distance_m, allowed=point_street[has], label_group=piece_street)
        point_piece[has] = best
    counts = np.bincount(point_piece[point_piece >= 0], minlength=len(pieces)).astype(np.int64)

    units = _Units(pieces, counts)
    _join_same_street_junctions(units, cfg.snap_tolerance_m)
    alongside = max(cfg.parallel_merge_m, cfg.snap_tolerance_m)
    stats["same_label_merges"] = _merge_same_labels(units, alongside)
    stats["small_merges"] = _merge_small(units, cfg)
    stats["same_label_merges"] += _merge_same_labels(units, alongside)

    hood = _neighbourhood_of_units(units, point_piece, x, y, network, cfg, zones)
    stats["same_address_merges"] = _merge_same_addresses(units, hood)
    # a stretch of street with no images is not a class of the dataset
    groups = {r: m for r, m in units.groups().items() if units.count(m) > 0}
    by_street: dict[str, list[int]] = {}
    for root in groups:
        by_street.setdefault(pieces[root].street, []).append(root)
    sub_streets: list[SubStreet] = []
    root_to_sub: dict[int, int] = {}
    for street in sorted(by_street):
        roots = by_street[street]
        # along the street's axis (west to east / south to north), whichever carriageway a unit is on
        order = sorted(roots, key=lambda r: (min(pieces[i].start_proj for i in groups[r]), min(pieces[i].order for i in groups[r])))
        for k, r in enumerate(order):
            root_to_sub[r] = len(sub_streets)
            geom = shapely.line_merge(units.geom(groups[r]))
            sub_streets.append(SubStreet(f"{street}/{k}", street, units.label(groups[r]), geom, units.count(groups[r]),
                                         hood[r], city))

    point_sub = np.full(len(x), -1, dtype=np.int64)
    ok = point_piece >= 0
    if ok.any():
        lut = np.full(len(pieces), -1, dtype=np.int64)
        for r, s in root_to_sub.items():
            lut[r] = s
        point_sub[ok] = lut[_piece_roots(units)[point_piece[ok]]]
    stats["sub_streets"] = len(sub_streets)
    stats["streets_with_images"] = len(by_street)
    stats["sub_streets_below_min_points"] = sum(1 for s in sub_streets if s.n_points < cfg.min_points)
    return SubStreetPartition(sub_streets, point_sub, stats)


def side_by_side(sub_streets: list[SubStreet], within_m: float = 20.0, min_fraction: float = 0.5,
                 min_length_m: float = 50.0) -> list[tuple[str, str, float]]:
    """Pairs of sub-streets of one street that run side by side: (id, id, metres alongside).

    The shorter one lies within `within_m` of the other along more than `min_fraction` of its length
    and more than `min_length_m` metres; pieces that merely meet end to end do not count (the stretch
    near the shared end is under `min_length_m`). On a partition that groups parallel ways this is
    empty: photos of one block get one label whichever carriageway they are nearer.
    """
    by_street: dict[str, list[SubStreet]] = {}
    for s in sub_streets:
        by_street.setdefault(s.street, []).append(s)
    out = []
    for subs in by_street.values():
        for i, a in enumerate(subs):
            for b in subs[i + 1:]:
                short, long_ = (a, b) if a.geometry.length <= b.geometry.length else (b, a)
                along = float(short.geometry.intersection(long_.geometry.buffer(within_m)).length)
                if along > min_fraction * short.geometry.length and along > min_length_m:
                    out.append((a.sub_street, b.sub_street, round(along, 1)))
    return out


def sub_streets_geojson(partition: SubStreetPartition, network: StreetNetwork) -> dict:
    """The sub-streets as a WGS84 GeoJSON FeatureCollection with their address fields as properties."""
    def to_wgs(xy: np.ndarray) -> np.ndarray:
        lon, lat = network.to_wgs84(xy[:, 0], xy[:, 1])
        return np.stack([lon, lat], axis=1)

    feats = []
    for s in partition.sub_streets:
        g = shapely.transform(s.geometry, to_wgs)
        a = s.address()
        feats.append({
            "type": "Feature",
            "geometry": json.loads(shapely.to_geojson(shapely.set_precision(g, 1e-7))),
            "properties": {
                "sub_street": s.sub_street, "street": s.street, "cross_streets": list(s.cross_streets),
                "neighbourhood": s.neighbourhood, "city": s.city, "n_images": int(s.n_points),
                "length_m": round(float(s.geometry.length), 1), **address_columns(a),
            },
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": feats}
