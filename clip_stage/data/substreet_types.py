"""The sub-street partition's configuration and its data: pieces of streets, labelled sub-streets, the result.

Shared by the steps of the partition (clip_stage.data.street_pieces, clip_stage.data.neighbourhoods,
clip_stage.data.substreets) and by build-dataset, which takes SubStreetConfig from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import LineString, MultiLineString

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
