"""`query-map`: where AddressCLIP "sees" an address, drawn as every image's similarity to one address text on the map.

    address-llava query-map --checkpoint runs/clip --dataset data/demo --query "Kamppi, Helsinki" --out runs/qmap
    address-llava query-map --checkpoint runs/clip --dataset data/demo --out runs/qmap \
        --query "Kamppi, Helsinki" --query Mannerheimintie --query "Mannerheimintie between A and B"
    address-llava query-map --model addressclip-tiny --dataset data/demo --query "..." --out ...  # zero-shot

The paper's qualitative result as a tool. Each image of `--split` (default test) is encoded once; each
`--query` text (any level: neighbourhood, street, sub-street, or free wording) is encoded, and the cosine
similarity of every image to it is drawn as a coloured dot at the image's UTM position over the grey
street network. The query is also matched against the dataset's own address fields (`AddressIndex`) to
find the area it names: exact match after normalisation (case, accents, punctuation, '&' = 'and') on a
city, neighbourhood, street or sub-street name or any stored/renderable address style; else the names
the wording contains (streets in a neighbourhood intersect); else the closest name within a fuzzy
threshold (rapidfuzz); else "no geometry matched" and no outline. That area is outlined: its sub-street
lines for a street or sub-street, the convex hull of its sub-streets for a neighbourhood or city.

How well the activation matches the area: ROC-AUC of the similarity as a score for "this image lies in
the area" (its sub_street is in the matched set): the probability that a random image inside scores
higher than a random image outside (1 = perfect, 0.5 = chance), with the mean similarity inside and
outside and both counts. Writes to `--out`: `query_map.png` (one query) or `query_map-<slug>.png` (one
per query, slug of its text), and `query_map.json` (per query: text, level, matched name and
sub-streets, AUC, means, counts, PNG name), each file atomically. A rerun into the same folder replaces
its content: maps of earlier queries that the new query_map.json does not list are removed (only the maps
this command wrote, as its marker and the earlier query_map.json name them; a killed run's are removed by
the next). Errors are one line, `query-map: error: ...`, exit 2, checked before the model loads.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clip_stage.core.config import ArgumentParser, add_dataclass_args, asdict, dataclass_from_args
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, atomic_write_with
from clip_stage.core.outdir import MARKER_FILE, check_out_dir, write_marker
from clip_stage.core.schema import (ADDRESS_STYLES, SPLITS, STORED_STYLES, DatasetPaths, read_records, read_sub_streets,
                                     render_address)
from clip_stage.evaluate import encode_images
from clip_stage.gallery import city_addresses, encode_texts
from clip_stage.geo_metrics import sub_street_geometries_utm
from clip_stage.model import add_model_source_args, bundle_from_args
from clip_stage.plots import _lines, plain_text

JSON_FILE = "query_map.json"
SINGLE_PNG = "query_map.png"
# Coarse to fine: when one text names several levels, the coarsest wins (a dead-end sub-street's
# 'sub_street' rendering is its street's name, and the street is what the text means).
LEVELS = ("city", "neighbourhood", "street", "sub_street")
# Address styles whose rendering names a whole street or neighbourhood rather than one sub-street.
_STYLE_LEVEL = {"street": "street", "neighbourhood": "neighbourhood"}
_OWN_PNG = re.compile(r"query_map(-[^/\\]+)?\.png")


class QueryMapError(ValueError):
    """A query-map input that cannot be mapped (empty query, missing dataset, unknown split or model)."""


@dataclass(frozen=True)
class QueryMapConfig:
    """How query-map encodes and matches."""

    split: str = "test"
    """split whose images are mapped"""
    batch_size: int = 64
    """images per forward pass"""
    device: str = "cpu"
    """torch device"""
    fuzzy_threshold: float = 85.0
    """smallest rapidfuzz ratio (0-100) for a free-wording query to match an address name"""
    outline_margin_m: float = 20.0
    """metres around a neighbourhood's convex hull (images stand beside the street lines)"""

    def __post_init__(self):
        if self.split not in SPLITS:
            raise QueryMapError(f"unknown split {self.split!r}; valid: {', '.join(SPLITS)}")
        if self.batch_size < 1:
            raise QueryMapError("--batch-size must be >= 1")
        if not 0 < self.fuzzy_threshold <= 100:
            raise QueryMapError("--fuzzy-threshold must be in (0, 100]")


def normalise(text: str) -> str:
    """Accents folded, case folded, '&' as 'and', punctuation as spaces, single spaces."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = text.casefold().replace("&", " and ")
    return " ".join(re.findall(r"\w+", text))


def slug(text: str, max_len: int = 60) -> str:
    return normalise(text).replace(" ", "-")[:max_len].strip("-") or "query"


@dataclass(frozen=True)
class AreaMatch:
    """The part of the city a query names."""

    query: str
    level: str | None
    """'city' | 'neighbourhood' | 'street' | 'sub_street', None when nothing matched"""
    name: str | None
    """the address name(s) matched, as written in the dataset"""
    sub_streets: frozenset[str]
    method: str
    """'exact' | 'contains' | 'fuzzy' | 'none'"""
    score: float = 0.0
    """100 for exact and contained names, the rapidfuzz ratio for fuzzy ones"""


@dataclass
class _Entry:
    name: str
    level: str
    sub_streets: set[str] = field(default_factory=set)


class AddressIndex:
    """Every address name of a dataset (normalised) -> its level and the sub-streets it covers."""

    def __init__(self, entries: dict[tuple[str, str], _Entry], fuzzy_threshold: float = 85.0):
        self.fuzzy_threshold = float(fuzzy_threshold)
        self.by_text: dict[str, dict[str, _Entry]] = {}
        for (norm, level), e in entries.items():
            self.by_text.setdefault(norm, {})[level] = e
        self.texts = sorted(self.by_text)

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, fuzzy_threshold: float = 85.0) -> "AddressIndex":
        """Names from every sub-street's fields, every address style rendered, and the stored address columns."""
        entries: dict[tuple[str, str], _Entry] = {}

        def add(text, level: str, sub: str) -> None:
            norm = normalise(str(text or ""))
            if norm:
                entries.setdefault((norm, level), _Entry(str(text).strip(), level)).sub_streets.add(sub)

        for sub, a in city_addresses(dataset_dir).items():
            add(sub, "sub_street", sub)
            add(a.street, "street", sub)
            add(a.city, "city", sub)
            if a.neighbourhood:
                add(a.neighbourhood, "neighbourhood", sub)
            for style in ADDRESS_STYLES:
                if _STYLE_LEVEL.get(style) != "neighbourhood" or a.neighbourhood:
                    add(render_address(a, style), _STYLE_LEVEL.get(style, "sub_street"), sub)
        # Stored renderings may come from another writer (e.g. a published dataset's own address texts).
        rows = read_records(dataset_dir).drop_duplicates(["sub_street", *(f"address_{s}" for s in STORED_STYLES)])
        rows = rows.to_dict("records") + read_sub_streets(dataset_dir)
        for row in rows:
            for style in STORED_STYLES:
                if row.get(f"address_{style}") and (_STYLE_LEVEL.get(style) != "neighbourhood" or row.get("neighbourhood")):
                    add(row[f"address_{style}"], _STYLE_LEVEL.get(style, "sub_street"), str(row["sub_street"]))
        return cls(entries, fuzzy_threshold)

    def _coarsest(self, norm: str) -> _Entry:
        levels = self.by_text[norm]
        return levels[next(lv for lv in LEVELS if lv in levels)]

    def match(self, query: str) -> AreaMatch:
        q = normalise(query)
        if q in self.by_text:
            e = self._coarsest(q)
            return AreaMatch(query, e.level, e.name, frozenset(e.sub_streets), "exact", 100.0)
        return self._contained(query, q) or self._fuzzy(query, q) or AreaMatch(query, None, None, frozenset(), "none")

    def _contained(self, query: str, q: str) -> AreaMatch | None:
        """Names the wording contains as whole words; a name inside a longer contained name is dropped."""
        padded = f" {q} "
        spans = []
        for t in self.texts:
            start = padded.find(f" {t} ")
            if start >= 0:
                spans.append((start, start + len(t), t))
        kept = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
        if not kept:
            return None
        # Union within a level ('A or B'), intersection across levels ('Esplanadi in Kamppi'); the city
        # level is everything and narrows nothing.
        by_level: dict[str, set[str]] = {}
        for _, _, t in kept:
            e = self._coarsest(t)
            by_level.setdefault(e.level, set()).update(e.sub_streets)
        narrowing = [lv for lv in LEVELS if lv in by_level and (lv != "city" or len(by_level) == 1)]
        subs = set.intersection(*(by_level[lv] for lv in narrowing))
        if not subs:  # contradictory names: the longest one alone
            e = self._coarsest(max(kept, key=lambda s: s[1] - s[0])[2])
            return AreaMatch(query, e.level, e.name, frozenset(e.sub_streets), "contains", 100.0)
        name = " / ".join(self._coarsest(t).name for _, _, t in sorted(kept) if self._coarsest(t).level in narrowing)
        return AreaMatch(query, narrowing[-1], name, frozenset(subs), "contains", 100.0)

    def _fuzzy(self, query: str, q: str) -> AreaMatch | None:
        """The closest name to the whole query or to any run of up to 8 of its words (misspellings)."""
        from rapidfuzz import fuzz, process

        words = q.split()
        spans = {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(i + 8, len(words)) + 1)}
        best = None
        for span in spans | {q}:
            if len(span) < 5:  # short spans match too much by chance
                continue
            hit = process.extractOne(span, self.texts, scorer=fuzz.ratio, score_cutoff=self.fuzzy_threshold)
            if hit and (best is None or (hit[1], len(span)) > (best[1], best[2])):
                best = (hit[0], hit[1], len(span))
        if best is None:
            return None
        e = self._coarsest(best[0])
        return AreaMatch(query, e.level, e.name, frozenset(e.sub_streets), "fuzzy", float(best[1]))


def roc_auc(scores, labels) -> float | None:
    """ROC-AUC of `scores` for the boolean `labels` (ties count one half); None when a class is empty.

    The Mann-Whitney rank formula: (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0).
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n1 = int(labels.sum())
    n0 = labels.size - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def activation_stats(similarity, inside) -> dict:
    """AUC, mean similarity inside/outside the area, and the counts."""
    similarity = np.asarray(similarity, dtype=float)
    inside = np.asarray(inside, dtype=bool)
    mean = lambda x: float(x.mean()) if x.size else None  # noqa: E731
    return {"auc": roc_auc(similarity, inside), "mean_similarity_inside": mean(similarity[inside]),
            "mean_similarity_outside": mean(similarity[~inside]), "n_inside": int(inside.sum()),
            "n_outside": int((~inside).sum())}


@dataclass
class QueryResult:
    match: AreaMatch
    similarity: np.ndarray
    """[N] cosine similarity of each image of the split to the query text"""
    stats: dict

    def summary(self) -> dict:
        m = self.match
        return {"query": m.query, "level": m.level, "matched": m.name, "method": m.method,
                "match_score": m.score, "sub_streets": sorted(m.sub_streets), **self.stats,
                "similarity_min": float(self.similarity.min()), "similarity_max": float(self.similarity.max())}


class QueryMapper:
    """One model and one split of one dataset: images encoded once (on first use), any number of queries."""

    def __init__(self, bundle, dataset_dir: str | Path, config: QueryMapConfig = QueryMapConfig()):
        self.bundle, self.config, self.dataset_dir = bundle, config, Path(dataset_dir)
        self.records = read_records(self.dataset_dir, config.split)
        if self.records.empty:
            raise QueryMapError(f"{self.dataset_dir}: split {config.split!r} has no images")
        self.index = AddressIndex.from_dataset(self.dataset_dir, config.fuzzy_threshold)
        self.geoms = sub_street_geometries_utm(self.dataset_dir)
        self.points = self.records[["utm_x", "utm_y"]].to_numpy(dtype=float)
        self._image_emb: torch.Tensor | None = None

    @property
    def image_embeddings(self) -> torch.Tensor:
        if self._image_emb is None:
            model = self.bundle.model.to(self.config.device)
            self._image_emb = encode_images(model, self.bundle.preprocess_val, DatasetPaths(self.dataset_dir).images,
                                            self.records["image"].tolist(), self.config.batch_size, self.config.device)
        return self._image_emb

    def query(self, texts: list[str]) -> list[QueryResult]:
        for t in texts:
            if not t.strip():
                raise QueryMapError("empty query text")
        text_emb = encode_texts(self.bundle.model, self.bundle.tokenizer, list(texts), device=self.config.device)
        sims = (self.image_embeddings @ text_emb.T).numpy()
        subs = self.records["sub_street"].astype(str).to_numpy()
        out = []
        for j, t in enumerate(texts):
            match = self.index.match(t)
            inside = np.isin(subs, sorted(match.sub_streets))
            out.append(QueryResult(match, sims[:, j], activation_stats(sims[:, j], inside)))
        return out

    def outline(self, match: AreaMatch):
        """The matched area's geometry (UTM): sub-street lines, or a neighbourhood's/city's buffered convex hull."""
        import shapely

        parts = [self.geoms[s] for s in sorted(match.sub_streets) if s in self.geoms]
        if not parts:
            return None
        union = shapely.union_all(parts)
        if match.level in ("neighbourhood", "city"):
            return union.convex_hull.buffer(self.config.outline_margin_m)
        return union

    def figure(self, result: QueryResult):
        """A matplotlib figure: grey streets, images coloured by similarity (colour bar), the area outlined."""
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure  # not pyplot: a long-running web demo keeps no figure registry

        segs = [line for g in self.geoms.values() for line in _lines(g)]
        allxy = np.concatenate([*segs, self.points]) if segs else self.points
        x0, y0 = allxy.min(axis=0)
        span = np.ptp(allxy, axis=0) + 1.0
        fig = Figure(figsize=(8, float(np.clip(7 * span[1] / span[0] + 1.2, 4, 11))), dpi=110)
        ax = fig.subplots()
        ax.add_collection(LineCollection([s - (x0, y0) for s in segs], colors="#c8c8c8", linewidths=1.4, zorder=1))
        m, st = result.match, result.stats
        geom = self.outline(m)
        if geom is not None:
            lines = [s - (x0, y0) for s in _lines(geom)]
            dashed = m.level in ("neighbourhood", "city")
            ax.add_collection(LineCollection(lines, colors="#d62728", linewidths=1.6 if dashed else 4.0,
                                             linestyles="--" if dashed else "-", alpha=0.9 if dashed else 0.55,
                                             zorder=2, label=plain_text(f"{m.level}: {m.name}"[:80])))
        order = np.argsort(result.similarity)  # the most similar images are drawn last, on top
        rel = self.points[order] - (x0, y0)
        sc = ax.scatter(rel[:, 0], rel[:, 1], c=result.similarity[order], cmap="viridis", s=16, edgecolors="white",
                        linewidths=0.3, zorder=3)
        fig.colorbar(sc, ax=ax, shrink=0.8, label="cosine similarity to the query")
        ax.autoscale()
        ax.set_aspect("equal")
        ax.set_xlabel(f"easting - {x0:.0f} (m)")
        ax.set_ylabel(f"northing - {y0:.0f} (m)")
        if m.level is None:
            detail = "no geometry matched"
        else:
            auc = "n/a" if st["auc"] is None else f"{st['auc']:.3f}"
            detail = (f"{m.level} '{m.name}' ({len(m.sub_streets)} sub-streets, {m.method}): AUC {auc}, "
                      f"{st['n_inside']} images inside / {st['n_outside']} outside")
        ax.set_title(plain_text(f"\"{m.query}\"\n{detail}"), fontsize=9)
        if geom is not None:
            ax.legend(loc="best", fontsize=7, framealpha=0.8)
        ax.grid(alpha=0.2)
        fig.tight_layout()
        return fig


def save_figure(fig, path: str | Path) -> Path:
    """PNG written beside its destination and moved into place (never half a file)."""
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def png_names(queries: list[str]) -> list[str]:
    """`query_map.png` for one query; `query_map-<slug>.png` for several (a clashing slug gets -2, -3, ...)."""
    if len(queries) == 1:
        return [SINGLE_PNG]
    names, seen = [], {}
    for q in queries:
        s = slug(q)
        seen[s] = seen.get(s, 0) + 1
        names.append(f"query_map-{s}{'' if seen[s] == 1 else '-' + str(seen[s])}.png")
    return names


def _listed_maps(out_dir: Path) -> set[str]:
    """The map files an earlier run here wrote: named by the marker (also a killed run's) or query_map.json."""
    names: set[str] = set()
    for path, read in ((out_dir / MARKER_FILE, lambda d: d.get("maps", [])),
                       (out_dir / JSON_FILE, lambda d: [q.get("png") for q in d.get("queries", [])])):
        try:
            names.update(n for n in read(json.loads(path.read_text(encoding="utf-8"))) if isinstance(n, str))
        except (OSError, ValueError, AttributeError, TypeError):  # absent or not ours to read: nothing listed
            continue
    # Plain names of this command's pattern only: a hand-edited list must not reach other files.
    return {n for n in names if _OWN_PNG.fullmatch(n)}


def run(mapper: QueryMapper, queries: list[str], out_dir: str | Path) -> dict:
    """Writes one PNG per query and query_map.json (last) into `out_dir`, then removes the maps of earlier runs
    it no longer lists; returns the JSON object."""
    out_dir = Path(out_dir)
    results = mapper.query(queries)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier, names = _listed_maps(out_dir), png_names(queries)
    # The marker lists every map that may be on disk until the new report is in place: a killed run's maps are
    # then the next run's to remove.
    write_marker(out_dir, "query-map", maps=sorted(earlier | set(names)))
    summaries = []
    for res, png in zip(results, names):
        save_figure(mapper.figure(res), out_dir / png)
        summaries.append({**res.summary(), "png": png})
    report = {"dataset": str(mapper.dataset_dir), "split": mapper.config.split, "num_images": len(mapper.records),
              "model": {"model_name": mapper.bundle.model_name, "pretrained": mapper.bundle.pretrained},
              "config": asdict(mapper.config), "queries": summaries}
    atomic_write_json(out_dir / JSON_FILE, report)
    for stale in sorted(earlier - set(names)):
        (out_dir / stale).unlink(missing_ok=True)
    write_marker(out_dir, "query-map", maps=names)
    return report


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="address-llava query-map", description=__doc__)
    add_model_source_args(p, "map a base (not fine-tuned) model")
    p.add_argument("--dataset", required=True, help="address dataset folder (records.parquet, sub_streets.geojson)")
    p.add_argument("--query", action="append", required=True,
                   help="address text at any level or in any wording; repeat for one map per query")
    p.add_argument("--out", required=True, help=f"output folder ({SINGLE_PNG} or query_map-<slug>.png, {JSON_FILE})")
    add_dataclass_args(p, QueryMapConfig, title="options")
    return p


def _load_model(args, device: str):
    """The model the options name; an unknown architecture or pretrained tag is a user error, not a bug."""
    try:
        return bundle_from_args(args, device=device)
    except (KeyError, RuntimeError) as e:  # open_clip: an unknown name (KeyError) or pretrained tag (RuntimeError)
        raise QueryMapError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e


@command_main("query-map")
def main(argv: list[str] | None = None) -> int:
    # User errors go to the guard (command_main): `query-map: error: ...`, exit 2; --debug shows the traceback.
    args = build_parser().parse_args(argv)
    config = dataclass_from_args(QueryMapConfig, args)
    if any(not q.strip() for q in args.query):
        raise QueryMapError("--query: empty query text")
    if not DatasetPaths(args.dataset).root.is_dir():
        raise QueryMapError(f"{args.dataset}: no such dataset folder")
    # One rule for every command's --out (clip_stage.core.outdir), before the model loads: an earlier query-map
    # folder is rewritten (only its own maps are replaced or removed); anything else non-empty is refused.
    check_out_dir(args.out, "query-map", resume=True, legacy=[JSON_FILE, "query_map*.png"],
                  inputs=[args.dataset, args.checkpoint, args.pretrained if os.path.exists(args.pretrained or "") else None])
    mapper = QueryMapper(_load_model(args, config.device), args.dataset, config)
    report = run(mapper, args.query, args.out)
    for q in report["queries"]:
        auc = "n/a" if q["auc"] is None else f"{q['auc']:.3f}"
        where = "no geometry matched" if q["level"] is None else f"{q['level']} {q['matched']!r} ({len(q['sub_streets'])} sub-streets)"
        print(f"{q['query']!r}: {where}; AUC {auc}, inside {q['n_inside']} / outside {q['n_outside']} -> {q['png']}")
    print(f"wrote {Path(args.out) / JSON_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
