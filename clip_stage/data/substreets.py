"""Sub-street partition: split each street at its intersections, merge small pieces, label them.

The paper's construction, offline and in UTM metres:

1. the ways of one street name are merged into connected polylines (`shapely.line_merge`), each
   oriented along the street's principal axis so that both carriageways of a dual road run the same way;
2. all crossings with other named streets are found at once (an STRtree query + vectorised
   `shapely.intersection`); split points along a polyline closer than `min_intersection_gap_m` are
   merged into one (the "drop intersections that are too close" rule), and a crossing that close to an
   end of the polyline becomes that end's cross street;
   parallel ways of one street (the two carriageways of a dual road, other ways of the same name
   within `parallel_merge_m` running alongside) share one set of split points: a split point of one
   is carried across to the other (cutting it there, or merged with the split point it already has
   within `min_intersection_gap_m`, under one cross-street name), so both get the same pieces;
3. pieces between consecutive split points are joined across same-street junctions (forks, the ends of
   a dual carriageway) and pieces with the same cross streets are one sub-street;
4. each image point goes to the nearest piece of its own (geocoded) street; a sub-street with fewer
   than `min_points` images is merged into a touching neighbour on the same street (paper: 5);
5. labels: "X between A and B" (cross streets in order along the street), "X near A" (a dead end or
   one cross street), ids "X/0", "X/1", ... in order along the street (west to east, or south to
   north for a north-south street); neighbourhood from a zone
   layer (GeoJSON polygons) or the nearest OSM place node (suburb / quarter / neighbourhood).

    part = partition_sub_streets(network, x, y, street_names, SubStreetConfig(), city="Helsinki")
    part.sub_streets[part.point_sub[i]].address()      # the Address of point i
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import LineString, MultiLineString, Point
from shapely.ops import substring

from clip_stage.data.geocode import SegmentIndex
from clip_stage.data.network import StreetNetwork
from clip_stage.core.schema import Address


@dataclass(frozen=True)
class SubStreetConfig:
    """Sub-street partition: intersection splitting, the small-sub-street merge rule, neighbourhoods."""

    min_intersection_gap_m: float = 30.0
    """Split points closer than this along a street are merged; a crossing this close to a street end becomes that end (metres)."""
    min_points: int = 5
    """A sub-street with fewer images is merged into a neighbour on the same street (the paper uses 5)."""
    snap_tolerance_m: float = 2.0
    """Streets closer than this count as touching / crossing (metres)."""
    parallel_merge_m: float = 25.0
    """Ways of the same street name closer than this and running alongside (the two carriageways of a dual road, parallel service ways) share one set of split points and one sequence of sub-streets (metres; 0 turns it off)."""
    merge_max_gap_m: float = 100.0
    """A small sub-street with no touching neighbour is merged only into one of its street within this distance (metres)."""
    neighbourhood_kinds: str = "neighbourhood,quarter,suburb,admin10,admin9"
    """OSM place=* kinds (and adminN boundary levels) used as neighbourhoods, comma-separated: the smallest area containing the sub-street wins, else the nearest place node."""
    neighbourhood_max_distance_m: float = 3000.0
    """Place nodes farther than this from a sub-street are not used as its neighbourhood (metres)."""
    zone_name_property: str = "name"
    """Property holding the neighbourhood name in a zone layer (GeoJSON polygons)."""

    def __post_init__(self):
        if self.min_points < 1:
            raise ValueError(f"SubStreetConfig: min_points must be >= 1, got {self.min_points}")
        if self.min_intersection_gap_m < 0 or self.snap_tolerance_m <= 0 or self.parallel_merge_m < 0:
            raise ValueError(
                "SubStreetConfig: min_intersection_gap_m and parallel_merge_m must be >= 0 and snap_tolerance_m > 0"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.neighbourhood_kinds.split(",") if k.strip())


@dataclass
class Piece:
    """A stretch of one street polyline between two consecutive split points (UTM)."""

    street: str
    geom: LineString
    start: str  # cross street at the start ("" for a dead end or a same-street junction)
    end: str
    start_proj: float  # positions of the two ends along the street's principal axis
    end_proj: float
    order: tuple[int, float] = (0, 0.0)  # (polyline rank along the axis, position along the polyline)


@dataclass
class SubStreet:
    """One labelled sub-street (a class of the dataset)."""

    sub_street: str
    street: str
    cross_streets: tuple[str, ...]
    geometry: LineString | MultiLineString  # UTM metres
    n_points: int = 0
    neighbourhood: str = ""
    city: str = ""

    def address(self) -> Address:
        return Address(self.street, self.sub_street, self.cross_streets, self.neighbourhood, self.city)


@dataclass
class SubStreetPartition:
    sub_streets: list[SubStreet]
    point_sub: np.ndarray  # per input point: index into sub_streets, -1 if the point has no street
    stats: dict = field(default_factory=dict)


class ZoneFileError(ValueError):
    """A neighbourhood zone layer that cannot be read."""


# --------------------------------------------------------------------------------------------------
# geometry helpers


def _street_lines_utm(network: StreetNetwork) -> dict[str, list[np.ndarray]]:
    lens = np.array([len(w.coords) for w in network.ways])
    allc = np.concatenate([w.coords for w in network.ways])
    x, y = network.to_utm(allc[:, 0], allc[:, 1])
    parts = np.split(np.stack([x, y], axis=1), np.cumsum(lens)[:-1])
    out: dict[str, list[np.ndarray]] = {}
    for w, xy in zip(network.ways, parts):
        out.setdefault(w.name, []).append(xy)
    return out


def _principal_axis(lines: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.concatenate(lines)
    c = pts.mean(axis=0)
    if len(pts) < 2 or np.allclose(pts, c):
        return c, np.array([1.0, 0.0])
    _, _, vt = np.linalg.svd(pts - c, full_matrices=False)
    v = vt[0]
    # a fixed sign convention so ids are stable: west -> east, or south -> north for a north-south street
    if (v[0] < 0) if abs(v[0]) >= abs(v[1]) else (v[1] < 0):
        v = -v
    return c, v


def _find_crossings(geoms: list, names: list[str], tol: float) -> dict[int, list[tuple[str, float, float]]]:
    """For each street index: (cross street name, x, y) of every point where another street meets it."""
    tree = shapely.STRtree(geoms)
    gi, gj = tree.query(np.array(geoms, dtype=object), predicate="dwithin", distance=tol)
    keep = gi < gj
    gi, gj = gi[keep], gj[keep]
    out: dict[int, list[tuple[str, float, float]]] = {}
    if not len(gi):
        return out
    ga, gb = np.array(geoms, dtype=object)[gi], np.array(geoms, dtype=object)[gj]
    inter = shapely.intersection(ga, gb)
    empty = shapely.is_empty(inter)
    near = shapely.shortest_line(ga[empty], gb[empty]) if empty.any() else np.array([], dtype=object)
    near_iter = iter(near)
    for i, j, geom, is_empty in zip(gi, gj, inter, empty):
        if is_empty:  # a near miss within the tolerance: the two closest points
            c = np.asarray(next(near_iter).coords)
            out.setdefault(i, []).append((names[j], float(c[0, 0]), float(c[0, 1])))
            out.setdefault(j, []).append((names[i], float(c[1, 0]), float(c[1, 1])))
            continue
        pts = []
        for part in shapely.get_parts(geom):
            if isinstance(part, Point):
                pts.append((part.x, part.y))
            elif isinstance(part, LineString) and not part.is_empty:  # overlapping ways: both ends
                c = np.asarray(part.coords)
                pts += [tuple(c[0]), tuple(c[-1])]
        for x, y in pts:
            out.setdefault(i, []).append((names[j], float(x), float(y)))
            out.setdefault(j, []).append((names[i], float(x), float(y)))
    return out


def _split_component(line: LineString, crossings, gap: float, tol: float) -> tuple[list[tuple[float, str]], int]:
    """Boundaries (position along the line, cross-street name or "") and the number of dropped split points."""
    length = line.length
    # boundary = [position, names]; the two ends are fixed
    inner: dict[tuple[str, int], float] = {}
    for name, x, y in crossings:
        p = Point(x, y)
        if line.distance(p) <= tol:
            pos = line.project(p)
            inner.setdefault((name, int(round(pos * 10))), pos)  # the same crossing reported twice counts once
    bounds = [[0.0, [], True]] + sorted([[pos, [name], False] for (name, _), pos in inner.items()]) + [[length, [], True]]
    dropped = 0
    while len(bounds) > 2:
        gaps = [
            (bounds[k + 1][0] - bounds[k][0], k)
            for k in range(len(bounds) - 1)
            if not (bounds[k][2] and bounds[k + 1][2])
        ]
        g, k = min(gaps)
        if g >= gap:
            break
        a, b = bounds[k], bounds[k + 1]
        if a[1] and b[1]:
            dropped += 1
        if a[2]:  # merge into the fixed end
            a[1] += b[1]
            del bounds[k + 1]
        elif b[2]:
            b[1] = a[1] + b[1]
            del bounds[k]
        else:
            na, nb = max(len(a[1]), 1), max(len(b[1]), 1)
            bounds[k] = [(a[0] * na + b[0] * nb) / (na + nb), a[1] + b[1], False]
            del bounds[k + 1]
    return [(pos, Counter(names).most_common(1)[0][0] if names else "") for pos, names, _ in bounds], dropped


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def split_streets(network: StreetNetwork, config: SubStreetConfig | None = None) -> tuple[list[Piece], dict]:
    """All streets cut at their intersections: the pieces (UTM) and counts (intersections, dropped)."""
    cfg = config or SubStreetConfig()
    lines = _street_lines_utm(network)
    names = sorted(lines)
    geoms = [MultiLineString([ln for ln in lines[n]]) for n in names]
    crossings = _find_crossings(geoms, names, cfg.snap_tolerance_m)
    pieces: list[Piece] = []
    n_split = n_dropped = 0
    for si, name in enumerate(names):
        centre, axis = _principal_axis(lines[name])
        # union first: overlapping duplicate ways (one per direction, tram + road...) dissolve into one line
        merged = shapely.line_merge(shapely.union_all(geoms[si]))
        comps = sorted(shapely.get_parts(merged), key=lambda g: float((np.asarray(g.coords).mean(axis=0) - centre) @ axis))
        for rank, comp in enumerate(comps):
            c = np.asarray(comp.coords)
            if (c[-1] - c[0]) @ axis < 0:
                comp = shapely.reverse(comp)
            bounds, dropped = _split_component(comp, crossings.get(si, []), cfg.min_intersection_gap_m, cfg.snap_tolerance_m)
            n_dropped += dropped
            n_split += len(bounds) - 2
            for (p0, n0), (p1, n1) in zip(bounds[:-1], bounds[1:]):
                if p1 - p0 <= 1e-6:
                    continue
                seg = substring(comp, p0, p1)
                if not isinstance(seg, LineString) or seg.length <= 1e-6:
                    continue
                sc = np.asarray(seg.coords)
                a0, a1 = float((sc[0] - centre) @ axis), float((sc[-1] - centre) @ axis)
                if a1 < a0:  # a loop's way back: keep every piece pointing along the street
                    seg, n0, n1, a0, a1 = shapely.reverse(seg), n1, n0, a1, a0
                pieces.append(Piece(name, seg, n0, n1, a0, a1, (rank, float(p0))))
    stats = {"streets": len(names), "crossings": int(sum(len(v) for v in crossings.values()) // 2),
             "split_points": n_split, "dropped_intersections": n_dropped}
    if cfg.parallel_merge_m > 0:
        pieces, stats["parallel_cuts"], stats["parallel_site_merges"] = _align_parallel_ways(pieces, cfg)
    stats["pieces"] = len(pieces)
    return pieces, stats


# --------------------------------------------------------------------------------------------------
# parallel ways of one street (dual carriageways): one set of split points


def _direction(geom: LineString, s: float, half: float = 15.0) -> np.ndarray:
    """Unit direction of the line around position s (over +-half metres: junction flares bend the last metres)."""
    a, b = geom.interpolate(max(s - half, 0.0)), geom.interpolate(min(s + half, geom.length))
    v = np.array([b.x - a.x, b.y - a.y])
    n = float(np.hypot(*v))
    return v / n if n > 1e-9 else np.array([1.0, 0.0])


def _is_loop_turn(ps: list[Piece], e: int, j: int, xy: np.ndarray, tol: float) -> bool:
    """Whether piece j meets the unnamed end e of another piece with an unnamed end of its own (the two
    halves of a closed loop meeting where nothing crosses), rather than part-way or at a crossing."""
    for f in (2 * j, 2 * j + 1):
        if np.hypot(*(xy[f] - xy[e])) <= tol:
            return not (ps[j].start if f % 2 == 0 else ps[j].end)
    return False


def _parallel_pairs(geoms: np.ndarray, tree, distance: float, step: float = 10.0) -> set[tuple[int, int]]:
    """Index pairs (i < j) of pieces running alongside each other: at least half of one of them lies
    within `distance` of the other, beside it (sampled every `step` metres)."""
    gi, gj = tree.query(geoms, predicate="dwithin", distance=distance)
    out: set[tuple[int, int]] = set()
    for i, j in zip(gi.tolist(), gj.tolist()):
        if i >= j:
            continue
        for a, b in ((i, j), (j, i)):
            g = geoms[a]
            n = max(2, int(np.ceil(g.length / step)) + 1)
            samples = shapely.line_interpolate_point(g, np.linspace(0.0, g.length, n))
            # beside, not beyond: a sample counts where its nearest point on the other piece is inside
            # it (a piece carrying on in line from the other's end is not a parallel way)
            at = shapely.line_locate_point(geoms[b], samples)
            beside = (shapely.distance(samples, geoms[b]) <= distance) & (at > 1e-6) & (at < geoms[b].length - 1e-6)
            if float(np.mean(beside)) >= 0.5:
                out.add((i, j))
                break
    return out


def _align_parallel_ways(pieces: list[Piece], cfg: SubStreetConfig) -> tuple[list[Piece], int, int]:
    """Gives the parallel ways of each street (both carriageways of a dual road) one set of split points.

    A split point of one way (a crossing, at a piece end) lying beside another way of the same street
    (within `parallel_merge_m`, the two running in the same direction there) is the same split point for
    that way: where the other way already has a split point within `min_intersection_gap_m`, the two
    are one split point (the cross street named by most of its members, then alphabetically: on a dual
    road the two sides are often bounded by different streets); otherwise the other way is cut there.
    Pieces of the two ways between the same split points then carry the same label and become one
    sub-street. Returns (pieces, cuts added, split points merged).
    """
    cos_parallel = float(np.cos(np.radians(35.0)))
    out: list[Piece] = []
    n_cuts = n_merged = 0
    by_street: dict[str, list[int]] = {}
    for i, p in enumerate(pieces):
        by_street.setdefault(p.street, []).append(i)
    for street, idx in by_street.items():
        ps = [pieces[i] for i in idx]
        if len(ps) < 2:
            out += ps
            continue
        # sites: the named ends of the pieces; site ids 2k (start of piece k) and 2k+1 (end)
        names = [n for p in ps for n in (p.start, p.end)]
        xy = np.array([c for p in ps for c in (p.geom.coords[0], p.geom.coords[-1])], dtype=np.float64)[:, :2]
        uf = _UnionFind(len(names))
        geoms = np.array([p.geom for p in ps], dtype=object)
        tree = shapely.STRtree(geoms)
        site_ids = [k for k, n in enumerate(names) if n]
        parallel = _parallel_pairs(geoms, tree, cfg.parallel_merge_m)
        # an unnamed end touching no other piece of the street but the ways alongside it (a loop's
        # U-turn) is a dead end; one touching a way that carries on is a fork, joined later
        ends = shapely.points(xy)
        ei, ej = tree.query(ends, predicate="dwithin", distance=cfg.snap_tolerance_m)
        touching: dict[int, set[int]] = {}
        for e, j in zip(ei.tolist(), ej.tolist()):
            if e // 2 != j:
                touching.setdefault(e, set()).add(j)
        dead_end = np.ones(len(names), dtype=bool)
        for e, js in touching.items():
            if all((min(e // 2, j), max(e // 2, j)) in parallel for j in js):
                continue  # only the way alongside: the U-turn at the end of a dual carriageway
            # a closed loop cut open where nothing crosses leaves two unnamed ends meeting: a U-turn too
            dead_end[e] = len(js) == 1 and _is_loop_turn(ps, e, next(iter(js)), xy, cfg.snap_tolerance_m)
        cuts: dict[int, list[tuple[float, int]]] = {}
        free_names: dict[int, list[int]] = {}  # dead ends beside another way's split point
        if site_ids:
            pts = shapely.points(xy[site_ids])
            # the same crossing seen from the two pieces it separates: one site
            qa, qb = shapely.STRtree(pts).query(pts, predicate="dwithin", distance=cfg.snap_tolerance_m)
            for u, v in zip(qa.tolist(), qb.tolist()):
                uf.union(site_ids[u], site_ids[v])
            # a junction flare bends a carriageway away near its ends: split points count up to twice
            # the parallel distance away from a way running alongside theirs
            qi, pj = tree.query(pts, predicate="dwithin", distance=2.0 * cfg.parallel_merge_m)
            for q, j in zip(qi.tolist(), pj.tolist()):
                k = site_ids[q]
                own, g = k // 2, ps[j].geom
                if j == own or (min(own, j), max(own, j)) not in parallel:
                    continue
                pt = pts[q]
                if float(g.distance(pt)) <= cfg.snap_tolerance_m:
                    continue  # an end of that piece (handled above) or a crossing it shares
                s = float(g.project(pt))
                own_geom = ps[own].geom
                # the way's heading over its first 50 m from the split point: slip roads turn in the first metres
                reach = min(50.0, own_geom.length)
                d_own = _direction(own_geom, reach / 2 if k % 2 == 0 else own_geom.length - reach / 2, half=reach / 2)
                if abs(float(d_own @ _direction(g, s))) < cos_parallel:
                    continue  # a way of the same name meeting at an angle (a branch), not a parallel one
                length = g.length
                if s < cfg.min_intersection_gap_m or length - s < cfg.min_intersection_gap_m:
                    e = 2 * j if s <= length - s else 2 * j + 1
                    if names[e]:
                        uf.union(k, e)  # the other way's split point opposite this one
                    elif not dead_end[e]:
                        pass  # a fork where the ways join: joined to the single way later
                    else:
                        free_names.setdefault(e, []).append(k)
                    continue
                cuts.setdefault(j, []).append((s, k))
        # one name per group of merged split points
        groups: dict[int, list[int]] = {}
        for k in site_ids:
            groups.setdefault(uf.find(k), []).append(k)
        group_name: dict[int, str] = {}
        for root, members in groups.items():
            count = Counter(names[k] for k in members)
            group_name[root] = min(count, key=lambda n: (-count[n], n))
            n_merged += len(count) > 1
        def name_of(k: int) -> str:
            if names[k]:
                return group_name[uf.find(k)]
            if k in free_names:  # a dead end opposite another way's split point is bounded by it
                cnt = Counter(group_name[uf.find(q)] for q in free_names[k])
                return min(cnt, key=lambda n: (-cnt[n], n))
            return ""

        for j, p in enumerate(ps):
            cj = sorted(cuts.get(j, []))
            merged_cuts: list[list] = []
            for s, k in cj:  # cuts closer than the gap rule allows are one cut (one name)
                if merged_cuts and s - merged_cuts[-1][0][-1] < cfg.min_intersection_gap_m:
                    merged_cuts[-1][0].append(s)
                    merged_cuts[-1][1].append(k)
                else:
                    merged_cuts.append([[s], [k]])
            bounds = [(0.0, name_of(2 * j))]
            for ss, ks in merged_cuts:
                cnt = Counter(name_of(k) for k in ks)
                bounds.append((float(np.mean(ss)), min(cnt, key=lambda n: (-cnt[n], n))))
            bounds.append((p.geom.length, name_of(2 * j + 1)))
            n_cuts += len(bounds) - 2
            span = p.end_proj - p.start_proj
            for (s0, n0), (s1, n1) in zip(bounds[:-1], bounds[1:]):
                seg = p.geom if len(bounds) == 2 else substring(p.geom, s0, s1)
                if not isinstance(seg, LineString) or seg.length <= 1e-6:
                    continue
                f0, f1 = s0 / p.geom.length, s1 / p.geom.length
                out.append(Piece(street, seg, n0, n1, p.start_proj + f0 * span, p.start_proj + f1 * span,
                                 (p.order[0], p.order[1] + s0)))
    return out, n_cuts, n_merged


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
        self.uf = _UnionFind(len(pieces))
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


def _merge_same_labels(units: _Units) -> int:
    """Units of one street with the same cross streets (dual carriageways...) become one; returns merges."""
    merged = 0
    seen: dict[tuple, int] = {}
    for root, members in units.groups().items():
        key = (units.pieces[root].street, frozenset(units.label(members)))
        if key in seen:
            units.uf.union(seen[key], root)
            merged += 1
            seen[key] = units.uf.find(root)
        else:
            seen[key] = root
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
            small = [(count[r], r) for r in groups if r not in blocked and count[r] < cfg.min_points]
            if not small or len(groups) < 2:
                break
            _, root = min(small)
            dists = [(float(shapely.distance(geom[root], geom[r])), count[r], r) for r in groups if r != root]
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


# --------------------------------------------------------------------------------------------------
# neighbourhoods


def load_zones(path: str | Path, network: StreetNetwork, name_property: str = "name") -> tuple[list, list[str]]:
    """Polygons (UTM) and names of a zone layer: a GeoJSON FeatureCollection of (Multi)Polygons."""
    from shapely.geometry import shape

    path = Path(path)
    try:
        fc = json.loads(path.read_text(encoding="utf-8"))
        feats = fc["features"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ZoneFileError(f"{path}: cannot read as a GeoJSON FeatureCollection ({type(e).__name__}: {e})") from None
    polys, names = [], []
    for i, f in enumerate(feats):
        try:
            geom = shape(f["geometry"])
        except Exception as e:  # shapely raises several types for malformed geometry
            raise ZoneFileError(f"{path}: feature {i}: bad geometry ({e})") from None
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        name = str((f.get("properties") or {}).get(name_property) or "")
        if not name:
            raise ZoneFileError(f"{path}: feature {i}: no {name_property!r} property")
        polys.append(shapely.transform(geom, lambda xy: np.stack(network.to_utm(xy[:, 0], xy[:, 1]), axis=1)))
        names.append(name)
    if not polys:
        raise ZoneFileError(f"{path}: no Polygon/MultiPolygon features")
    return polys, names


def _in_polygons(points_xy: np.ndarray, polys: list, names: list[str], out: list[str]) -> None:
    """Fills empty entries of `out` with the name of the smallest polygon containing the point."""
    tree = shapely.STRtree(polys)
    pi, zi = tree.query(shapely.points(points_xy), predicate="within")
    area = shapely.area(np.array(polys, dtype=object))
    best: dict[int, int] = {}
    for p, z in zip(pi.tolist(), zi.tolist()):
        if not out[p] and (p not in best or area[z] < area[best[p]]):
            best[p] = z
    for p, z in best.items():
        out[p] = names[z]


def _neighbourhoods(points_xy: np.ndarray, network: StreetNetwork, cfg: SubStreetConfig, zones=None) -> list[str]:
    """Zone layer first, then the network's place / boundary areas, then the nearest place node."""
    n = len(points_xy)
    out = [""] * n
    if n == 0:
        return out
    if zones is not None:
        _in_polygons(points_xy, *zones, out)
    kinds = set(cfg.kinds)
    areas = [a for a in network.areas if a.kind in kinds]
    if areas:
        to_utm = lambda xy: np.stack(network.to_utm(xy[:, 0], xy[:, 1]), axis=1)  # noqa: E731
        _in_polygons(points_xy, [shapely.transform(a.polygon, to_utm) for a in areas], [a.name for a in areas], out)
    places = [p for p in network.places if p.kind in kinds]
    if places:
        px, py = network.to_utm([p.lon for p in places], [p.lat for p in places])
        d = np.hypot(points_xy[:, :1] - px[None, :], points_xy[:, 1:2] - py[None, :])
        j = d.argmin(axis=1)
        for i in range(n):
            if not out[i] and d[i, j[i]] <= cfg.neighbourhood_max_distance_m:
                out[i] = places[j[i]].name
    return out


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
    stats["same_label_merges"] = _merge_same_labels(units)
    stats["small_merges"] = _merge_small(units, cfg)
    stats["same_label_merges"] += _merge_same_labels(units)

    groups = units.groups()
    by_street: dict[str, list[int]] = {}
    for root, members in groups.items():
        if units.count(members) == 0:
            continue  # a stretch of street with no images is not a class of the dataset
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
            sub_streets.append(SubStreet(f"{street}/{k}", street, units.label(groups[r]), geom, units.count(groups[r]), "", city))

    point_sub = np.full(len(x), -1, dtype=np.int64)
    ok = point_piece >= 0
    if ok.any():
        piece_root = np.array([units.uf.find(i) for i in range(len(pieces))], dtype=np.int64)
        lut = np.full(len(pieces), -1, dtype=np.int64)
        for r, s in root_to_sub.items():
            lut[r] = s
        point_sub[ok] = lut[piece_root[point_piece[ok]]]

    # neighbourhood of each sub-street: where its images are (their mean position)
    if sub_streets:
        sel = point_sub >= 0
        n_sub = len(sub_streets)
        cnt = np.bincount(point_sub[sel], minlength=n_sub)
        mx = np.bincount(point_sub[sel], weights=x[sel], minlength=n_sub) / np.maximum(cnt, 1)
        my = np.bincount(point_sub[sel], weights=y[sel], minlength=n_sub) / np.maximum(cnt, 1)
        hoods = _neighbourhoods(np.stack([mx, my], axis=1), network, cfg, zones)
        for s, hood in zip(sub_streets, hoods):
            s.neighbourhood = hood
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
    from clip_stage.core.schema import address_columns

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
