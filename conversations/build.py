"""Build multi-turn address Q&A conversations (LLaVA format) from an address dataset.

    address-llava conversations --dataset DATA --out CONV [--seed 0] [--formats llava,messages,hf-disk]

Training images (split `train`) become conversations of 2-4 question/answer pairs whose types are drawn,
without repetition, from full address, street, cross streets, neighbourhood/city, yes/no verification,
multiple choice and scene description (weights configurable). Evaluation images (split `test`) get one
question each, asked with a training or a held-out phrasing, and a `reference` with the structured
address, the question type and the expected answer, for scoring. Yes/no answers are balanced over each
output file; negatives are nearby streets and sibling sub-streets. The output is deterministic per seed.

Writes, atomically (the folder appears complete or not at all):

    CONV/train.json        LLaVA JSON array: id, image (relative to DATA/images), conversations, turn_types
    CONV/eval.json         the same, one question per image, plus question_type and reference
    CONV/build_info.json   configuration, image root, counts, question-type and yes/no counts
    (+ train.jsonl/eval.jsonl, *_messages.json, *_messages_trl.json, hf/ as chosen by --formats)
    CONV/dataset_info.json LLaMA-Factory's entries for the *_messages.json files (with `messages`)
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from clip_stage.core.config import ConfigParser, Section
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_dir, atomic_write_json
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.core.schema import Address, DatasetPaths, check_record_images, read_records, render_address

from conversations import formats
from conversations.candidates import NONE_FITS, with_candidates
from conversations.config import BuildConfig
from conversations.neighbours import Neighbourhood, build_neighbourhood
from conversations.records import (CAPTION, CROSS_STREETS, FULL_ADDRESS, IMAGE_TOKEN, MULTIPLE_CHOICE, PLACE, SCENE,
                                   STREET, YES_NO, Reference, write_json_array, write_jsonl)
from conversations.templates import fill, get_question_type, usable

log = logging.getLogger("conversations.build")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def make_rng(seed: int, *keys) -> random.Random:
    """An RNG that depends only on the seed and the keys (not on Python's salted str hash or on order)."""
    digest = hashlib.sha256("\x1f".join(map(str, (seed, *keys))).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def caption_sentence(caption: str) -> str:
    text = " ".join(str(caption or "").split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


@dataclass(frozen=True)
class Sample:
    """What the builder needs of one image."""

    image_id: str
    image: str
    address: Address
    caption: str
    position: tuple[float, float, float, float]  # lat, lon, utm_x, utm_y


class ConversationBuilder:
    """Renders turns for samples; all randomness comes from `make_rng(seed, ...)`."""

    def __init__(self, config: BuildConfig, hood: Neighbourhood):
        self.config = config
        self.hood = hood
        # per-address results: many images share one sub-street, and rendering dominates the build time
        self._cache: dict[tuple[str, Address], object] = {}

    def _cached(self, kind: str, a: Address, compute):
        key = (kind, a)
        if key not in self._cache:
            self._cache[key] = compute(a)
        return self._cache[key]

    # --- the address values answers are filled with ---
    def _values(self, a: Address) -> dict[str, str]:
        between = ""
        if len(a.cross_streets) >= 2:
            between = f"between {a.cross_streets[0]} and {a.cross_streets[1]}"
        elif a.cross_streets:
            between = f"near {a.cross_streets[0]}"
        return {
            "full": render_address(a, self.config.address_style),
            "street": a.street,
            "segment": render_address(a, "sub_street"),
            "between": between,
            "neighbourhood": a.neighbourhood,
            "city": a.city,
            "place": ", ".join(p for p in (a.neighbourhood, a.city) if p),
        }

    # --- hard negatives ---
    def _street_negatives(self, a: Address) -> list[tuple[str, str]]:
        """(street name, sub-street id) of the nearest sub-streets of other streets, one per name.

        The sub-street's own cross streets are left out: a photo near the corner may show them too, so
        "No, this is not <cross street>" would be a doubtful label."""
        seen, out = set(a.cross_streets), []
        for sid in self.hood.nearby.get(a.sub_street, ()):
            name = self.hood.addresses[sid].street
            if name != a.street and name not in seen:
                seen.add(name)
                out.append((name, sid))
        return out[: self.config.negative_pool]

    def _sibling_negatives(self, a: Address) -> list[tuple[str, str]]:
        """(sub-street text, id) of the nearest other sub-streets of the same street, distinct texts."""
        own = render_address(a, "sub_street")
        seen, out = {own}, []
        for sid in self.hood.siblings.get(a.sub_street, ()):
            text = render_address(self.hood.addresses[sid], "sub_street")
            if text not in seen:
                seen.add(text)
                out.append((text, sid))
        return out[: self.config.negative_pool]

    def _mc_distractors(self, a: Address) -> list[str]:
        own = render_address(a, self.config.address_style)
        seen, out = {own}, []
        for sid in (*self.hood.nearby.get(a.sub_street, ()), *self.hood.siblings.get(a.sub_street, ())):
            text = render_address(self.hood.addresses[sid], self.config.address_style)
            if text not in seen:
                seen.add(text)
                out.append(text)
        return out[: self.config.mc_pool]

    def values(self, a: Address) -> dict[str, str]:
        return dict(self._cached("values", a, self._values))  # a copy: callers add turn-specific values

    def street_negatives(self, a: Address) -> list[tuple[str, str]]:
        return self._cached("street", a, self._street_negatives)

    def sibling_negatives(self, a: Address) -> list[tuple[str, str]]:
        return self._cached("sibling", a, self._sibling_negatives)

    def mc_distractors(self, a: Address) -> list[str]:
        return self._cached("mc", a, self._mc_distractors)

    def available_types(self, s: Sample, weights: dict[str, float]) -> dict[str, float]:
        a = s.address
        ok = {
            FULL_ADDRESS: True,
            STREET: True,
            CROSS_STREETS: bool(a.cross_streets),
            PLACE: bool(a.neighbourhood),
            YES_NO: bool(self.street_negatives(a) or self.sibling_negatives(a)),
            MULTIPLE_CHOICE: bool(self.mc_distractors(a)),
            CAPTION: bool(caption_sentence(s.caption)),
            SCENE: bool(caption_sentence(s.caption)),
        }
        return {t: w for t, w in weights.items() if w > 0 and ok.get(t, True)}

    def plan(self, s: Sample, weights: dict[str, float], rng: random.Random, n_turns: int) -> list[str]:
        """Question types of one conversation: weighted sampling without replacement."""
        avail = self.available_types(s, weights)
        types: list[str] = []
        while avail and len(types) < n_turns:
            names = sorted(avail)
            pick = rng.choices(names, weights=[avail[n] for n in names])[0]
            types.append(pick)
            del avail[pick]
        return types

    # --- one turn ---
    def render(self, qtype: str, s: Sample, rng: random.Random, held_out: bool, yes: bool | None = None):
        """(question, answer, reference extras) of one turn."""
        qt = get_question_type(qtype)
        a = s.address
        values = self.values(a)
        question_tpl = rng.choice(qt.held_out if held_out else qt.questions)
        extra: dict = {}
        answers = qt.answers
        qvalues: dict[str, str] = {}
        if qtype == YES_NO:
            if yes:
                level = "sub_street" if a.cross_streets and rng.random() < self.config.sub_street_prob else "street"
                candidate, cand_id = (values["segment"] if level == "sub_street" else a.street), a.sub_street
                answers = qt.answers_yes
            else:
                options = {"sub_street": self.sibling_negatives(a), "street": self.street_negatives(a)}
                levels = [lvl for lvl in ("sub_street", "street") if options[lvl]]
                if len(levels) == 2:
                    level = "sub_street" if rng.random() < self.config.sub_street_prob else "street"
                else:
                    level = levels[0]
                candidate, cand_id = rng.choice(options[level])
                answers = qt.answers_no
            qvalues["candidate"] = values["candidate"] = candidate
            extra = {"expected_answer": "yes" if yes else "no", "candidate": candidate, "candidate_level": level,
                     "candidate_sub_street": cand_id}
        elif qtype == MULTIPLE_CHOICE:
            pool = self.mc_distractors(a)
            k = min(self.config.mc_choices - 1, len(pool))
            choices = [values["full"], *rng.sample(pool, k)]
            rng.shuffle(choices)
            i = choices.index(values["full"])
            qvalues["choices"] = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
            values.update(letter=LETTERS[i], choice=values["full"])
            extra = {"expected_answer": LETTERS[i], "choices": choices, "correct_choice": values["full"]}
        elif qtype in (CAPTION, SCENE):
            values["caption"] = caption_sentence(s.caption)
            values["caption_lower"] = values["caption"][:1].lower() + values["caption"][1:]
        answer_tpl = rng.choice(usable(answers, values))
        return fill(question_tpl, qvalues), fill(answer_tpl, values), extra

    def truth_missing(self, qtype: str, a: Address, candidates: list[dict]) -> bool:
        """Whether the answer to `qtype` is absent from the candidates (sub-street level; street for 'street')."""
        subs = {sid for c in candidates for sid in c.get("sub_streets", ())}
        if qtype in (FULL_ADDRESS, CROSS_STREETS):
            return a.sub_street not in subs
        if qtype == STREET:
            streets = {self.hood.addresses[sid].street for sid in subs if sid in self.hood.addresses}
            return a.street not in streets
        return False

    def conversation(self, s: Sample, types: list[str], rng: random.Random, held_out: bool,
                     yes_answers: list[bool], candidates: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
        turns, extras = [], []
        yes_iter = iter(yes_answers)
        for j, qtype in enumerate(types):
            q, ans, extra = self.render(qtype, s, rng, held_out, next(yes_iter) if qtype == YES_NO else None)
            if candidates:
                if j == 0:
                    q = with_candidates(q, candidates, self.config.candidate_scores)
                if self.truth_missing(qtype, s.address, candidates):
                    ans = f"{NONE_FITS} {ans}"
            turns.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if j == 0 else q})
            turns.append({"from": "gpt", "value": ans})
            extras.append(extra)
        return turns, extras


def balanced_answers(n: int, rng: random.Random) -> list[bool]:
    """n yes/no answers, half each (the odd one decided by the RNG), shuffled."""
    answers = [True] * (n // 2) + [False] * (n // 2)
    if n % 2:
        answers.append(rng.random() < 0.5)
    rng.shuffle(answers)
    return answers


def samples_of(df: pd.DataFrame) -> list[Sample]:
    # one Address per sub-street (rows of a sub-street share it), built from column lists: fast on 1M rows
    addresses: dict[str, Address] = {}
    for r in df.drop_duplicates("sub_street").to_dict("records"):
        addresses[str(r["sub_street"])] = Address.from_row(r)
    cols = [df[c].tolist() for c in ("image_id", "image", "sub_street", "caption", "lat", "lon", "utm_x", "utm_y")]
    return [Sample(str(i), str(im), addresses[str(sub)], str(cap or ""), (float(la), float(lo), float(x), float(y)))
            for i, im, sub, cap, la, lo, x, y in zip(*cols)]


def build_train(builder: ConversationBuilder, samples: list[Sample],
                candidates: dict[str, list[dict]] | None = None) -> tuple[list[dict], int]:
    """Training conversations, and the number of images that had no usable question type.

    With `candidates` (image_id -> cross-fitted AddressCLIP top-K), a seeded `candidate_fraction` of the
    conversations carry them in their first user turn; the others stay plain, so one model serves both uses."""
    cfg = builder.config
    candidates = candidates or {}
    plans, skipped = [], 0
    weights = cfg.weights
    for s in samples:
        for k in range(cfg.conversations_per_image):
            rng = make_rng(cfg.seed, "plan", "train", s.image_id, k)
            types = builder.plan(s, weights, rng, rng.randint(cfg.min_turns, cfg.max_turns))
            if types:
                plans.append((s, k, types))
            elif k == 0:
                skipped += 1
    n_yes_no = sum(t.count(YES_NO) for _, _, t in plans)
    yes = iter(balanced_answers(n_yes_no, make_rng(cfg.seed, "yes_no", "train")))
    out = []
    for s, k, types in plans:
        rng = make_rng(cfg.seed, "render", "train", s.image_id, k)
        cands = candidates.get(s.image_id)
        use = bool(cands) and make_rng(cfg.seed, "candidates", s.image_id, k).random() < cfg.candidate_fraction
        cands = cands[: cfg.candidate_k or None] if use else None
        turns, _ = builder.conversation(s, types, rng, False, [next(yes) for t in types if t == YES_NO], cands)
        rid = s.image_id if cfg.conversations_per_image == 1 else f"{s.image_id}-{k}"
        rec = {"id": rid, "image": s.image, "conversations": turns, "turn_types": types}
        if cands:
            rec["candidates"] = [c["address"] for c in cands]
        out.append(rec)
    return out, skipped


def _expected_text(values: dict[str, str], qtype: str) -> str:
    """The address text a correct answer to an open question names (yes/no and MC override it)."""
    key = {STREET: "street", CROSS_STREETS: "segment", PLACE: "place"}.get(qtype, "full")
    return values[key]


def build_eval(builder: ConversationBuilder, samples: list[Sample]) -> tuple[list[dict], int]:
    """One question per evaluation image with its structured reference."""
    cfg = builder.config
    plans, skipped = [], 0
    weights = cfg.eval_weights
    for s in samples:
        rng = make_rng(cfg.seed, "plan", "eval", s.image_id)
        types = builder.plan(s, weights, rng, 1)
        if types:
            plans.append((s, types, rng.random() < cfg.eval_held_out_prob))
        else:
            skipped += 1
    yes = iter(balanced_answers(sum(t == [YES_NO] for _, t, _ in plans), make_rng(cfg.seed, "yes_no", "eval")))
    out = []
    for s, types, held_out in plans:
        rng = make_rng(cfg.seed, "render", "eval", s.image_id)
        turns, (extra,) = builder.conversation(s, types, rng, held_out, [next(yes)] if types == [YES_NO] else [])
        a = s.address
        ref = dict(image_id=s.image_id, question_type=types[0], phrasing="held_out" if held_out else "seen",
                   street=a.street, sub_street=a.sub_street, cross_streets=a.cross_streets,
                   neighbourhood=a.neighbourhood, city=a.city, address=render_address(a, cfg.address_style),
                   expected_answer=_expected_text(builder.values(a), types[0]),
                   lat=s.position[0], lon=s.position[1], utm_x=s.position[2], utm_y=s.position[3])
        ref.update(extra)
        out.append({"id": s.image_id, "image": s.image, "conversations": turns, "question_type": types[0],
                    "reference": Reference(**ref).to_dict()})
    return out, skipped


def summarise(records: list[dict]) -> dict:
    types, yes_no = Counter(), Counter()
    for rec in records:
        rec_types = rec.get("turn_types") or [rec["question_type"]]
        types.update(rec_types)
        for t, turn in zip(rec_types, rec["conversations"][1::2]):
            if t == YES_NO:
                yes_no["yes" if turn["value"].startswith("Yes") else "no"] += 1
    return {"records": len(records), "turns": sum(len(r["conversations"]) // 2 for r in records),
            "question_types": dict(sorted(types.items())), "yes_no": dict(sorted(yes_no.items()))}


def check_records(records: pd.DataFrame, path) -> None:
    """Refuses rows the builder cannot use, naming the file, row index, image id and field."""
    for col in ("image_id", "image", "street", "sub_street", "split"):
        empty = records[col].isna() | (records[col].astype(str).str.strip() == "")
        if empty.any():
            i = int(empty.to_numpy().nonzero()[0][0])
            raise ValueError(f"{path}: record {i} (image_id={records['image_id'].iloc[i]!r}): field {col!r} is empty")
    for col in ("lat", "lon", "utm_x", "utm_y"):
        bad = ~pd.to_numeric(records[col], errors="coerce").notna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise ValueError(f"{path}: record {i} (image_id={records['image_id'].iloc[i]!r}): field {col!r} "
                             f"is not a number: {records[col].iloc[i]!r}")
    dup = records["image_id"].duplicated()
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise ValueError(f"{path}: record {i} (image_id={records['image_id'].iloc[i]!r}): field 'image_id' "
                         "occurs more than once")
    # every row of a sub-street must carry the same address (the builder renders it once per sub-street)
    first = records.drop_duplicates("sub_street").set_index("sub_street")["address_full"]
    differs = records["address_full"].to_numpy() != first.loc[records["sub_street"]].to_numpy()
    if differs.any():
        i = int(differs.nonzero()[0][0])
        raise ValueError(f"{path}: record {i} (image_id={records['image_id'].iloc[i]!r}): field 'address_full' "
                         f"{records['address_full'].iloc[i]!r} differs from other rows of sub-street "
                         f"{records['sub_street'].iloc[i]!r} ({first.loc[records['sub_street'].iloc[i]]!r})")


def build(config: BuildConfig) -> dict:
    """Builds and writes everything; returns the build info."""
    paths = DatasetPaths(config.dataset)
    # One rule for every command's --out (clip_stage.core.outdir), checked before anything is read; build_info.json
    # marks conversation folders written before it. --out = the dataset (or its parent) is refused.
    check_out_dir(config.out, "conversations", inputs=[config.dataset, paths.images, config.candidates or None],
                  overwrite=config.overwrite, legacy=["build_info.json", "train.json", "eval.json"])
    records = read_records(config.dataset)
    check_records(records, paths.records)
    check_record_images(config.dataset, records, must_exist=False)  # never an image outside the dataset
    builder = ConversationBuilder(config, build_neighbourhood(records, config.dataset))

    def split_samples(splits):
        df = records[records["split"].isin(splits)]
        return samples_of(df.head(config.limit) if config.limit else df)

    train_samples, eval_samples = split_samples(config.train_split_list), split_samples(config.eval_split_list)
    if not train_samples and not eval_samples:
        raise ValueError(f"{paths.records}: no images in splits {config.train_splits} / {config.eval_splits}")
    candidates = None
    if config.candidates:
        # lazy: it imports torch, which only --candidates needs
        from clip_stage.candidates import check_candidates_match, read_candidates

        candidates = read_candidates(config.candidates)
        check_candidates_match(config.candidates, config.dataset, records)
        missing = sum(s.image_id not in candidates for s in train_samples)
        if missing == len(train_samples) and train_samples:
            raise ValueError(f"{config.candidates}: no candidates for any training image of {config.dataset}")
        if missing:
            log.warning("%d training images have no candidates in %s; their conversations stay plain", missing,
                        config.candidates)
    train, train_skipped = build_train(builder, train_samples, candidates)
    evaluation, eval_skipped = build_eval(builder, eval_samples)
    for name, n in (("training", train_skipped), ("evaluation", eval_skipped)):
        if n:
            log.warning("%d %s images had no question type available under the weights and were skipped", n, name)

    info = {
        "dataset": str(Path(config.dataset).resolve()),
        "image_root": str(paths.images.resolve()),
        "config": asdict(config),
        "train": {**summarise(train), "images": len(train_samples), "skipped_images": train_skipped,
                  "with_candidates": sum("candidates" in r for r in train),
                  "candidates_without_truth": sum(NONE_FITS in t["value"] for r in train for t in r["conversations"][1:2])},
        "eval": {**summarise(evaluation), "images": len(eval_samples), "skipped_images": eval_skipped},
        "files": {},
    }
    fmt = config.format_list
    with atomic_dir(config.out) as tmp:  # --out was checked at the start (check_out_dir)
        write_marker(tmp, "conversations")
        for name, recs in (("train", train), ("eval", evaluation)):
            if "llava" in fmt:
                write_json_array(tmp / f"{name}.json", recs)
                info["files"][f"{name}"] = f"{name}.json"
            if "jsonl" in fmt:
                write_jsonl(tmp / f"{name}.jsonl", recs)
                info["files"][f"{name}_jsonl"] = f"{name}.jsonl"
            if "messages" in fmt:
                write_json_array(tmp / f"{name}_messages.json", (formats.to_messages(r) for r in recs))
                info["files"][f"{name}_messages"] = f"{name}_messages.json"
            if "messages-trl" in fmt:
                write_json_array(tmp / f"{name}_messages_trl.json", (formats.to_messages(r, "trl") for r in recs))
                info["files"][f"{name}_messages_trl"] = f"{name}_messages_trl.json"
        for kind in ("disk", "parquet"):
            if f"hf-{kind}" in fmt:
                formats.export_hf(tmp / "hf" if kind == "disk" else tmp / "hf_parquet", {"train": train, "eval": evaluation}, kind)
                info["files"][f"hf_{kind}"] = "hf" if kind == "disk" else "hf_parquet"
        if "messages" in fmt:  # LLaMA-Factory finds the messages files through this registry (--dataset_dir CONV)
            atomic_write_json(tmp / "dataset_info.json", formats.llamafactory_dataset_info(
                {name: f"{name}_messages.json" for name in ("train", "eval")}))
            info["files"]["llamafactory"] = "dataset_info.json"
        atomic_write_json(tmp / "build_info.json", info)
    return info


def build_parser() -> ConfigParser:
    return ConfigParser([Section("conversations", BuildConfig)], prog="address-llava conversations", description=__doc__)


@command_main("conversations")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = build_parser().parse_config(argv)["conversations"]
    try:
        info = build(config)
    except (ValueError, FileExistsError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() adds quotes
        print(f"conversations: error: {message}", file=sys.stderr)
        return 2
    for split in ("train", "eval"):
        s = info[split]
        print(f"{split}: {s['records']} conversations, {s['turns']} turns from {s['images']} images; "
              f"types {s['question_types']}; yes/no {s['yes_no']}")
    print(f"wrote {config.out} ({', '.join(info['files'].values())}); image root {info['image_root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
