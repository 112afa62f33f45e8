"""Map of evaluation results: the street network with each test image coloured by whether it was right.

Sub-street lines are grey; a green dot is an image whose top-1 answer was right, a red dot one that was
wrong, with a thin red line from it to the nearest point of the predicted address's geometry (so long
lines are far-off answers). Coordinates are the dataset's UTM metres. Written by `eval-clip`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from clip_stage.core.fs import atomic_write_with


def plain_text(text: str) -> str:
    """`text` as matplotlib draws it literally: an unescaped `$...$` pair would be typeset as mathtext (and a
    malformed one raises), so user text (queries, addresses) gets its dollars escaped."""
    return str(text).replace("$", r"\$")


def _lines(geom: BaseGeometry):
    if geom is None or geom.is_empty:
        return
    if hasattr(geom, "geoms"):
        for g in geom.geoms:
            yield from _lines(g)
    elif geom.geom_type == "Polygon":
        yield np.asarray(geom.exterior.coords)
    else:
        yield np.asarray(geom.coords)


def plot_prediction_map(path: str | Path, sub_street_geoms: dict[str, BaseGeometry], points: np.ndarray,
                        correct: np.ndarray, predicted_geoms: list[BaseGeometry | None] | None = None,
                        title: str = "", metric_name: str = "SSA-1") -> Path:
    """Writes a PNG. points: [N, 2] UTM x/y; correct: [N] bool; predicted_geoms: per image, the top-1 geometry."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from shapely.ops import nearest_points
    import shapely

    path = Path(path)
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    correct = np.asarray(correct, dtype=bool)
    segs = [line for g in sub_street_geoms.values() for line in _lines(g)]
    xs = [s[:, 0] for s in segs] + [points[:, 0]]
    ys = [s[:, 1] for s in segs] + [points[:, 1]]
    x0 = min(float(np.min(x)) for x in xs if len(x)) if any(len(x) for x in xs) else 0.0
    y0 = min(float(np.min(y)) for y in ys if len(y)) if any(len(y) for y in ys) else 0.0

    allx = np.concatenate([x for x in xs if len(x)]) if any(len(x) for x in xs) else np.zeros(1)
    ally = np.concatenate([y for y in ys if len(y)]) if any(len(y) for y in ys) else np.zeros(1)
    aspect = (np.ptp(ally) + 1.0) / (np.ptp(allx) + 1.0)
    fig, ax = plt.subplots(figsize=(8, float(np.clip(8 * aspect + 1.2, 4, 11))), dpi=110)
    ax.add_collection(LineCollection([s - (x0, y0) for s in segs], colors="#9a9a9a", linewidths=1.6, zorder=1))
    if predicted_geoms is not None:
        err = []
        for i in np.nonzero(~correct)[0]:
            g = predicted_geoms[i]
            if g is None:
                continue
            p = shapely.Point(points[i])
            _, q = nearest_points(p, g)
            err.append([[p.x - x0, p.y - y0], [q.x - x0, q.y - y0]])
        if err:
            ax.add_collection(LineCollection(err, colors="#d62728", linewidths=0.6, alpha=0.45, zorder=2))
    rel = points - (x0, y0)
    n_ok = int(correct.sum())
    ax.scatter(rel[~correct, 0], rel[~correct, 1], s=14, c="#d62728", edgecolors="white", linewidths=0.3, zorder=3,
               label=f"wrong ({len(correct) - n_ok})")
    ax.scatter(rel[correct, 0], rel[correct, 1], s=14, c="#2ca02c", edgecolors="white", linewidths=0.3, zorder=4,
               label=f"right ({n_ok})")
    ax.autoscale()
    ax.set_aspect("equal")
    ax.set_xlabel(f"easting - {x0:.0f} (m)")
    ax.set_ylabel(f"northing - {y0:.0f} (m)")
    ax.set_title(title or f"{metric_name}: {n_ok}/{len(correct)}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title=f"top-1 ({metric_name})", title_fontsize=8)
    ax.grid(alpha=0.2)
    fig.tight_layout()
    try:  # bbox_inches="tight" keeps the legend outside the axes
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return path
