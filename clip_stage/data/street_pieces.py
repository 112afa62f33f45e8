"""Splitting every street at its crossings (steps 1-2 of the sub-street partition, see clip_stage.data.substreets).

`split_streets(network, config)` merges the ways of one street name into polylines oriented along the
street's principal axis, finds all crossings with other named streets at once (an STRtree query +
vectorised `shapely.intersection`), merges split points closer than `min_intersection_gap_m`, and makes
parallel ways of one street (dual carriageways) share one set of split points; it returns the pieces
between consecutive split points.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import shapely
from shapely.geometry import LineString, MultiLineString, Point
from shapely.ops import substring

from clip_stage.data.network import StreetNetwork
from clip_stage.data.substreet_types import Piece, SubStreetConfig


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


def _find_crossings(geoms: list, names: list[str], tol: float) -> dict[int, list[tuple[str, float, float, float]]]:
    """For each street index: (cross street name, x, y, squareness) of every point where another street meets it.

    Ways are compared one pair at a time, so a way that stops just short of another (a near miss within
    `tol`, common where ways share no node) counts even where the two streets also cross elsewhere.
    squareness = |sin| of the angle between the two ways there: ~1 for a street crossing or ending in a T,
    ~0 for a street that carries on in line under another name (a continuation is not a cross street).
    """
    parts, owner = shapely.get_parts(np.array(geoms, dtype=object), return_index=True)
    tree = shapely.STRtree(parts)
    pi, pj = tree.query(parts, predicate="dwithin", distance=tol)
    keep = owner[pi] < owner[pj]
    pi, pj = pi[keep], pj[keep]
    out: dict[int, list[tuple[str, float, float, float]]] = {}
    if not len(pi):
        return out
    ga, gb = parts[pi], parts[pj]
    inter = shapely.intersection(ga, gb)
    empty = shapely.is_empty(inter)
    near = shapely.shortest_line(ga[empty], gb[empty]) if empty.any() else np.array([], dtype=object)
    near_iter = iter(near)

    def add(a: LineString, b: LineString, i: int, j: int, pa: tuple[float, float], pb: tuple[float, float]) -> None:
        da, db = _direction(a, a.project(Point(pa)), half=10.0), _direction(b, b.project(Point(pb)), half=10.0)
        square = float(abs(da[0] * db[1] - da[1] * db[0]))
        out.setdefault(i, []).append((names[j], pa[0], pa[1], square))
        out.setdefault(j, []).append((names[i], pb[0], pb[1], square))

    for a, b, i, j, geom, is_empty in zip(ga, gb, owner[pi].tolist(), owner[pj].tolist(), inter, empty):
        if is_empty:  # a near miss within the tolerance: the two closest points
            c = np.asarray(next(near_iter).coords)
            add(a, b, i, j, (float(c[0, 0]), float(c[0, 1])), (float(c[1, 0]), float(c[1, 1])))
            continue
        pts = []
        for part in shapely.get_parts(geom):
            if isinstance(part, Point):
                pts.append((part.x, part.y))
            elif isinstance(part, LineString) and not part.is_empty:  # overlapping ways: both ends
                c = np.asarray(part.coords)
                pts += [tuple(c[0]), tuple(c[-1])]
        for x, y in pts:
            add(a, b, i, j, (float(x), float(y)), (float(x), float(y)))
    return out


def _split_component(line: LineString, crossings, gap: float, tol: float) -> tuple[list[tuple[float, str]], int]:
    """Boundaries (position along the line, cross-street name or "") and the number of dropped split points.

    A boundary where several streets meet is named by the one crossing most squarely (summed over its
    reports: both carriageways of a dual road count twice), so a street carrying on in line under another
    name loses to the street that crosses there; ties go to the first along the street.
    """
    length = line.length
    closed = line.is_closed and length > 0
    inner: dict[tuple[str, int], tuple[float, float]] = {}
    for name, x, y, square in crossings:
        p = Point(x, y)
        if line.distance(p) <= tol:
            pos = line.project(p)
            at = [pos]
            if closed and min(pos, length - pos) <= tol:
                at = [0.0, length]  # a street meeting a ring (roundabout) where it is closed bounds both ends
            for a in at:
                inner.setdefault((name, int(round(a * 10))), (a, square))  # one crossing reported twice counts once
    # boundary = [position, [(name, squareness)...], fixed end?]
    bounds = [[0.0, [], True]] + sorted([[a, [(name, sq)], False] for (name, _), (a, sq) in inner.items()]) + [[length, [], True]]
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
    return [(pos, _boundary_name(members)) for pos, members, _ in bounds], dropped


def _boundary_name(members: list[tuple[str, float]]) -> str:
    """The street crossing a boundary most squarely (see _split_component); "" for none."""
    weight: dict[str, float] = {}
    for name, square in members:
        weight[name] = weight.get(name, 0.0) + max(square, 1e-3)  # a lone continuation still names its end
    return min(weight, key=lambda n: -round(weight[n], 6)) if weight else ""  # ties: the first along the street


class UnionFind:
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
        uf = UnionFind(len(names))
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
