"""`address-llava dataset-summary`: what is in a built address dataset.

    address-llava dataset-summary data/demo            # a readable table
    address-llava dataset-summary data/demo --json     # the same as JSON

`summary(dataset_dir)` returns the numbers as a dict: images per split, streets, sub-streets, images
per sub-street (min / median / max, overall and in train), sub-streets of the test split never seen in
train, neighbourhoods, the rejected input rows by reason (from rejects.jsonl), and the builder's
warnings (from build_report.json: no city found, sub-streets without a neighbourhood, ...).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import iter_jsonl
from clip_stage.core.schema import SPLITS, DatasetFormatError, DatasetPaths, read_info, read_records


def _stats(values) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    if not len(v):
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}


def _rejects(paths: DatasetPaths) -> dict[str, int]:
    if not paths.rejects.exists():
        return {}
    counts: Counter = Counter()
    for line in iter_jsonl(paths.rejects):
        try:
            if line.error is not None:
                raise ValueError(line.error)
            counts[line.value["reason"]] += 1
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetFormatError(f"{paths.rejects}: line {line.lineno}: not a reject record ({e})") from None
    return dict(sorted(counts.items()))


def _report(paths: DatasetPaths) -> dict:
    if not paths.report.exists():
        return {}
    try:
        return json.loads(paths.report.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{paths.report}: malformed JSON ({e})") from None


def summary(dataset_dir: str | Path) -> dict:
    """The dataset's numbers (see the module docstring)."""
    paths = DatasetPaths(dataset_dir)
    df = read_records(dataset_dir)
    info = read_info(dataset_dir) if paths.info.exists() else {}
    per_sub = df.groupby("sub_street").size()
    train = df[df["split"] == "train"]
    test_subs = set(df.loc[df["split"] == "test", "sub_street"])
    rejects = _rejects(paths)
    report = _report(paths)
    no_hood = df.loc[df["neighbourhood"].astype(str) == "", "sub_street"].nunique()
    return {
        "dataset": str(dataset_dir),
        "city": info.get("city", ""),
        "utm_epsg": info.get("utm_epsg"),
        "images": int(len(df)),
        "splits": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "streets": int(df["street"].nunique()),
        "sub_streets": int(df["sub_street"].nunique()),
        "sub_streets_per_split": {s: int(df.loc[df["split"] == s, "sub_street"].nunique()) for s in SPLITS},
        "test_sub_streets_unseen_in_train": len(test_subs - set(train["sub_street"])),
        "images_per_sub_street": _stats(per_sub.values),
        "train_images_per_sub_street": _stats(train.groupby("sub_street").size().values),
        "neighbourhoods": {k: int(v) for k, v in df["neighbourhood"].replace("", "(none)").value_counts().sort_index().items()},
        "captioned": int((df["caption"].astype(str).str.len() > 0).sum()),
        "rejected": rejects,
        "rejected_total": int(sum(rejects.values())),
        "sub_streets_without_neighbourhood": int(no_hood),
        "warnings": list(report.get("warnings", [])),
    }


def format_summary(s: dict) -> str:
    """The summary as an aligned text table."""
    rows: list[tuple[str, str]] = [
        ("dataset", s["dataset"]),
        ("city", f"{s['city'] or '-'} " + (f"(EPSG:{s['utm_epsg']})" if s["utm_epsg"] is not None
                                            else "(no dataset_info.json: city and projection unknown)")),
        ("images", f"{s['images']}  (" + " / ".join(f"{k} {v}" for k, v in s["splits"].items()) + ")"),
        ("streets", str(s["streets"])),
        ("sub-streets", f"{s['sub_streets']}  (" + " / ".join(f"{k} {v}" for k, v in s["sub_streets_per_split"].items()) + ")"),
        ("test sub-streets not in train", str(s["test_sub_streets_unseen_in_train"])),
    ]
    for key, label in (("images_per_sub_street", "images per sub-street"), ("train_images_per_sub_street", "train images per sub-street")):
        st = s[key]
        rows.append((label, f"min {st['min']}  median {st['median']:g}  max {st['max']}"))
    rows.append(("captioned images", str(s["captioned"])))
    rows.append(("neighbourhoods", str(len(s["neighbourhoods"]))))
    rows += [(f"  {k}", str(v)) for k, v in s["neighbourhoods"].items()]
    rows.append(("sub-streets without neighbourhood", str(s["sub_streets_without_neighbourhood"])))
    rows.append(("rejected rows", str(s["rejected_total"])))
    rows += [(f"  {k}", str(v)) for k, v in s["rejected"].items()]
    rows += [("warning", w) for w in s["warnings"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@command_main("dataset-summary")
def summary_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="address-llava dataset-summary", description="Print the summary of a built address dataset.")
    parser.add_argument("dataset", help="dataset folder (written by build-dataset or load-ial)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = parser.parse_args(argv)
    try:
        s = summary(ns.dataset)
    except DatasetFormatError as e:
        parser.exit(2, f"dataset-summary: error: {e}\n")
    print(json.dumps(s, indent=2, ensure_ascii=False) if ns.json else format_summary(s), file=sys.stdout)
    return 0


main = summary_main
