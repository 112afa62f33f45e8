"""Benchmark: several systems answer the same evaluation split and are scored the same way.

    address-llava benchmark --dataset DATA --eval eval.json --out runs/bench \
        --system ours=llava:runs/llava-merged \
        --system base=llava:llava-hf/llava-1.5-7b-hf \
        --system addressclip=clip:runs/clip \
        --system qwen=hf:Qwen/Qwen2-VL-2B-Instruct \
        --system gpt-4o=jsonl:answers/gpt-4o.jsonl

A system is `NAME=KIND:TARGET[,key=value...]`; the kinds are a registry (`SYSTEM_KINDS`, `--list-kinds`):

- llava: a LLaVA folder or hub id (merged, or the untuned base); `adapter=CKPT` applies a train-llava
  checkpoint. Prompts are the training template (`llava_address.prompting`), batched with the KV cache.
  `candidates=CLIP_CHECKPOINT` (with `top_k=5`, `candidate_scores=true`: infer's `--top-k`, `--candidate-scores`)
  writes AddressCLIP's top-K addresses of the photo into the question (`conversations.candidates`): the
  candidate-grounded system, e.g. `--system ours_candidates=llava:runs/merged,candidates=runs/clip`.
  `--engine vllm` serves every llava system through vLLM (merged folders only; `llava_address.eval.vllm_engine`).
- clip: AddressCLIP retrieval: a train-clip checkpoint (or `model=NAME` + `pretrained=TAG` for open_clip);
  the answer is the top-1 address of the city's gallery (`style=full` by default). Multiple-choice
  questions are answered by ranking the options listed in the question; a yes/no question about a place it
  names (`parse.asks_yes_no`; "What is near X?" is not one) is answered "Yes" when retrieval's top-1
  address is that place (the same sub-street when the question names one, else the same street), else "No"
  (`verify_by_top1`).
- hf: any vision-language model transformers' `pipeline("image-text-to-text")` runs (hub id or folder),
  prompted with the question alone through the model's own chat template.
- jsonl: answers produced elsewhere (closed APIs), `{"id", "answer"}` per line, scored as they are.

Every generated answer file (`OUT/answers/NAME.jsonl`) is resumable: rerunning skips answered ids, and
answers beyond a smaller `--limit` are left unscored. `NAME.system.json` beside it records what wrote it
(kind, target, options, and a fingerprint of the model folder's files), checked before anything loads by the
one rule `infer` keeps too (`answers.check_answers_record`): answers that another model wrote (or the same folder
re-merged), or with no record, are refused. A
system that fails (missing weights, a missing image) is reported with its error while the others are
still scored; the command then exits non-zero. Outputs: `OUT/benchmark.md` (table), `OUT/benchmark.json`
(all reports), `OUT/benchmark.png` (bar chart).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, atomic_write_text, atomic_write_with
from clip_stage.core.outdir import check_out_dir, looks_local, write_marker
from clip_stage.core.registry import Registry
from llava_address.eval.gazetteer import Gazetteer
from llava_address.eval.parse import asks_yes_no
from llava_address.eval.answers import answers_source, check_answers_record, record_answers
from llava_address.eval.infer import (InferenceInputError, adapter_models, candidate_answer_batch, check_run_options,
                                      eval_items, llava_answer_batch, load_generator, load_ranker, run_answers)
from llava_address.eval.scoring import METRICS, Scorer, read_answers, read_references
from llava_address.eval.vllm_engine import load_vllm, vllm_answer_batch, vllm_unavailable

if TYPE_CHECKING:  # clip_stage.gallery imports torch: loaded only when an AddressCLIP system runs
    from clip_stage.gallery import Candidate, Gallery

log = logging.getLogger(__name__)

ADDRESS_TYPES = frozenset({"full", "street", "cross", "neighbourhood", "scene"})
ALL_TYPES = ADDRESS_TYPES | {"yesno", "mc"}
METRIC_LABELS = {"street_acc": "street", "sub_street_acc": "sub-street", "cross_acc": "cross streets",
                 "neighbourhood_acc": "neighbourhood", "yesno_acc": "yes/no", "mc_acc": "multiple choice"}


class BenchmarkError(ValueError):
    """A malformed system spec, an unknown kind, a duplicate system name."""


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str
    target: str
    options: dict[str, str] = field(default_factory=dict)

    def __hash__(self):
        return hash((self.name, self.kind, self.target))


def parse_system_spec(text: str) -> SystemSpec:
    """'NAME=KIND:TARGET[,key=value...]' -> SystemSpec."""
    m = re.fullmatch(r"([A-Za-z0-9_.+-]+)=([a-z_]+):(.*)", text.strip())
    if not m:
        raise BenchmarkError(f"system {text!r}: expected NAME=KIND:TARGET[,key=value...] "
                             f"(e.g. ours=llava:runs/merged); kinds: {sorted(SYSTEM_KINDS)}")
    name, kind, rest = m.groups()
    get_system_kind(kind)
    target, *opts = rest.split(",")
    options = {}
    for o in opts:
        if "=" not in o:
            raise BenchmarkError(f"system {name!r}: option {o!r} is not key=value")
        k, v = o.split("=", 1)
        options[k.strip()] = v.strip()
    return SystemSpec(name, kind, target.strip(), options)


@dataclass
class RunContext:
    dataset: Path
    device: str = "cpu"
    dtype: str = "auto"
    max_new_tokens: int = 64
    batch_size: int = 8
    engine: str = "hf"
    """what serves `llava` systems: hf (transformers generate) or vllm (`llava_address.eval.vllm_engine`)"""


@dataclass
class System:
    """A loaded system: answers (questions, PIL images) batches; `supports` are the question types it can answer."""

    answer_batch: Callable[[list[str], list], list[str]]
    supports: frozenset[str] = ALL_TYPES


@dataclass(frozen=True)
class SystemKind:
    name: str
    help: str
    load: Callable[[SystemSpec, RunContext], System] | None
    """None: the answers are imported, not generated"""
    supports: frozenset[str] = ALL_TYPES
    options: tuple[str, ...] = ()
    """the key=value options it takes (checked for every system before any loads)"""
    paths: tuple[str, ...] = ()
    """"target" and the options that name local folders or files: each must exist (checked up front)"""


# an unknown kind is a bad --system spec, reported like the other spec errors
SYSTEM_KINDS: Registry[SystemKind] = Registry("system kind", error=BenchmarkError)
get_system_kind = SYSTEM_KINDS.lookup


def register_system_kind(kind: SystemKind) -> None:
    SYSTEM_KINDS.register(kind.name, kind)


_POSITIVE_INT_OPTIONS = ("max_new_tokens", "top_k")
_BOOLEAN_OPTIONS = ("pad_to_square", "candidate_scores")


def _named_paths(spec: SystemSpec) -> list[tuple[str, str]]:
    """(option, path) of every path a system names: its target, adapter=, candidates= ... as its kind lists them."""
    keys = get_system_kind(spec.kind).paths
    named = ((key, spec.target if key == "target" else spec.options.get(key)) for key in keys)
    return [(key, path) for key, path in named if path]


def spec_paths(spec: SystemSpec) -> list[str]:
    """The local paths a system reads."""
    return [path for _, path in _named_paths(spec) if os.path.exists(path)]


def check_system_spec(spec: SystemSpec) -> None:
    """Everything a --system spec says that can be checked without loading it: its kind, option names, numbers
    and the paths it names (a typo is one line before any model loads, not a failure after the others ran)."""
    kind = get_system_kind(spec.kind)
    bad = sorted(set(spec.options) - set(kind.options))
    if bad:
        raise BenchmarkError(f"system {spec.name!r} ({spec.kind}): unknown option(s) {bad}; valid: {sorted(kind.options)}")
    for key in _POSITIVE_INT_OPTIONS:
        value = spec.options.get(key)
        if value is not None and not (value.isdigit() and int(value) >= 1):
            raise BenchmarkError(f"system {spec.name!r}: {key}={value} must be a whole number >= 1")
    for key in _BOOLEAN_OPTIONS:
        value = spec.options.get(key)
        if value is not None and value.lower() not in ("true", "false"):
            raise BenchmarkError(f"system {spec.name!r}: {key}={value} must be true or false")
    for key in ("top_k", "candidate_scores"):
        if key in spec.options and "candidates" not in spec.options:
            raise BenchmarkError(f"system {spec.name!r}: {key} is for candidate-grounded answers; give candidates= too")
    for key, path in _named_paths(spec):
        if not os.path.exists(path) and (key != "target" or spec.kind == "jsonl" or looks_local(path)):
            raise BenchmarkError(f"system {spec.name!r}: {'the target' if key == 'target' else key} {path}: not found")
    if spec.kind == "llava" and spec.target and os.path.isdir(spec.target) \
            and not os.path.isfile(os.path.join(spec.target, "config.json")):
        raise BenchmarkError(f"system {spec.name!r}: {spec.target}: not a model folder (no config.json)")
    if spec.options.get("adapter"):
        try:  # the models its checkpoint stores are part of the answers record (`_answers_source`)
            adapter_models(spec.options["adapter"], spec.target)
        except (OSError, ValueError) as e:
            raise BenchmarkError(f"system {spec.name!r}: adapter {e}") from None


# --- llava ---------------------------------------------------------------------------------------------

def _load_llava(spec: SystemSpec, ctx: RunContext) -> System:
    ranker = load_ranker(spec.options["candidates"], ctx.dataset) if spec.options.get("candidates") else None
    if ctx.engine == "vllm":
        vgen = load_vllm(spec.target or None, spec.options.get("adapter"), ctx.dtype)
        vgen.pad_to_square = spec.options.get("pad_to_square", "true").lower() != "false"
        answer_batch = vllm_answer_batch(vgen, int(spec.options.get("max_new_tokens", ctx.max_new_tokens)))
    else:
        gen = load_generator(spec.target or None, spec.options.get("adapter"), ctx.device, ctx.dtype)
        gen.pad_to_square = spec.options.get("pad_to_square", "true").lower() != "false"
        answer_batch = llava_answer_batch(gen, int(spec.options.get("max_new_tokens", ctx.max_new_tokens)))
    if ranker is not None:
        answer_batch = candidate_answer_batch(answer_batch, ranker, int(spec.options.get("top_k", 5)),
                                              spec.options.get("candidate_scores", "false").lower() == "true")
    return System(answer_batch)


register_system_kind(SystemKind("llava", "LLaVA folder/hub id (merged or base), adapter=train-llava checkpoint, "
                                         "candidates=CLIP_CHECKPOINT[,top_k=5,candidate_scores=true] for "
                                         "candidate-grounded answers", _load_llava,
                                options=("adapter", "max_new_tokens", "pad_to_square", "candidates", "top_k",
                                         "candidate_scores"),
                                paths=("target", "adapter", "candidates")))


# --- AddressCLIP retrieval -----------------------------------------------------------------------------

_CHOICE_LINE = re.compile(r"^\s*\(?([A-H])[\.\):]\s*(.+?)\s*$")


def choices_in_question(question: str) -> list[tuple[str, str]]:
    """[(letter, text)] of the options a multiple-choice question lists one per line ('A. ...', '(B) ...')."""
    return [(m.group(1), m.group(2)) for m in map(_CHOICE_LINE.match, question.splitlines()) if m]


def verify_by_top1(question: str, top1: Candidate, gazetteer: Gazetteer) -> str | None:
    """Retrieval's yes/no answer to a question that asks for a verdict (`parse.asks_yes_no`) about a place it
    names, or None for any other question ("What is near X?" is answered with the top-1 address).

    The place is what the benchmark's own gazetteer reads in the question (the scorer's parser): "Yes" when
    retrieval's top-1 address is that sub-street (a question naming cross streets: the top-1 is on the street
    and has those cross streets, which also decides "X near Y" when Y meets X twice) or lies on that street (a
    question naming a street alone), else "No". The top-1 address follows the verdict.
    """
    if not asks_yes_no(question):
        return None
    parsed = gazetteer.parse(question)
    if parsed.street is None:
        return None
    if parsed.sub_street:
        same = parsed.sub_street in top1.sub_streets
    elif parsed.cross_streets:
        subs = [gazetteer.sub_streets[i] for i in top1.sub_streets if i in gazetteer.sub_streets]
        same = any(s.street == parsed.street and set(parsed.cross_streets) <= set(s.cross_streets) for s in subs)
    else:
        same = parsed.street in top1.streets
    return f"{'Yes' if same else 'No'}. This is {top1.text}."


def clip_retrieval(bundle, gallery: Gallery, text_embeddings, gazetteer: Gazetteer | None = None,
                   device: str = "cpu"):
    """answer_batch for a CLIP model: top-1 gallery address, the best-ranked listed option for MC, and (with a
    gazetteer) a verdict for a yes/no question about a place (`verify_by_top1`)."""
    import torch

    @torch.no_grad()
    def answer_batch(questions: list[str], images: list) -> list[str]:
        model = bundle.model.eval()
        pix = torch.stack([bundle.preprocess_val(im) for im in images]).to(device)
        img = model.encode_image(pix, normalize=True).float().cpu()
        answers = []
        for q, e in zip(questions, img):
            choices = choices_in_question(q)
            if len(choices) >= 2:
                from clip_stage.gallery import encode_texts  # lazy: torch only for an AddressCLIP system

                t = encode_texts(model, bundle.tokenizer, [c for _, c in choices], device=device)
                best = int(torch.argmax(t @ e))
                answers.append(f"{choices[best][0]}. {choices[best][1]}")
            else:
                top1 = gallery.candidates[int(torch.argmax(text_embeddings @ e))]
                verdict = verify_by_top1(q, top1, gazetteer) if gazetteer is not None else None
                answers.append(verdict or top1.text)
        return answers

    return answer_batch


def _load_clip(spec: SystemSpec, ctx: RunContext) -> System:
    # lazy: torch and open_clip load only when an AddressCLIP system is benchmarked
    from clip_stage.gallery import GalleryEncoder, gallery_from_dataset
    from clip_stage.model import create_clip, load_checkpoint

    if spec.target:
        bundle = load_checkpoint(spec.target, device=ctx.device)
    elif spec.options.get("model"):
        bundle = create_clip(spec.options["model"], spec.options.get("pretrained"), device=ctx.device)
    else:
        raise BenchmarkError(f"system {spec.name!r}: give a train-clip checkpoint, or model=NAME[,pretrained=TAG]")
    gallery = gallery_from_dataset(ctx.dataset, spec.options.get("style", "full"))
    emb = GalleryEncoder(None, device=ctx.device)(bundle.model, bundle.tokenizer, gallery.texts)
    return System(clip_retrieval(bundle, gallery, emb, Gazetteer.from_dataset(ctx.dataset), ctx.device))


register_system_kind(SystemKind("clip", "AddressCLIP retrieval: train-clip checkpoint (or model=,pretrained=); "
                                        "top-1 gallery address; yes/no by whether the top-1 is the named place",
                                _load_clip, options=("model", "pretrained", "style"), paths=("target",)))


# --- any HF image-text-to-text model -------------------------------------------------------------------

def hf_pipeline_answer_batch(pipe, max_new_tokens: int = 64):
    def answer_batch(questions: list[str], images: list) -> list[str]:
        messages = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
                    for q, im in zip(questions, images)]
        outs = pipe(text=messages, max_new_tokens=max_new_tokens, return_full_text=False, batch_size=len(messages))
        answers = []
        for o in outs:
            o = o[0] if isinstance(o, list) else o
            text = o["generated_text"]
            if isinstance(text, list):  # a chat transcript: take the assistant's reply
                text = text[-1]["content"] if text else ""
            answers.append(str(text).strip())
        return answers

    return answer_batch


def _load_hf(spec: SystemSpec, ctx: RunContext) -> System:
    from transformers import pipeline

    if not spec.target:
        raise BenchmarkError(f"system {spec.name!r}: give a hub id or model folder")
    try:
        pipe = pipeline("image-text-to-text", model=spec.target, device=ctx.device,
                        dtype="auto" if ctx.dtype == "auto" else ctx.dtype,
                        trust_remote_code=spec.options.get("trust_remote_code", "false").lower() == "true")
    except (OSError, ValueError) as e:
        raise InferenceInputError(f"cannot load {spec.target} as an image-text-to-text pipeline: {e}") from e
    tok = getattr(getattr(pipe, "processor", None), "tokenizer", None) or getattr(pipe, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"  # batched generation appends on the right
    return System(hf_pipeline_answer_batch(pipe, int(spec.options.get("max_new_tokens", ctx.max_new_tokens))))


register_system_kind(SystemKind("hf", "any transformers image-text-to-text model (hub id or folder)", _load_hf,
                                options=("max_new_tokens", "trust_remote_code"), paths=("target",)))
register_system_kind(SystemKind("jsonl", "imported answers JSONL (closed models): id, answer", None,
                                paths=("target",)))


# --- running, scoring, reporting -----------------------------------------------------------------------

def _answers_source(spec: SystemSpec) -> dict:
    """What writes a system's answers (`answers.answers_source`): its kind, target and options (local paths as
    real paths) and the contents of each local path its kind names (a hub id is identified by its id), with the
    vision tower an `adapter=` checkpoint loads besides itself (`infer.adapter_models`)."""
    options, paths = dict(spec.options), get_system_kind(spec.kind).paths
    if spec.options.get("adapter"):
        stored = adapter_models(spec.options["adapter"], spec.target)
        options.update(stored)
        paths = (*paths, *stored)
    return answers_source(spec.kind, spec.target, options, paths)


def check_answers_source(answers_path: Path, spec: SystemSpec) -> dict:
    """Refuses to resume answers that were not provably written by this system (`answers.check_answers_record`,
    the one check of `infer` and `benchmark`): another kind, target, options, or the same folder holding another
    model now, or answers with no record of what wrote them. Returns the source to record."""
    return check_answers_record(answers_path, _answers_source(spec), label=f"system {spec.name}: ",
                                todo="use another --out or another system name", error=BenchmarkError)


def record_answers_source(answers_path: Path, source: SystemSpec | dict) -> None:
    """Writes `NAME.system.json` beside the answers (`answers.record_answers`), after `check_answers_source`."""
    record_answers(answers_path, _answers_source(source) if isinstance(source, SystemSpec) else source)


def _within_limit(rows: list[dict], references: dict, split_ids: set[str]) -> list[dict]:
    """The answer rows to score under --limit: answers to the split's questions beyond the limit are left out,
    not counted as bad rows (an earlier run with a larger limit wrote them); any other row stays, for the
    scorer to judge (an id that is in no split is still a bad row)."""
    return [r for r in rows if "id" not in r or str(r["id"]) in references or str(r["id"]) not in split_ids]


def run_benchmark(specs: Sequence[SystemSpec], dataset: str | Path, eval_file: str | Path, out_dir: str | Path,
                  image_root: str | Path | None = None, ctx: RunContext | None = None, scorer: Scorer | None = None,
                  limit: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Answers (where needed) and scores every system; returns name -> result, failures included."""
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchmarkError(f"duplicate system names {dup}")
    dataset = Path(dataset)
    out_dir = Path(out_dir)
    image_root = Path(image_root) if image_root is not None else dataset / "images"
    ctx = ctx or RunContext(dataset)
    items = eval_items(eval_file, limit, command="benchmark")
    references = read_references(eval_file)
    split_ids = set(references)
    if limit is not None:
        references = {it.id: references[it.id] for it in items}
    sources: dict[str, dict] = {}
    for spec in specs:  # before any model loads: a bad spec, or resumed answers from another system
        check_system_spec(spec)
        if get_system_kind(spec.kind).load is not None:
            sources[spec.name] = check_answers_source(out_dir / "answers" / f"{spec.name}.jsonl", spec)
    scorer = scorer or Scorer.from_dataset(dataset)
    results: dict[str, dict] = {}
    for spec in specs:
        kind = get_system_kind(spec.kind)
        res: dict[str, Any] = {"kind": spec.kind, "target": spec.target, "supports": sorted(kind.supports)}
        try:
            bad: list[dict] = []  # rows that cannot be scored: skipped and listed in the report
            if kind.load is None:
                answers_path = Path(spec.target)
                rows = read_answers(answers_path, bad)
            else:
                answers_path = out_dir / "answers" / f"{spec.name}.jsonl"
                system = kind.load(spec, ctx)
                record_answers_source(answers_path, sources[spec.name])
                res["supports"] = sorted(system.supports)
                res["counts"] = run_answers(system.answer_batch, items, image_root, answers_path, ctx.batch_size,
                                            progress)
                rows = read_answers(answers_path, bad)
            if limit is not None:  # answers for the whole split (imported, or an earlier run's): the --limit ones
                rows = _within_limit(rows, references, split_ids)
            report = scorer.score(rows, references, source=str(answers_path), bad_rows=bad)
            if bad:
                log.warning("system %s: %d answer rows skipped as unscorable (first: %s: %s); listed in "
                            "benchmark.json", spec.name, len(bad), bad[0]["where"], bad[0]["error"])
            res.update(answers=str(answers_path), report=report.to_dict())
        except Exception as e:  # one failing system must not lose the others' results
            log.error("system %s failed: %s", spec.name, e)
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc(limit=5)
        results[spec.name] = res
    write_outputs(results, out_dir)
    return results


def _supported_metric(res: dict, metric: str) -> bool:
    return bool(set(METRICS[metric]) & set(res.get("supports", ALL_TYPES)))


def shown_metrics(report: dict) -> dict:
    """What the table and plot show: unanswered questions counted wrong (one denominator for every system)."""
    return report.get("strict_metrics") or report["metrics"]


def shown_by_phrasing(report: dict) -> dict:
    """The by-wording table's metrics, with unanswered questions counted wrong as in `shown_metrics`."""
    return report.get("strict_by_phrasing") or report.get("by_phrasing", {})


def table_metrics(res: dict) -> dict[str, dict | None]:
    """The table's metric cells of one scored system: {metric: the shown (strict) metric, None where the
    system cannot answer that type or nothing was asked}. What benchmark.md shows and benchmark.json's
    per-system "table" holds (model cards read that)."""
    shown = shown_metrics(res["report"])
    return {m: shown[m] if _supported_metric(res, m) and shown[m]["value"] is not None else None
            for m in METRIC_LABELS}


def json_table(res: dict) -> dict[str, float | None]:
    """{label: value or None} as benchmark.md shows it, and the median error in metres."""
    row: dict[str, float | None] = {METRIC_LABELS[m]: None if v is None else v["value"]
                                    for m, v in table_metrics(res).items()}
    row["median error (m)"] = res["report"]["distance"]["median_m"]
    return row


def markdown_table(results: dict[str, dict]) -> str:
    head = ["system", "kind", *METRIC_LABELS.values(), "median error", "answered", "unparseable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {name} | {res['kind']} | " + " | ".join(["failed"] + [""] * (len(head) - 3))
                         + " |")
            continue
        r = res["report"]
        cells = ["-" if v is None else f"{100 * v['value']:.1f}% ({v['correct']}/{v['total']})"
                 for v in table_metrics(res).values()]
        med = r["distance"]["median_m"]
        cells.append("-" if med is None else f"{med:.0f} m ({r['distance']['n']})")
        cells.append(f"{r['n_answers']}/{r['n_eval']}")
        supported = set(res.get("supports", ALL_TYPES))
        cells.append(str(sum(1 for u in r["unparseable"] if u["question_type"] in supported)))
        lines.append(f"| {name} | {res['kind']} | " + " | ".join(cells) + " |")
    groups = sorted({g for r in results.values() if "report" in r for g in shown_by_phrasing(r["report"])})
    if len(groups) > 1:
        lines += ["", "By question wording (" + " / ".join(groups) + "; held-out wordings were never trained on):", "",
                  "| system | " + " | ".join(METRIC_LABELS.values()) + " |", "|" + "---|" * (len(METRIC_LABELS) + 1)]
        for name, res in results.items():
            if "report" not in res:
                continue
            cells = []
            for m in METRIC_LABELS:
                vals = []
                for g in groups:
                    v = shown_by_phrasing(res["report"]).get(g, {}).get(m)
                    ok = v is not None and v["value"] is not None and _supported_metric(res, m)
                    vals.append(f"{100 * v['value']:.0f}%" if ok else "-")
                cells.append(" / ".join(vals))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    failures = [f"- {n}: {r['error']}" for n, r in results.items() if "error" in r]
    if failures:
        lines += ["", "Failed systems:", *failures]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict], path: str | Path, title: str = "Address benchmark") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = {n: r for n, r in results.items() if "error" not in r}
    metrics = [m for m in METRIC_LABELS if any(shown_metrics(r["report"])[m]["total"] for r in ok.values())]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics) + 2), 4.2), dpi=110)
    width = 0.8 / max(len(ok), 1)
    x = np.arange(len(metrics))
    for i, (name, r) in enumerate(ok.items()):
        shown = shown_metrics(r["report"])
        vals = [100 * shown[m]["value"] if _supported_metric(r, m) and shown[m]["value"] is not None else np.nan
                for m in metrics]
        bars = ax.bar(x + (i - (len(ok) - 1) / 2) * width, np.nan_to_num(vals, nan=0.0), width, label=name)
        for b, v in zip(bars, vals):
            ax.annotate("-" if np.isnan(v) else f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [METRIC_LABELS[m] for m in metrics])
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if ok:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=min(len(ok), 6), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: dict[str, dict], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "benchmark.md", markdown_table(results))
    atomic_write_json(out_dir / "benchmark.json", {name: {**res, "table": json_table(res)} if "report" in res else res
                                                   for name, res in results.items()})
    atomic_write_with(out_dir / "benchmark.png", lambda tmp: bar_chart(results, tmp))


def build_parser() -> argparse.ArgumentParser:
    kinds = "\n".join(f"  {k.name:<6} {k.help}" for k in SYSTEM_KINDS.values())
    p = ArgumentParser(prog="address-llava benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"system kinds:\n{kinds}")
    p.add_argument("--dataset", help="address dataset folder (gazetteer, geometry, photo positions)")
    p.add_argument("--eval", help="evaluation split (JSON list or JSONL with 'reference')")
    p.add_argument("--image-root", default=None, help="image root of the split (default: DATASET/images)")
    p.add_argument("--out", help="output folder (answers/, benchmark.md, benchmark.json, benchmark.png)")
    p.add_argument("--system", action="append", default=[], metavar="NAME=KIND:TARGET[,k=v]",
                   help="a system to evaluate (repeat)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--dtype", "--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of the split")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="what serves the llava systems: hf (transformers generate) or vllm (merged models, CUDA GPU "
                        "+ vLLM; refused at once otherwise)")
    p.add_argument("--aliases", default=None, help="JSON {alias: canonical name} for the scorer's gazetteer")
    p.add_argument("--list-kinds", action="store_true", help="list the system kinds and exit")
    return p


@command_main("benchmark")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_kinds:
        for k in SYSTEM_KINDS.values():
            print(f"{k.name:<6} {k.help}")
        return 0
    if args.engine == "vllm":  # refused before any system is loaded
        reason = vllm_unavailable()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
    check_run_options(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      device=args.device)
    missing = [f for f in ("dataset", "eval", "out") if getattr(args, f) is None]
    if missing or not args.system:
        raise SystemExit(f"benchmark needs --dataset, --eval, --out and at least one --system "
                         f"(missing: {missing + ([] if args.system else ['--system'])})")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [parse_system_spec(s) for s in args.system]
    # One rule for every command's --out (clip_stage.core.outdir), before any system loads: an earlier benchmark
    # folder is continued (answers already there are skipped); anything else non-empty, or an input, is refused.
    check_out_dir(args.out, "benchmark", resume=True, legacy=["benchmark.json", "benchmark.md", "answers/*.jsonl"],
                  inputs=[args.dataset, args.eval, args.image_root, *(p for s in specs for p in spec_paths(s))])
    for spec in specs:  # a bad spec is refused before --out is made (run_benchmark checks again, for callers)
        check_system_spec(spec)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_marker(args.out, "benchmark")
    ctx = RunContext(Path(args.dataset), device, args.dtype, args.max_new_tokens, args.batch_size, args.engine)
    scorer = Scorer.from_dataset(args.dataset, aliases=args.aliases)
    results = run_benchmark(specs, args.dataset, args.eval, args.out, args.image_root, ctx, scorer, args.limit)
    print(markdown_table(results))
    print(f"wrote {Path(args.out) / 'benchmark.md'}, benchmark.json, benchmark.png")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
