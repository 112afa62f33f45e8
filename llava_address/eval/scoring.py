"""Scores any model's free-text answers against the structured references of an evaluation split.

    address-llava score --dataset DATA --answers answers.jsonl [--eval eval.json] [--out report.json]

An answers file is JSONL, one `{"id", "question", "answer", "reference"}` per line (what `infer` and
`benchmark` write; closed models' answers can be imported in the same form). The reference, normally taken
from the evaluation split written by the conversation builder (`--eval`, JSON list or JSONL of records
with a "reference" key), holds street, sub_street, cross_streets, neighbourhood, city, the question type
(full / street / cross / neighbourhood / yesno / mc / scene) and, for yes/no and multiple choice, the
expected answer. Answers are parsed with the city's gazetteer (`llava_address.eval.gazetteer`) and, optionally,
by the nearest address in an AddressCLIP text-embedding space.

Metrics (each over the questions it applies to; an unparseable answer counts as wrong and is listed):
- street_acc: main street right (full, street questions);
- sub_street_acc: the sub-street the answer's street + cross streets determine is the reference's (full);
- cross_acc: the cross streets named (other than the main street) are exactly the reference's (cross);
- neighbourhood_acc: the neighbourhood named is the reference's (full, neighbourhood);
- yesno_acc, mc_acc: yes/no and multiple-choice letter right;
- distance: metres from the photo's position to the predicted sub-street (else street) geometry, median
  over the answers that map to geometry (full, street questions).
Ids in the answers that are not in the evaluation split are an error; ids of the split without an answer
are counted as missing and the rest is scored.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from llava_address.eval.gazetteer import EmbeddingMatcher, Gazetteer, ParsedAddress, load_aliases, tokens

QUESTION_TYPES = ("full", "street", "cross", "neighbourhood", "yesno", "mc", "scene")
# Names other writers may use for the same reference fields.
_TYPE_KEYS = ("question_type", "type", "qtype", "kind")
_TYPE_ALIASES = {"address": "full", "full_address": "full", "place": "neighbourhood", "cross_streets": "cross", "between": "cross",
                 "neighborhood": "neighbourhood", "yes_no": "yesno", "verify": "yesno", "verification": "yesno",
                 "multiple_choice": "mc", "choice": "mc", "caption": "scene", "describe": "scene"}
# `expected_answer` (the conversation builder's name) holds 'yes'/'no', a letter or an address text,
# so it is read by question type.
_EXPECTED_KEYS = ("expected", "expected_answer", "yes_no", "yesno", "expected_yes", "answer_yes", "is_true", "label")
_LETTER_KEYS = ("mc_letter", "expected_answer", "letter", "answer_letter", "correct_letter", "correct", "mc_answer")
_OPTIONS_KEYS = ("options", "choices", "candidates")

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
    """An answers or evaluation file that cannot be scored (unknown ids, malformed lines, ...)."""


@dataclass(frozen=True)
class Reference:
    street: str = ""
    sub_street: str = ""
    cross_streets: tuple[str, ...] = ()
    neighbourhood: str = ""
    city: str = ""
    question_type: str = "full"
    expected: bool | None = None
    mc_letter: str | None = None
    options: tuple[str, ...] = ()
    image_id: str | None = None
    image: str | None = None
    utm: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "Reference":
        if not isinstance(d, dict):
            raise AnswersError(f"{where}reference must be an object, got {type(d).__name__}")
        qtype = next((str(d[k]) for k in _TYPE_KEYS if d.get(k)), "full").lower()
        qtype = _TYPE_ALIASES.get(qtype, qtype)
        if qtype not in QUESTION_TYPES:
            raise AnswersError(f"{where}unknown question type {qtype!r}; valid: {QUESTION_TYPES}")
        expected = letter = None
        if qtype == "yesno":
            expected = next((d[k] for k in _EXPECTED_KEYS if k in d and d[k] not in (None, "")), None)
            if isinstance(expected, str):
                expected = {"yes": True, "true": True, "no": False, "false": False}.get(expected.strip().lower())
        elif qtype == "mc":
            letter = next((str(d[k]).strip().strip("().").upper() for k in _LETTER_KEYS if d.get(k) not in (None, "")),
                          None)
            if letter is not None and not re.fullmatch(r"[A-Z]", letter):
                raise AnswersError(f"{where}multiple-choice reference letter {letter!r} is not a single letter")
        options = next((d[k] for k in _OPTIONS_KEYS if d.get(k)), ())
        if isinstance(options, dict):
            options = tuple(v for _, v in sorted(options.items()))
        cross = d.get("cross_streets") or ()
        utm = None
        if d.get("utm_x") is not None and d.get("utm_y") is not None:
            utm = (float(d["utm_x"]), float(d["utm_y"]))
        return cls(str(d.get("street") or ""), str(d.get("sub_street") or ""), tuple(str(c) for c in cross),
                   str(d.get("neighbourhood") or d.get("neighborhood") or ""), str(d.get("city") or ""), qtype,
                   None if expected is None else bool(expected), letter, tuple(str(o) for o in options),
                   str(d["image_id"]) if d.get("image_id") is not None else None,
                   str(d["image"]) if d.get("image") is not None else None, utm)


# --- yes/no and multiple choice ------------------------------------------------------------------------

_YES = {"yes", "yeah", "yep", "correct", "right", "true", "indeed", "affirmative", "kylla", "ja"}
_NO = {"no", "nope", "not", "incorrect", "wrong", "false", "isnt", "wasnt", "ei", "nej", "negative"}


def parse_yes_no(answer: str) -> bool | None:
    """True / False from the first yes- or no-word of the answer; None if it has neither."""
    for w in tokens(answer.replace("n't", " not")):
        if w in _YES:
            return True
        if w in _NO:
            return False
    return None


_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Ha-h])\)?\s*(?:[.):,]|$|\s)"),
    re.compile(r"(?:option|answer|choice|letter)\s*(?:is\s*)?[:\-]?\s*\(?([A-Ha-h])\)?(?![A-Za-z])", re.I),
    re.compile(r"\(([A-H])\)"),
    re.compile(r"(?<![A-Za-z])([B-H])(?![A-Za-z'])"),
]


def parse_mc(answer: str, options: Sequence[str] = (), gazetteer: Gazetteer | None = None) -> str | None:
    """The chosen letter ('A'...), from an explicit letter or, failing that, from the option the text names."""
    valid = {chr(ord("A") + i) for i in range(len(options))} if options else set("ABCDEFGH")
    for pat in _LETTER_PATTERNS:
        m = pat.search(answer)
        if m and m.group(1).upper() in valid:
            if pat is _LETTER_PATTERNS[0] and m.group(1) in "Aa" and re.match(r"^\s*a\s+\w", answer, re.I) \
                    and not re.match(r"^\s*\(?A\)", answer):
                continue  # the article "A street ...", not option A
            return m.group(1).upper()
    if options and gazetteer is not None:
        parsed = gazetteer.parse(answer)
        if parsed.sub_street:
            hits = [i for i, o in enumerate(options) if gazetteer.parse(o).sub_street == parsed.sub_street]
            if len(hits) == 1:
                return chr(ord("A") + hits[0])
    if options:
        from rapidfuzz import fuzz

        scores = [fuzz.token_set_ratio(" ".join(tokens(answer)), " ".join(tokens(o))) for o in options]
        best = int(np.argmax(scores))
        if scores[best] >= 90 and sorted(scores)[-2:][0] < scores[best]:
            return chr(ord("A") + best)
    return None


# --- reading files -------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnswersError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise AnswersError(f"{path}:{n}: expected a JSON object")
            rows.append(row)
    return rows


def read_records_file(path: str | Path) -> list[dict]:
    """A JSON list (LLaVA format) or JSONL of records."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnswersError(f"{path}: malformed JSON ({e.msg})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise AnswersError(f"{path}: expected a list of objects")
        return rows
    return read_jsonl(path)


def first_question(record: dict) -> str:
    """The first human turn of a LLaVA-format record without the <image> tag (or record['question'])."""
    if record.get("question"):
        return str(record["question"])
    for turn in record.get("conversations") or record.get("messages") or []:
        role = turn.get("from", turn.get("role"))
        if role in ("human", "user"):
            content = turn.get("value", turn.get("content", ""))
            if isinstance(content, list):
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            return str(content).replace("<image>", "").strip()
    return ""


def eval_references(records: Iterable[dict], where: str = "") -> dict[str, dict]:
    """id -> {'reference': dict, 'question': str, 'image': str|None} for records carrying a reference."""
    out: dict[str, dict] = {}
    for i, r in enumerate(records):
        if "id" not in r:
            raise AnswersError(f"{where}record {i} has no id")
        if "reference" not in r:
            raise AnswersError(f"{where}record {i} (id {r['id']}) has no 'reference': not an evaluation split")
        rid = str(r["id"])
        if rid in out:
            raise AnswersError(f"{where}duplicate id {rid!r}")
        ref = dict(r["reference"]) if isinstance(r["reference"], dict) else r["reference"]
        if isinstance(ref, dict) and not any(ref.get(k) for k in _TYPE_KEYS) and r.get("question_type"):
            ref["question_type"] = r["question_type"]  # the builder may keep the type beside the reference
        out[rid] = {"reference": ref, "question": first_question(r), "image": r.get("image")}
    return out


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

    def to_dict(self, details: bool = False) -> dict:
        d = asdict(self)
        if not details:
            d.pop("details")
        return d

    def markdown(self, name: str = "") -> str:
        lines = [f"### {name}" if name else "### scores",
                 f"answers {self.n_answers} of {self.n_eval} (missing {self.n_missing}, errors {len(self.errors)}), "
                 f"unparseable {len(self.unparseable)}", "",
                 "| metric | value | correct / total |", "|---|---|---|"]
        for m, v in self.metrics.items():
            val = "n/a" if v["value"] is None else f"{100 * v['value']:.1f}%"
            lines.append(f"| {m} | {val} | {v['correct']} / {v['total']} |")
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
        from clip_stage.core.schema import read_records

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
        from shapely.geometry import Point

        if ref.utm is not None:
            return Point(ref.utm)
        for key in (ref.image_id, rid, ref.image, image):
            if key is not None and key in self.points:
                return Point(self.points[key])
        # Without the photo's position, the middle of the reference sub-street stands in for it.
        sub = self.gazetteer.sub_streets.get(ref.sub_street)
        if sub is not None and sub.geometry_utm is not None:
            return sub.geometry_utm.interpolate(0.5, normalized=True)
        return None

    def score_one(self, rid: str, answer: str, ref: Reference, image: str | None = None) -> ScoredAnswer:
        t = ref.question_type
        correct: dict[str, bool] = {}
        distance = None
        parsed_out: dict = {}
        unparseable = False
        if t == "yesno":
            got = parse_yes_no(answer)
            unparseable = got is None
            if ref.expected is None:
                raise AnswersError(f"id {rid}: a yes/no question whose reference has no expected answer")
            correct["yesno_acc"] = got is not None and got == ref.expected
            parsed_out = {"yes": got}
        elif t == "mc":
            got = parse_mc(answer, ref.options, self.gazetteer)
            unparseable = got is None
            if ref.mc_letter is None:
                raise AnswersError(f"id {rid}: a multiple-choice question whose reference has no letter")
            correct["mc_acc"] = got is not None and got == ref.mc_letter
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
        return ScoredAnswer(rid, t, answer, parsed_out, correct, distance, unparseable)

    def score(self, answers: Sequence[dict], references: dict[str, dict] | None = None,
              source: str = "answers") -> ScoreReport:
        """Scores answer rows; `references` (from the evaluation split) is authoritative when given."""
        seen: set[str] = set()
        rows = []
        errors: list[dict] = []
        for i, a in enumerate(answers):
            if "id" in a and "error" in a and "answer" not in a:  # infer could not answer it (bad image)
                if str(a["id"]) in seen:
                    raise AnswersError(f"{source}: id {str(a['id'])!r} answered twice")
                seen.add(str(a["id"]))
                errors.append({"id": str(a["id"]), "error": str(a["error"])})
                continue
            if "id" not in a or "answer" not in a:
                raise AnswersError(f"{source}: row {i} lacks 'id' or 'answer'")
            rid = str(a["id"])
            if rid in seen:
                raise AnswersError(f"{source}: id {rid!r} answered twice")
            seen.add(rid)
            rows.append(a)
        if references is not None:
            unknown = [str(a["id"]) for a in [*rows, *errors] if str(a["id"]) not in references]
            if unknown:
                more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
                raise AnswersError(f"{source}: {len(unknown)} answer id(s) not in the evaluation split: "
                                   f"{unknown[:10]}{more}")
            missing = sorted(set(references) - seen)
            n_eval = len(references)
        else:
            missing, n_eval = [], len(rows)
        details: list[ScoredAnswer] = []
        for a in rows:
            rid = str(a["id"])
            if references is not None:
                ref_d, image = references[rid]["reference"], references[rid].get("image")
            else:
                if "reference" not in a:
                    raise AnswersError(f"{source}: id {rid!r} has no reference (pass the evaluation split)")
                ref_d, image = a["reference"], a.get("image")
            ref = Reference.from_dict(ref_d, where=f"{source}: id {rid}: ")
            scored = self.score_one(rid, str(a["answer"] or ""), ref, image)
            scored.phrasing = str(ref_d.get("phrasing") or "") if isinstance(ref_d, dict) else ""
            details.append(scored)
        metrics = _metric_table(details)
        phrasings = sorted({d.phrasing for d in details if d.phrasing})
        by_phrasing = {g: _metric_table([d for d in details if d.phrasing == g]) for g in phrasings}
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
                           by_phrasing, details, errors)


def score_files(dataset: str | Path, answers: str | Path, eval_file: str | Path | None = None,
                scorer: Scorer | None = None, **scorer_kwargs) -> ScoreReport:
    scorer = scorer or Scorer.from_dataset(dataset, **scorer_kwargs)
    refs = eval_references(read_records_file(eval_file), where=f"{eval_file}: ") if eval_file else None
    return scorer.score(read_jsonl(answers), refs, source=str(answers))


def clip_text_embedder(path: str | Path, device: str = "cpu") -> Callable[[list[str]], np.ndarray]:
    """`embed(texts)` (L2-normalised rows) from AddressCLIP's text tower, for --embed-clip.

    path: a train-clip checkpoint (open_clip; a run folder with final/ or checkpoint-NNNNNN/ works too), or an
    export-clip folder (its clip_model/ CLIPModel + tokenizer, transformers).
    """
    import torch

    p = Path(path)
    if (p / "clip_model" / "config.json").is_file():
        p = p / "clip_model"
    if (p / "config.json").is_file():
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(p).to(device).eval()
        tok = AutoTokenizer.from_pretrained(p)

        @torch.no_grad()
        def embed(texts: list[str]) -> np.ndarray:
            out = []
            for i in range(0, len(texts), 256):
                batch = tok(texts[i:i + 256], padding="max_length", truncation=True,
                            max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
                feats = model.get_text_features(**batch)
                feats = getattr(feats, "pooler_output", feats)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
            return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim))

        return embed
    from clip_stage.gallery import encode_texts
    from clip_stage.model import load_checkpoint

    bundle = load_checkpoint(p, device=device)  # CheckpointError names what is missing
    return lambda texts: encode_texts(bundle.model, bundle.tokenizer, list(texts), device=device).numpy()


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
    from clip_stage.core.fs import atomic_write_json, atomic_write_text

    args = build_parser().parse_args(argv)
    embed = clip_text_embedder(args.embed_clip) if args.embed_clip else None
    aliases = load_aliases(args.aliases) if args.aliases else None
    report = score_files(args.dataset, args.answers, args.eval, aliases=aliases, threshold=args.threshold,
                         embed=embed, min_similarity=args.min_similarity)
    print(report.markdown(Path(args.answers).name))
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
