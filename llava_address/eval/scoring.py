"""Scores any model's free-text answers against the structured references of an evaluation split.

    address-llava score --dataset DATA --answers answers.jsonl [--eval eval.json] [--out report.json]

An answers file is JSONL, one `{"id", "question", "answer", "reference"}` per line (what `infer` and
`benchmark` write; closed models' answers can be imported in the same form). The reference, normally taken
from the evaluation split written by the conversation builder (`--eval`, JSON list or JSONL of records
with a "reference" key), is the record contract's `conversations.records.Reference`: the structured
address, the question type and the expected answer; a reference with an unknown key or question type is an
error. The question types are scored in groups (`SCORED_AS`: full / street / cross / neighbourhood / yesno /
mc / scene), the names of the report. Answers are parsed with the city's gazetteer
(`llava_address.eval.gazetteer`, yes/no and letters by `llava_address.eval.parse`) and, optionally, by the
nearest address in an AddressCLIP text-embedding space (`llava_address.eval.embedder`).

Metrics (each over the questions it applies to; an unparseable answer counts as wrong and is listed):
- street_acc: main street right (full, street questions);
- sub_street_acc: the sub-street the answer's street + cross streets determine is the reference's (full);
- cross_acc: the cross streets named (other than the main street) are exactly the reference's (cross);
- neighbourhood_acc: the neighbourhood named is the reference's (full, neighbourhood);
- yesno_acc, mc_acc: yes/no and multiple-choice letter right;
- distance: metres from the photo's position to the predicted sub-street (else street) geometry, median
  over the answers that map to geometry (full, street questions).
Ids in the answers that are not in the evaluation split are an error; ids of the split without an answer
are counted as missing and the rest is scored. `metrics` are over the answered questions; `strict_metrics`
(with the evaluation split) count every unanswered question (missing id, or an error row such as an
unreadable image) as wrong, so that systems that fail on different images compare fairly: the benchmark
table shows them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from shapely.geometry import Point

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, atomic_write_text, iter_jsonl, read_jsonl
from clip_stage.core.outdir import check_out_files
from clip_stage.core.schema import read_records
from conversations.records import (CAPTION, CROSS_STREETS, FULL_ADDRESS, MULTIPLE_CHOICE, PLACE, SCENE, STREET, YES_NO,
                                   EvalRecord, Reference, eval_records, load_eval_records)
from llava_address.eval.embedder import clip_text_embedder
from llava_address.eval.gazetteer import EmbeddingMatcher, Gazetteer, ParsedAddress, load_aliases
from llava_address.eval.parse import parse_mc, parse_yes_no

SCORED_AS = {FULL_ADDRESS: "full", STREET: "street", CROSS_STREETS: "cross", PLACE: "neighbourhood", YES_NO: "yesno",
             MULTIPLE_CHOICE: "mc", CAPTION: "scene", SCENE: "scene"}
"""question type of the record -> the group it is scored and reported in"""

METRICS: dict[str, tuple[str, ...]] = {
    "street_acc": ("full", "street"),
    "sub_street_acc": ("full",),
    "cross_acc": ("cross",),
    "neighbourhood_acc": ("full", "neighbourhood"),
    "yesno_acc": ("yesno",),
    "mc_acc": ("mc",),
}
DISTANCE_TYPES = ("full", "street")


class AnswersError(ValueError):
    """An answers file that cannot be scored (unknown ids, malformed lines, ...)."""


_LINE = "_line"  # where a row read with bad_rows came from, so that the scorer's own checks can name the line


def read_answers(path: str | Path, bad_rows: list[dict] | None = None) -> list[dict]:
    """The rows of an answers JSONL file. A malformed line raises a one-line AnswersError naming it, or, with
    a `bad_rows` list, is recorded there ({"where": "line N", "error"}) and skipped."""
    if bad_rows is None:
        return read_jsonl(path, AnswersError)
    rows = []
    for line in iter_jsonl(path):
        if line.error is None and not isinstance(line.value, dict):
            bad_rows.append({"where": f"line {line.lineno}", "error": f"not a JSON object ({type(line.value).__name__})"})
        elif line.error is not None:
            bad_rows.append({"where": f"line {line.lineno}", "error": line.error})
        else:
            rows.append({**line.value, _LINE: line.lineno})
    return rows


def eval_references(records: Iterable[dict], where: str = "records") -> dict[str, EvalRecord]:
    """id -> EvalRecord (question, image, Reference) of evaluation records."""
    return {r.id: r for r in eval_records(records, where)}


def read_references(path: str | Path) -> dict[str, EvalRecord]:
    """id -> EvalRecord of an evaluation split file (JSON array or JSONL)."""
    return {r.id: r for r in load_eval_records(path)}


# --- scoring -------------------------------------------------------------------------------------------

@dataclass
class ScoredAnswer:
    id: str
    question_type: str
    answer: str
    parsed: dict
    correct: dict[str, bool]
    distance_m: float | None
    unparseable: bool
    phrasing: str = ""
    """'seen' / 'held_out' question wording, where the reference says so"""


def _metric_table(details: Sequence[ScoredAnswer]) -> dict[str, dict]:
    out = {}
    for m in METRICS:
        vals = [d.correct[m] for d in details if m in d.correct]
        out[m] = {"correct": int(sum(vals)), "total": len(vals), "value": (sum(vals) / len(vals)) if vals else None}
    return out


def _by_phrasing(details: Sequence[ScoredAnswer]) -> dict[str, dict]:
    """The metric table of each question wording the references name ('seen', 'held_out')."""
    return {g: _metric_table([d for d in details if d.phrasing == g])
            for g in sorted({d.phrasing for d in details if d.phrasing})}


@dataclass
class ScoreReport:
    n_eval: int
    n_answers: int
    n_missing: int
    missing_ids: list[str]
    metrics: dict[str, dict]
    distance: dict
    by_type: dict[str, int]
    unparseable: list[dict]
    by_phrasing: dict[str, dict] = field(default_factory=dict)
    """metrics per question wording ('seen' in training / 'held_out'): does the model generalise?"""
    details: list[ScoredAnswer] = field(default_factory=list, repr=False)
    errors: list[dict] = field(default_factory=list)
    """error rows of the answers ({id, error}: e.g. an unreadable image): unanswered, like the missing ids"""
    strict_metrics: dict[str, dict] = field(default_factory=dict)
    """the metrics with every unanswered question (missing or error) counted wrong; {} without the split"""
    strict_by_phrasing: dict[str, dict] = field(default_factory=dict)
    """by_phrasing with the unanswered questions counted wrong, like strict_metrics; {} without the split"""
    bad_rows: list[dict] = field(default_factory=list)
    """answers rows skipped as malformed ({where, error}) when scoring with skip_bad; their ids count as missing"""

    def to_dict(self, details: bool = False) -> dict:
        d = asdict(self)
        if not details:
            d.pop("details")
        return d

    def markdown(self, name: str = "") -> str:
        lines = [f"### {name}" if name else "### scores",
                 f"answers {self.n_answers} of {self.n_eval} (missing {self.n_missing}, errors {len(self.errors)}), "
                 f"unparseable {len(self.unparseable)}"
                 + (f", bad rows skipped {len(self.bad_rows)}" if self.bad_rows else ""), "",
                 "| metric | value | correct / total | unanswered counted wrong |", "|---|---|---|---|"]
        for m, v in self.metrics.items():
            val = "n/a" if v["value"] is None else f"{100 * v['value']:.1f}%"
            st = self.strict_metrics.get(m)
            strict = "n/a" if not st or st["value"] is None else f"{100 * st['value']:.1f}% ({st['correct']} / {st['total']})"
            lines.append(f"| {m} | {val} | {v['correct']} / {v['total']} | {strict} |")
        med = self.distance["median_m"]
        lines.append(f"| median distance | {'n/a' if med is None else f'{med:.0f} m'} | "
                     f"{self.distance['n']} mapped / {self.distance['total']} |")
        if self.by_phrasing:
            groups = sorted(self.by_phrasing)
            lines += ["", "| metric | " + " | ".join(f"{g} phrasing" for g in groups) + " |",
                      "|---|" + "---|" * len(groups)]
            for m in METRICS:
                cells = []
                for g in groups:
                    v = self.by_phrasing[g][m]
                    cells.append("n/a" if v["value"] is None else f"{100 * v['value']:.1f}% ({v['correct']}/{v['total']})")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


class Scorer:
    """Parses answers with a gazetteer (and optional embedding matcher) and computes the metrics."""

    def __init__(self, gazetteer: Gazetteer, embed: Callable[[list[str]], np.ndarray] | None = None,
                 min_similarity: float = 0.5, points: dict[str, tuple[float, float]] | None = None):
        self.gazetteer = gazetteer
        self.embedder = EmbeddingMatcher(gazetteer, embed, min_similarity) if embed is not None else None
        self.points = points or {}
        """image id or image path -> (utm_x, utm_y) of the photo, for distance errors"""

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, aliases: str | Path | dict | None = None,
                     threshold: float = 85.0, embed=None, min_similarity: float = 0.5) -> "Scorer":
        gaz = Gazetteer.from_dataset(dataset_dir, aliases=aliases, threshold=threshold)
        df = read_records(dataset_dir)
        points = {}
        for image_id, image, x, y in zip(df["image_id"], df["image"], df["utm_x"], df["utm_y"]):
            points[str(image_id)] = points[str(image)] = (float(x), float(y))
        return cls(gaz, embed=embed, min_similarity=min_similarity, points=points)

    def parse(self, answer: str) -> ParsedAddress:
        parsed = self.gazetteer.parse(answer)
        if parsed.street is None and self.embedder is not None:
            emb = self.embedder.parse(answer)
            if emb.street is not None:
                # A neighbourhood the gazetteer did find is the answer's own word; keep it.
                emb.neighbourhood = parsed.neighbourhood or emb.neighbourhood
                parsed = emb
        return parsed

    def _point(self, rid: str, ref: Reference, image: str | None):
        if ref.utm is not None:
            return Point(ref.utm)
        for key in (ref.image_id or None, rid, image):
            if key is not None and key in self.points:
                return Point(self.points[key])
        # Without the photo's position, the middle of the reference sub-street stands in for it.
        sub = self.gazetteer.sub_streets.get(ref.sub_street)
        if sub is not None and sub.geometry_utm is not None:
            return sub.geometry_utm.interpolate(0.5, normalized=True)
        return None

    def score_one(self, rid: str, answer: str, ref: Reference, image: str | None = None) -> ScoredAnswer:
        t = SCORED_AS[ref.question_type]
        correct: dict[str, bool] = {}
        distance = None
        parsed_out: dict = {}
        unparseable = False
        if t == "yesno":
            got = parse_yes_no(answer)
            unparseable = got is None
            correct["yesno_acc"] = got is not None and got == ref.yes
            parsed_out = {"yes": got}
        elif t == "mc":
            got = parse_mc(answer, ref.choices, self.gazetteer)
            unparseable = got is None
            correct["mc_acc"] = got is not None and got == ref.letter
            parsed_out = {"letter": got}
        elif t in ("full", "street", "cross", "neighbourhood"):
            p = self.parse(answer)
            parsed_out = {"street": p.street, "cross_streets": list(p.cross_streets), "sub_street": p.sub_street,
                          "neighbourhood": p.neighbourhood, "city": p.city, "method": p.method,
                          "mentioned_streets": list(p.mentioned_streets)}
            if t in METRICS["street_acc"]:
                correct["street_acc"] = p.street is not None and p.street == ref.street
            if t in METRICS["sub_street_acc"]:
                correct["sub_street_acc"] = p.sub_street is not None and p.sub_street == ref.sub_street
            if t in METRICS["cross_acc"]:
                named = {s for s in p.mentioned_streets if s != ref.street}
                correct["cross_acc"] = bool(named) and named == set(ref.cross_streets)
            if t in METRICS["neighbourhood_acc"] and (ref.neighbourhood or t == "neighbourhood"):
                correct["neighbourhood_acc"] = p.neighbourhood is not None and p.neighbourhood == ref.neighbourhood
            if t == "neighbourhood":
                unparseable = p.neighbourhood is None
            elif t == "cross":
                unparseable = not p.mentioned_streets
            else:
                unparseable = p.street is None
            if t in DISTANCE_TYPES and not unparseable:
                geom = self.gazetteer.geometry_of(p)
                point = self._point(rid, ref, image)
                if geom is not None and point is not None:
                    distance = float(geom.distance(point))
        return ScoredAnswer(rid, t, answer, parsed_out, correct, distance, unparseable, ref.phrasing)

    def score(self, answers: Sequence[dict], references: dict[str, EvalRecord] | None = None,
              source: str = "answers", bad_rows: list[dict] | None = None) -> ScoreReport:
        """Scores answer rows; `references` (from the evaluation split) is authoritative when given.

        A row that cannot be scored (no id or answer, an id answered twice or not in the split, a reference off
        the contract) raises a one-line error naming it; with a `bad_rows` list (a batch job that keeps going)
        it is recorded there and skipped instead, and its question counts as missing.
        """
        def reject(i: int, a: dict, message: str, error: type[Exception] = AnswersError) -> None:
            where = f"line {a[_LINE]}" if isinstance(a, dict) and _LINE in a else f"row {i + 1}"
            if bad_rows is None:
                raise error(f"{source}: {where}: {message}")
            bad_rows.append({"where": where, "error": message})

        seen: set[str] = set()
        rows = []
        errors: list[dict] = []
        for i, a in enumerate(answers):
            if not isinstance(a, dict) or "id" not in a or ("answer" not in a and "error" not in a):
                reject(i, a, "lacks 'id' or 'answer'")
                continue
            rid = str(a["id"])
            if rid in seen:
                reject(i, a, f"id {rid!r} answered twice")
                continue
            if references is not None and rid not in references and bad_rows is not None:
                reject(i, a, f"id {rid!r} is not in the evaluation split")
                continue
            ref = image = None
            if references is None and "error" not in a:
                if "reference" not in a:
                    reject(i, a, f"id {rid!r} has no reference (pass the evaluation split)")
                    continue
                try:
                    ref, image = Reference.from_dict(a["reference"], where=f"{source}: id {rid}: "), a.get("image")
                except ValueError as e:
                    if bad_rows is None:
                        raise
                    reject(i, a, str(e))
                    continue
            seen.add(rid)
            if "error" in a and "answer" not in a:  # infer could not answer it (bad image)
                errors.append({"id": rid, "error": str(a["error"])})
            else:
                rows.append((rid, str(a["answer"] or ""), ref, image))
        if references is not None:
            unknown = [rid for rid in seen if rid not in references]
            if unknown:
                more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
                raise AnswersError(f"{source}: {len(unknown)} answer id(s) not in the evaluation split: "
                                   f"{sorted(unknown)[:10]}{more}")
            missing = sorted(set(references) - seen)
            n_eval = len(references)
        else:
            missing, n_eval = [], len(rows)
        details: list[ScoredAnswer] = []
        for rid, answer, ref, image in rows:
            if references is not None:
                ref, image = references[rid].reference, references[rid].image
            details.append(self.score_one(rid, answer, ref, image))
        metrics, by_phrasing = _metric_table(details), _by_phrasing(details)
        strict_metrics, strict_by_phrasing = {}, {}
        if references is not None:  # the unanswered ones scored as empty answers: wrong, whatever their type
            everything = details + [self.score_one(rid, "", references[rid].reference, references[rid].image)
                                    for rid in [*missing, *(e["id"] for e in errors)]]
            strict_metrics, strict_by_phrasing = _metric_table(everything), _by_phrasing(everything)
        dists = [d.distance_m for d in details if d.distance_m is not None]
        n_dist_total = sum(1 for d in details if d.question_type in DISTANCE_TYPES)
        distance = {"median_m": statistics.median(dists) if dists else None,
                    "mean_m": statistics.fmean(dists) if dists else None, "n": len(dists), "total": n_dist_total}
        by_type: dict[str, int] = {}
        for d in details:
            by_type[d.question_type] = by_type.get(d.question_type, 0) + 1
        unparseable = [{"id": d.id, "question_type": d.question_type, "answer": d.answer}
                       for d in details if d.unparseable]
        return ScoreReport(n_eval, len(rows), len(missing), missing, metrics, distance, by_type, unparseable,
                           by_phrasing, details, errors, strict_metrics, strict_by_phrasing, list(bad_rows or []))


def score_files(dataset: str | Path, answers: str | Path, eval_file: str | Path | None = None,
                scorer: Scorer | None = None, **scorer_kwargs) -> ScoreReport:
    """Scores an answers file, skipping (and reporting in `bad_rows`) the rows that cannot be scored; a file
    with none that can is an AnswersError."""
    scorer = scorer or Scorer.from_dataset(dataset, **scorer_kwargs)
    refs = read_references(eval_file) if eval_file else None
    bad: list[dict] = []
    report = scorer.score(read_answers(answers, bad), refs, source=str(answers), bad_rows=bad)
    if bad and not report.n_answers and not report.errors:
        raise AnswersError(f"{answers}: no row could be scored ({bad[0]['where']}: {bad[0]['error']}; "
                           f"{len(bad)} bad rows)")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="address dataset folder (records.parquet + sub_streets.geojson)")
    p.add_argument("--answers", required=True, help="answers JSONL: id, question, answer, reference")
    p.add_argument("--eval", default=None, help="evaluation split (JSON list or JSONL with 'reference'); "
                                                "authoritative references and the missing-answer count")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--details", default=None, help="write one JSONL line per scored answer here")
    p.add_argument("--threshold", type=float, default=85.0, help="fuzzy match threshold (rapidfuzz ratio, 0-100)")
    p.add_argument("--aliases", default=None, help="JSON {alias: canonical name} (e.g. Swedish street names)")
    p.add_argument("--embed-clip", default=None, help="AddressCLIP (train-clip checkpoint or export-clip folder): "
                                                      "answers naming no known street are matched to the nearest "
                                                      "address in its text-embedding space")
    p.add_argument("--min-similarity", type=float, default=0.5, help="cosine floor of the embedding match")
    return p


@command_main("score")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= 100:
        parser.error(f"--threshold {args.threshold}: a rapidfuzz ratio between 0 and 100")
    if not -1 <= args.min_similarity <= 1:
        parser.error(f"--min-similarity {args.min_similarity}: a cosine similarity between -1 and 1")
    check_out_files({"--out": args.out, "--details": args.details},
                    [args.dataset, args.answers, args.eval, args.aliases, args.embed_clip])
    for flag, path in (("--answers", args.answers), ("--eval", args.eval)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    aliases = load_aliases(args.aliases) if args.aliases else None
    embed = clip_text_embedder(args.embed_clip) if args.embed_clip else None
    report = score_files(args.dataset, args.answers, args.eval, aliases=aliases, threshold=args.threshold,
                         embed=embed, min_similarity=args.min_similarity)
    print(report.markdown(Path(args.answers).name))
    for b in report.bad_rows[:20]:
        print(f"score: {args.answers}: {b['where']}: {b['error']} (skipped)", file=sys.stderr)
    if len(report.bad_rows) > 20:
        print(f"score: ... and {len(report.bad_rows) - 20} more bad rows (listed in the report)", file=sys.stderr)
    if report.unparseable:
        print(f"\nunparseable ({len(report.unparseable)}):")
        for u in report.unparseable[:20]:
            print(f"  {u['id']} [{u['question_type']}]: {u['answer'][:100]!r}")
    if args.out:
        atomic_write_json(args.out, report.to_dict())
    if args.details:
        atomic_write_text(args.details, "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n"
                                                for d in report.details))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
