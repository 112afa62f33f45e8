"""Statistics of a LLaVA-format conversation file, as text (and JSON) and as a PNG of histograms.

    address-llava conv-stats CONV/train.json [--tokenizer DIR] [--png stats.png] [--json stats.json]

Reports records, turns (question/answer pairs) per record, question types, answer lengths in tokens
(with `--tokenizer`, any `AutoTokenizer` folder; whitespace-separated words otherwise), the yes/no
balance and how many questions use held-out phrasings. Question types come from a record's `turn_types`
or `question_type` when present (our files), otherwise from matching the question against the phrasing
registry ("other" when nothing matches), so any LLaVA file can be summarised. Streamed: memory does
not grow with the number of records. Records it cannot read (not JSON, or no list of turns with text) are
counted as malformed and skipped; the other rules (roles, images, ids) are `validate`'s, which this does not
repeat. Files in the `messages` form (LLaMA-Factory / TRL) are read too.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, atomic_write_with, require_file
from clip_stage.core.outdir import TOKENIZER_FILES, check_model_folder, check_out_files

from conversations.records import iter_records
from conversations.templates import classify_question


@dataclass
class Stats:
    path: str
    tokenizer: str = "whitespace"
    records: int = 0
    malformed: int = 0
    turns_per_record: Counter = field(default_factory=Counter)
    question_types: Counter = field(default_factory=Counter)
    answer_tokens: Counter = field(default_factory=Counter)
    answer_tokens_by_type: dict = field(default_factory=dict)
    yes_no: Counter = field(default_factory=Counter)
    phrasing: Counter = field(default_factory=Counter)

    @staticmethod
    def _mean(c: Counter) -> float:
        n = sum(c.values())
        return sum(k * v for k, v in c.items()) / n if n else 0.0

    @staticmethod
    def _quantile(c: Counter, q: float) -> int:
        n, acc = sum(c.values()), 0
        for k in sorted(c):
            acc += c[k]
            if acc >= q * n:
                return k
        return 0

    def as_dict(self) -> dict:
        a = self.answer_tokens
        return {
            "path": self.path, "tokenizer": self.tokenizer, "records": self.records, "malformed": self.malformed,
            "turns": sum(k * v for k, v in self.turns_per_record.items()),
            "turns_per_record": {str(k): v for k, v in sorted(self.turns_per_record.items())},
            "question_types": dict(sorted(self.question_types.items())),
            "answer_tokens": {"count": sum(a.values()), "mean": round(self._mean(a), 2), "min": min(a, default=0),
                              "median": self._quantile(a, 0.5), "p95": self._quantile(a, 0.95), "max": max(a, default=0)},
            "answer_tokens_mean_by_type": {t: round(self._mean(c), 2) for t, c in sorted(self.answer_tokens_by_type.items())},
            "yes_no": dict(sorted(self.yes_no.items())),
            "phrasing": dict(sorted(self.phrasing.items())),
        }

    def text(self) -> str:
        d = self.as_dict()
        a = d["answer_tokens"]
        yes, no = self.yes_no.get("yes", 0), self.yes_no.get("no", 0)
        lines = [
            f"file               {self.path}",
            f"records            {self.records}" + (f" ({self.malformed} malformed, skipped)" if self.malformed else ""),
            f"turns              {d['turns']} (per record: "
            + ", ".join(f"{k}: {v}" for k, v in d["turns_per_record"].items()) + ")",
            "question types     " + ", ".join(f"{k}: {v}" for k, v in d["question_types"].items()),
            f"answer length      {self.tokenizer} tokens: mean {a['mean']}, median {a['median']}, p95 {a['p95']}, "
            f"min {a['min']}, max {a['max']} over {a['count']} answers",
            "  mean by type     " + ", ".join(f"{k}: {v}" for k, v in d["answer_tokens_mean_by_type"].items()),
            f"yes/no balance     yes {yes}, no {no}" + (f" ({yes / (yes + no):.1%} yes)" if yes + no else "")
            + (f", unclear {self.yes_no['unclear']}" if self.yes_no.get("unclear") else ""),
            "phrasings          " + ", ".join(f"{k}: {v}" for k, v in d["phrasing"].items()),
        ]
        return "\n".join(lines)


def _tokenizer_counter(path: str | None):
    if not path:
        return lambda texts: [len(t.split()) for t in texts]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return lambda texts: [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def _turn_types(rec: dict, humans: list[str]) -> tuple[list[str], list[str]]:
    """(question types, phrasing kinds) of a record's questions."""
    declared = rec.get("turn_types") or ([rec["question_type"]] if rec.get("question_type") else None)
    types, phrasing = [], []
    for j, q in enumerate(humans):
        found = classify_question(q)
        if declared and len(declared) == len(humans):
            types.append(str(declared[j]))
        else:
            types.append(found[0] if found else "other")
        phrasing.append(("held_out" if found[1] else "seen") if found else "unknown")
    return types, phrasing


def _conversation(rec: dict):
    """LLaVA `conversations`, or the `messages` form (LLaMA-Factory / TRL) mapped onto it."""
    if "conversations" in rec or not isinstance(rec.get("messages"), list):
        return rec.get("conversations")
    conv = []
    for m in rec["messages"]:
        if not isinstance(m, dict) or m.get("role") == "system":
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        conv.append({"from": "human" if m.get("role") == "user" else "gpt", "value": content})
    return conv


def compute_stats(path: str, tokenizer: str | None = None, batch: int = 512) -> Stats:
    count = _tokenizer_counter(tokenizer)
    st = Stats(str(path), tokenizer or "whitespace")
    pending: list[tuple[str, str]] = []  # (type, answer) awaiting tokenisation in a batch

    def flush() -> None:
        for (t, _), n in zip(pending, count([a for _, a in pending])):
            st.answer_tokens[n] += 1
            st.answer_tokens_by_type.setdefault(t, Counter())[n] += 1
        pending.clear()

    for item in iter_records(path):
        if item.error:
            st.malformed += 1
            if item.fatal:
                break
            continue
        rec = item.value
        conv = _conversation(rec) if isinstance(rec, dict) else None
        if not isinstance(conv, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv):
            st.malformed += 1
            continue
        st.records += 1
        humans = [t["value"] for t in conv[0::2]]
        answers = [t["value"] for t in conv[1::2]]
        st.turns_per_record[len(answers)] += 1
        types, phrasing = _turn_types(rec, humans)
        st.phrasing.update(phrasing)
        for t, ans in zip(types, answers):
            st.question_types[t] += 1
            if t == "yes_no":
                word = ans.strip().split(maxsplit=1)[0].strip(".,:;!").lower() if ans.strip() else ""
                st.yes_no[word if word in ("yes", "no") else "unclear"] += 1
            pending.append((t, ans))
        if len(pending) >= batch:
            flush()
    flush()
    return st


def plot(st: Stats, png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lengths = sorted(st.answer_tokens)
    ax = axes[0]
    if lengths:
        ax.hist(lengths, weights=[st.answer_tokens[k] for k in lengths], bins=min(40, max(5, len(lengths))),
                color="#4c72b0", edgecolor="white")
    ax.set(title=f"answer length ({st.tokenizer} tokens)", xlabel="tokens", ylabel="answers")
    ax = axes[1]
    ks = sorted(st.turns_per_record)
    ax.bar([str(k) for k in ks], [st.turns_per_record[k] for k in ks], color="#55a868")
    ax.set(title="question/answer pairs per record", xlabel="pairs", ylabel="records")
    ax = axes[2]
    names = sorted(st.question_types)
    ax.barh(names, [st.question_types[n] for n in names], color="#c44e52")
    yes, no = st.yes_no.get("yes", 0), st.yes_no.get("no", 0)
    ax.set(title=f"question types (yes/no: {yes} yes, {no} no)", xlabel="questions")
    fig.suptitle(f"{Path(st.path).name}: {st.records} records", fontsize=11)
    fig.tight_layout()
    try:
        atomic_write_with(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava conv-stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="LLaVA JSON (array) or JSON lines file")
    p.add_argument("--tokenizer", help="tokenizer folder (AutoTokenizer) for answer lengths; whitespace words otherwise")
    p.add_argument("--png", help="write the histograms to this PNG file")
    p.add_argument("--json", help="write the statistics to this JSON file")
    return p


@command_main("conv-stats")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_file(args.file)
    check_out_files({"--png": args.png, "--json": args.json}, [args.file, args.tokenizer])
    if args.tokenizer:
        check_model_folder(args.tokenizer, "--tokenizer", needs=TOKENIZER_FILES, what="tokenizer")
    st = compute_stats(args.file, args.tokenizer)
    print(st.text())
    if args.json:
        atomic_write_json(args.json, st.as_dict())
    if args.png:
        plot(st, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
