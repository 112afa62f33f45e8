"""Offline reverse geocoding: GPS points -> the named street they were taken on, with voting.

This plays the role of the paper's reverse-geocoding API + voting, without a network connection:

1. every road way is cut into straight segments in UTM metres and put in a shapely STRtree;
2. one vectorised tree query finds, for all points at once, the segments within `search_radius_m`;
3. each candidate street gets a distance-weighted vote: the integral of a Gaussian kernel
   (`sigma_m`) along its segments near the point (closed form with erf), so a through street at a
   T-junction outweighs the street that ends there, and the vote does not depend on how a street
   happens to be cut into OSM segments;
4. the street with the largest vote share wins, unless the nearest street is farther than
   `max_distance_m` ("far_from_street") or the two best shares differ by less than
   `ambiguity_margin` ("ambiguous", e.g. the middle of a crossing).

    geocoder = ReverseGeocoder(load_street_network("city.osm.pbf"))
    result = geocoder.geocode(lons, lats)       # GeocodeResult of arrays, one entry per point

No Python loop runs over streets or points; 100k points take about a second (scripts/bench_geocode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from scipy.special import erf

from clip_stage.data.network import StreetNetwork

FAR_FROM_STREET = "far_from_street"
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class GeocodeConfig:
    """Reverse geocoding: candidate search, distance-weighted voting and rejection thresholds."""

    search_radius_m: float = 50.0
    """Streets with a segment within this distance of a point are candidates (metres)."""
    max_distance_m: float = 30.0
    """A point whose nearest named street is farther than this is rejected as far_from_street (metres)."""
    sigma_m: float = 10.0
    """Width of the Gaussian distance kernel of the votes (metres; about the GPS error)."""
    ambiguity_margin: float = 0.1
    """Reject as ambiguous when the best two streets' vote shares differ by less than this (0-1)."""

    def __post_init__(self):
        if not (self.sigma_m > 0 and self.search_radius_m > 0 and self.max_distance_m > 0):
            raise ValueError(f"GeocodeConfig: sigma_m, search_radius_m and max_distance_m must be > 0, got {self}")
        if self.max_distance_m > self.search_radius_m:
            raise ValueError(
                f"GeocodeConfig: max_distance_m ({self.max_distance_m}) must be <= search_radius_m ({self.search_radius_m})"
            )
        if not 0 <= self.ambiguity_margin < 1:
            raise ValueError(f"GeocodeConfig: ambiguity_margin must be in [0, 1), got {self.ambiguity_margin}")


@dataclass
class GeocodeResult:
    """Per-point arrays (length n). Rejected points have street_id -1, street "" and a reason."""

    street_id: np.ndarray  # int64 index into `names`, -1 if rejected
    street: np.ndarray  # object array of str
    distance_m: np.ndarray  # distance to the nearest segment of the chosen (or nearest) street; inf if none
    share: np.ndarray  # vote share of the chosen street (0-1)
    margin: np.ndarray  # share of the best minus share of the runner-up
    reason: np.ndarray  # object array: "" (kept), "far_from_street", "ambiguous"
    names: list[str]

    @property
    def ok(self) -> np.ndarray:
        return self.street_id >= 0


class SegmentIndex:
    """Straight segments of many polylines (UTM metres), each tagged with an integer label, in an STRtree."""

    def __init__(self, lines: list[np.ndarray], labels: np.ndarray):
        a_parts, b_parts, lab_parts = [], [], []
        for line, lab in zip(lines, np.asarray(labels)):
            line = np.asarray(line, dtype=np.float64)
            if len(line) < 2:
                continue
            a_parts.append(line[:-1])
            b_parts.append(line[1:])
            lab_parts.append(np.full(len(line) - 1, lab, dtype=np.int64))
        a = np.concatenate(a_parts) if a_parts else np.zeros((0, 2))
        b = np.concatenate(b_parts) if b_parts else np.zeros((0, 2))
        lab = np.concatenate(lab_parts) if lab_parts else np.zeros(0, dtype=np.int64)
        keep = np.hypot(*(b - a).T) > 1e-9  # zero-length segments have no direction
        self.a, self.b, self.label = a[keep], b[keep], lab[keep]
        self.tree = shapely.STRtree(shapely.linestrings(np.stack([self.a, self.b], axis=1)))

    def __len__(self) -> int:
        return len(self.label)

    def candidates(self, x: np.ndarray, y: np.ndarray, radius: float):
        """All (point index, segment index) pairs within `radius`, with the point-segment geometry.

        Returns pi, si, dist (to the segment), h (to its supporting line), t (foot of the
        perpendicular along the segment, metres from its start) and seg_len.
        """
        pts = shapely.points(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        pi, si = self.tree.query(pts, predicate="dwithin", distance=radius)
        p = np.stack([np.asarray(x, dtype=np.float64)[pi], np.asarray(y, dtype=np.float64)[pi]], axis=1)
        a, d = self.a[si], self.b[si] - self.a[si]
        seg_len = np.hypot(d[:, 0], d[:, 1])
        u = d / seg_len[:, None]
        ap = p - a
        t = ap[:, 0] * u[:, 0] + ap[:, 1] * u[:, 1]
        h = np.abs(ap[:, 0] * u[:, 1] - ap[:, 1] * u[:, 0])
        tc = np.clip(t, 0.0, seg_len)
        dist = np.hypot(h, t - tc)
        return pi, si, dist, h, t, seg_len

    def nearest_label(self, x, y, radius: float, allowed: np.ndarray | None = None, label_group: np.ndarray | None = None):
        """For each point, the label of its nearest segment within `radius` (-1 if none) and the distance.

        With `allowed` (per point) and `label_group` (per label), only labels whose group equals the
        point's `allowed` value are considered (e.g. sub-street pieces of the point's own street).
        """
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        n = len(x)
        best = np.full(n, -1, dtype=np.int64)
        best_d = np.full(n, np.inf)
        step = 65_536  # points per slice: the candidate pairs of a million points at once need gigabytes
        for s in range(0, n, step):
            pi, si, dist, *_ = self.candidates(x[s : s + step], y[s : s + step], radius)
            lab = self.label[si]
            if allowed is not None:
                keep = label_group[lab] == np.asarray(allowed)[s : s + step][pi]
                pi, lab, dist = pi[keep], lab[keep], dist[keep]
            if len(pi):
                order = np.lexsort((dist, pi))
                pi, lab, dist = pi[order] + s, lab[order], dist[order]
                first = np.r_[True, pi[1:] != pi[:-1]]
                best[pi[first]] = lab[first]
                best_d[pi[first]] = dist[first]
        return best, best_d


class ReverseGeocoder:
    """Vectorised point -> street-name geocoder over one StreetNetwork."""

    def __init__(self, network: StreetNetwork, config: GeocodeConfig | None = None):
        self.network = network
        self.config = config or GeocodeConfig()
        self.names = sorted({w.name for w in network.ways})
        name_idx = {n: i for i, n in enumerate(self.names)}
        # project every vertex of every way in one call, then cut back into ways
        lens = np.array([len(w.coords) for w in network.ways])
        allc = np.concatenate([w.coords for w in network.ways])
        x, y = network.to_utm(allc[:, 0], allc[:, 1])
        xy = np.stack([x, y], axis=1)
        self.lines_utm = np.split(xy, np.cumsum(lens)[:-1])
        labels = np.array([name_idx[w.name] for w in network.ways], dtype=np.int64)
        self.index = SegmentIndex(self.lines_utm, labels)

    def geocode(self, lon, lat) -> GeocodeResult:
        x, y = self.network.to_utm(lon, lat)
        return self.geocode_xy(x, y)

    def geocode_xy(self, x, y) -> GeocodeResult:
        cfg = self.config
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        n = len(x)
        n_names = len(self.names)
        pi, si, dist, h, t, seg_len = self.index.candidates(x, y, cfg.search_radius_m)
        # Gaussian kernel integrated along each segment (closed form): vote of that piece of street
        s2 = cfg.sigma_m * np.sqrt(2.0)
        w = np.exp(-0.5 * (h / cfg.sigma_m) ** 2) * (erf((seg_len - t) / s2) - erf(-t / s2))
        w = np.maximum(w, 1e-300)  # a candidate never has exactly zero weight
        name = self.index.label[si]
        key = pi * n_names + name
        uniq, inv = np.unique(key, return_inverse=True)
        vote = np.bincount(inv, weights=w, minlength=len(uniq))
        dmin = np.full(len(uniq), np.inf)
        np.minimum.at(dmin, inv, dist)
        upi, uname = uniq // n_names, uniq % n_names
        total = np.bincount(upi, weights=vote, minlength=n)
        share = vote / total[upi]
        # nearest street distance per point (for far_from_street)
        nearest = np.full(n, np.inf)
        np.minimum.at(nearest, upi, dmin)
        # best and runner-up share per point
        order = np.lexsort((-share, upi))
        upi_o, share_o, name_o, dmin_o = upi[order], share[order], uname[order], dmin[order]
        first = np.r_[True, upi_o[1:] != upi_o[:-1]] if len(upi_o) else np.zeros(0, dtype=bool)
        second = np.r_[False, ~first[1:]] & np.r_[True, first[:-1]] if len(upi_o) else first
        best_share = np.zeros(n)
        best_name = np.full(n, -1, dtype=np.int64)
        best_dist = np.full(n, np.inf)
        best_share[upi_o[first]] = share_o[first]
        best_name[upi_o[first]] = name_o[first]
        best_dist[upi_o[first]] = dmin_o[first]
        runner = np.zeros(n)
        runner[upi_o[second]] = share_o[second]
        margin = best_share - runner

        reason = np.full(n, "", dtype=object)
        far = ~(nearest <= cfg.max_distance_m)  # also catches points with no candidate (inf) and NaN
        amb = ~far & (margin < cfg.ambiguity_margin)
        reason[far] = FAR_FROM_STREET
        reason[amb] = AMBIGUOUS
        street_id = np.where(far | amb, -1, best_name)
        names_arr = np.array(self.names + [""], dtype=object)
        street = names_arr[street_id]  # -1 -> ""
        return GeocodeResult(
            street_id=street_id,
            street=street,
            distance_m=np.where(far, nearest, best_dist),
            share=best_share,
            margin=margin,
            reason=reason,
            names=self.names,
        )


def naive_geocode_xy(lines_utm: list[np.ndarray], names: list[str], x, y, config: GeocodeConfig | None = None):
    """Reference implementation: a Python loop over points, each scanning every segment of every street.

    Same voting rule as ReverseGeocoder (used by the benchmark and the tests to check the fast path).
    Returns a list of (street or "", reason) per point.
    """
    cfg = config or GeocodeConfig()
    segs = []
    for line, name in zip(lines_utm, names):
        for (ax, ay), (bx, by) in zip(line[:-1], line[1:]):
            ln = float(np.hypot(bx - ax, by - ay))
            if ln > 1e-9:
                segs.append((name, ax, ay, (bx - ax) / ln, (by - ay) / ln, ln))
    s2 = cfg.sigma_m * np.sqrt(2.0)
    from math import erf as merf
    from math import exp, hypot

    out = []
    for px, py in zip(np.asarray(x, dtype=float), np.asarray(y, dtype=float)):
        votes: dict[str, float] = {}
        dmin: dict[str, float] = {}
        for name, ax, ay, ux, uy, ln in segs:
            apx, apy = px - ax, py - ay
            t = apx * ux + apy * uy
            h = abs(apx * uy - apy * ux)
            tc = min(max(t, 0.0), ln)
            d = hypot(h, t - tc)
            if d > cfg.search_radius_m:
                continue
            w = max(exp(-0.5 * (h / cfg.sigma_m) ** 2) * (merf((ln - t) / s2) - merf(-t / s2)), 1e-300)
            votes[name] = votes.get(name, 0.0) + w
            dmin[name] = min(dmin.get(name, np.inf), d)
        if not votes or min(dmin.values()) > cfg.max_distance_m:
            out.append(("", FAR_FROM_STREET))
            continue
        total = sum(votes.values())
        ranked = sorted(votes.items(), key=lambda kv: -kv[1])
        margin = ranked[0][1] / total - (ranked[1][1] / total if len(ranked) > 1 else 0.0)
        out.append(("", AMBIGUOUS) if margin < cfg.ambiguity_margin else (ranked[0][0], ""))
    return out
