"""Batch inference: answers of a LLaVA model for an evaluation split, written as scoreable JSONL.

    address-llava infer --model MERGED_OR_BASE [--adapter CKPT] --eval eval.json --image-root DATA/images \
        --out answers.jsonl [--batch-size 8] [--max-new-tokens 64]

Each evaluation record (LLaVA format with a "reference", see `conversations`) gives one question: its first
human turn. Prompts are rendered by `llava_address.prompting` (the Vicuna v1 template of training),
left-padded, and generated greedily in batches with the KV cache. Output lines are
`{"id", "question", "answer", "reference", "image"}`; `llava_address.eval.scoring` reads them.

`--engine vllm` serves a merged model through vLLM instead (`llava_address.eval.vllm_engine`: CUDA GPU only).

Resumable: ids already in the output are skipped; each batch is appended in one write and fsynced, and a
torn last line left by a killed run is cut off on the next start, so the file always holds whole batches.
Only answers provably written by the same model and settings are resumed (`llava_address.eval.answers`: the
file format and the record beside it, which `benchmark` keeps by the same rule).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import UnsafePathError, resolve_under_root
from clip_stage.core.outdir import OutputFolderError, check_out_files, on_disk
from clip_stage.core.progress import progress as progress_bar
from conversations.candidates import with_candidates
from conversations.records import IMAGE_TOKEN, Reference, first_question, load_records, record_where
from conversations.validate import require_valid
from llava_address.checkpoint_layout import read_checkpoint_args
from llava_address.config import ModelArgs
from llava_address.eval.answers import (answers_record_path, answers_source, append_lines, check_answers_record,
                                        read_done_ids, record_answers)
from llava_address.eval.errors import InferenceInputError, PromptTooLongError
from llava_address.eval.vllm_engine import load_vllm, vllm_answer_batch, vllm_unavailable
from llava_address.prompting import generation_prompt

log = logging.getLogger(__name__)


# --- images and prompts --------------------------------------------------------------------------------

def open_image(path: str | os.PathLike):
    """An RGB PIL image, or a clear error naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise InferenceInputError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise InferenceInputError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    # PIL reports broken files as OSError, SyntaxError ("broken PNG file") or ValueError, huge ones as a bomb
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise InferenceInputError(f"{path}: not a readable image ({e})") from None


def num_image_tokens(config) -> int:
    """Image-token ids per `<image>`: the tower's patch grid, plus the CLS token with the 'full' strategy."""
    from llava_address.components import num_image_tokens as shared  # the LLaVA stage's (lazy: it imports torch)

    return int(shared(config))


# Tokenizers without a stated limit report a huge sentinel (transformers' VERY_LARGE_INTEGER): no limit.
_NO_LIMIT = 10**9


def context_length(model_config, tokenizer=None) -> int | None:
    """Tokens the model can attend to: the language model's `max_position_embeddings`, or the tokenizer's
    `model_max_length` (the smaller where both are set: training may have used a shorter context); None when
    neither says."""
    text = getattr(model_config, "text_config", None) or model_config
    limits = [getattr(text, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < _NO_LIMIT]
    return min(limits) if limits else None


def user_turn(question: str, with_image: bool) -> dict:
    question = question.replace(IMAGE_TOKEN, "").strip()
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if with_image else question}


@dataclass
class Generator:
    """A loaded LLaVA model + processor with the one prompt rendering of training (`prompting`)."""

    model: Any
    processor: Any
    template: str = "vicuna_v1"
    pad_to_square: bool = True

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return next(self.model.parameters()).device

    def pixel_values(self, images: Sequence) -> Any:
        from llava_address.data import expand_to_square, mean_colour  # training's padding (lazy: torch)

        ip = self.processor.image_processor
        if self.pad_to_square:
            images = [expand_to_square(im, mean_colour(ip)) for im in images]
        pv = ip(images=list(images), return_tensors="pt")["pixel_values"]
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        return pv.to(self.device, dtype=dtype)

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        return generation_prompt(conversation, self.tokenizer, num_image_tokens(self.model.config),
                                 num_images=1, image_token_id=self.model.config.image_token_id,
                                 template=self.template)

    def batch_inputs(self, conversations: Sequence[list[dict]], images: Sequence) -> dict:
        """Left-padded input ids + attention mask + pixel values (left padding: generation appends at the right)."""
        import torch

        ids = [self.prompt_ids(c) for c in conversations]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                "pixel_values": self.pixel_values(images)}

    @property
    def context_length(self) -> int | None:
        return context_length(self.model.config, self.tokenizer)

    def prompt_budget(self, max_new_tokens: int) -> int | None:
        """Prompt tokens that leave room for `max_new_tokens` in the context (None: no known limit)."""
        ctx = self.context_length
        return None if ctx is None else ctx - max_new_tokens

    def check_fits(self, conversation: list[dict], max_new_tokens: int) -> list[int]:
        """The prompt ids, or PromptTooLongError when they leave no room for `max_new_tokens` in the context."""
        ids = self.prompt_ids(conversation)
        budget = self.prompt_budget(max_new_tokens)
        if budget is not None and len(ids) > budget:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens (image included); the model's context of {self.context_length} "
                f"tokens minus {max_new_tokens} for the answer leaves {max(budget, 0)}: ask a shorter question")
        return ids

    def generation_kwargs(self, max_new_tokens: int, max_time: float | None = None) -> dict:
        """greedy decoding; max_time: seconds after which generation stops (the answer so far is kept)."""
        tok = self.tokenizer
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "use_cache": True,
              "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        if max_time is not None:
            kw["max_time"] = float(max_time)
        return kw

    def generate(self, conversations: Sequence[list[dict]], images: Sequence, max_new_tokens: int = 64) -> list[str]:
        """Greedy answers, one per (conversation ending with a user turn, image)."""
        import torch

        inputs = self.batch_inputs(conversations, images)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generation_kwargs(max_new_tokens))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def load_generator(model_path: str | os.PathLike | None, adapter: str | os.PathLike | None = None,
                   device: str = "auto", dtype: str = "auto", merge: bool = True) -> Generator:
    """A merged/base LLaVA (folder or hub id), or a `train-llava` checkpoint on its base, ready to generate.

    model_path: LLaVA folder or hub id; with `adapter`, it replaces the base stored in the checkpoint
        (None: the checkpoint's own base). adapter: a `train-llava` checkpoint folder (LoRA adapter +
        projector + config); its LoRA is merged for generation speed unless `merge=False`.
    """
    import torch

    # lazy: torch and transformers load with a model, not when infer is imported or refuses its inputs
    from llava_address.checkpoint import load_for_inference
    from llava_address.model import build_llava

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_path is None and adapter is None:
        raise InferenceInputError("give a model (folder or hub id) and/or an adapter checkpoint")
    if model_path is not None and Path(model_path).exists() and not (Path(model_path) / "config.json").is_file():
        raise InferenceInputError(f"{model_path}: not a model folder (no config.json)")
    if adapter is not None and not Path(adapter).is_dir():
        raise InferenceInputError(f"adapter checkpoint {adapter}: not a folder")
    try:
        if adapter is not None:
            model, processor = load_for_inference(None if model_path is None else str(model_path), adapter,
                                                  torch_dtype=dtype)
            if merge and hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
        else:
            model, processor = build_llava(ModelArgs(model_name_or_path=str(model_path), torch_dtype=dtype))
    except (OSError, ValueError, KeyError) as e:
        raise InferenceInputError(f"cannot load the model from {model_path or adapter}"
                                  + (f" with adapter {adapter}" if adapter and model_path else "") + f": {e}") from e
    model.to(device).eval()
    return Generator(model, processor)


# --- resumable output ----------------------------------------------------------------------------------

def check_run_options(*, batch_size: int | None = None, max_new_tokens: int | None = None, limit: int | None = None,
                      top_k: int | None = None, device: str | None = None) -> None:
    """The numeric and device options infer, chat, benchmark and web-demo share, checked before anything loads
    (each a one-line error naming the flag; the device by the trainers' own `check_device`)."""
    for flag, value, least in (("--batch-size", batch_size, 1), ("--max-new-tokens", max_new_tokens, 1),
                               ("--limit", limit, 1), ("--top-k", top_k, 1)):
        if value is not None and value < least:
            raise InferenceInputError(f"{flag} {value}: must be at least {least}")
    if device is not None:
        from clip_stage.core.training import check_device  # lazy: torch, which `--help` does not need

        check_device(device)


# --- evaluation items ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalItem:
    id: str
    image: str
    question: str
    reference: dict | None
    """the record's `conversations.records.Reference` as written to the answers (None: a record without one)"""


def eval_items(path: str | os.PathLike, limit: int | None = None, command: str = "infer") -> list[EvalItem]:
    """One item per evaluation record: its first human turn as the question.

    LLaVA-format files go through the shared record check (`conversations.validate.require_valid`: ids
    present and unique, an image path, the question turn with its <image>) before any model loads; the image
    files themselves are opened while answering, where a bad one becomes an error row (see `run_answers`).
    """
    records = load_records(path)
    if records and all("conversations" in r for r in records):
        require_valid(path, None, need_answer=False, command=command)
    items, seen = [], set()
    for i, r in enumerate(records):
        if "id" not in r or not r.get("image"):
            raise InferenceInputError(f"{path}: record {i} lacks an id or an image")
        q = first_question(r)
        if not q:
            raise InferenceInputError(f"{path}: record {i} (id {r['id']}) has no question")
        if str(r["id"]) in seen:  # answers are keyed by id: the second would be skipped as done
            raise InferenceInputError(f"{path}: record {i}: id {r['id']!r} is used twice")
        seen.add(str(r["id"]))
        ref = r.get("reference")
        if ref is not None:  # checked against the contract now, not when the answers are scored
            ref = Reference.from_dict(ref, record_where(path, i, r)).to_dict()
        items.append(EvalItem(str(r["id"]), str(r["image"]), q, ref))
        if limit is not None and len(items) >= limit:
            break
    return items


def unusable_images(items: Sequence[EvalItem], image_root: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, reason) of the items whose image cannot be used: an unsafe path, a missing file, or a file that is
    no image PIL knows. Only headers are read (cheap, before the model loads); a file damaged past its header
    is found when it is answered, and becomes an error row then."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for it in items:
        try:
            path = resolve_under_root(image_root, it.image)
            if not path.is_file():
                bad.append((it.id, f"image {it.image!r} not found under the image root"))
                continue
            with Image.open(path):
                pass
        except UnsafePathError as e:
            bad.append((it.id, str(e)))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            bad.append((it.id, f"image {it.image!r}: not a readable image ({e})"))
    return bad


def _error_reason(e: BaseException, image_root: str | os.PathLike) -> str:
    # Rows may be shared: name the image relative to the root, never the server's absolute path.
    return str(e).replace(str(Path(image_root).resolve()), "<image-root>").replace(str(image_root), "<image-root>")


def run_answers(answer_batch, items: Sequence[EvalItem], image_root: str | os.PathLike, out: str | os.PathLike,
                batch_size: int = 8, progress: bool = True, retry_errors: bool = False) -> dict:
    """Answers every item not yet in `out`, batch by batch, with `answer_batch(questions, images) -> answers`
    (an answer may be an InferenceInputError instead of text: that record becomes an error row).

    A record whose image cannot be used (unsafe path, missing or unreadable file) becomes an error row
    `{"id", "error", "question", "reference", "image"}` and the run goes on with the rest of its batch; each
    batch's rows are appended (and fsynced) before the next batch starts. Error rows count as done on a
    resumed run unless `retry_errors`. Shared by `infer` and every system of `benchmark`.
    Returns counts {'total', 'skipped', 'answered', 'errors'}.
    """
    done = read_done_ids(out, retry_errors=retry_errors)
    todo = [it for it in items if it.id not in done]
    bar = progress_bar(total=len(todo), desc=f"answering -> {Path(out).name}", unit="q", disable=not progress)
    n_errors = 0
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        good, images, rows = [], [], {}
        for it in batch:
            try:
                images.append(open_image(resolve_under_root(image_root, it.image)))
                good.append(it)
            except (UnsafePathError, InferenceInputError) as e:
                rows[it.id] = {"id": it.id, "error": _error_reason(e, image_root), "question": it.question,
                               "reference": it.reference, "image": it.image}
        if good:
            answers = answer_batch([it.question for it in good], images)
            if len(answers) != len(good):
                raise RuntimeError(f"got {len(answers)} answers for a batch of {len(good)}")
            for it, a in zip(good, answers):
                if isinstance(a, InferenceInputError):  # the answerer refused this record (e.g. prompt too long)
                    rows[it.id] = {"id": it.id, "error": _error_reason(a, image_root), "question": it.question,
                                   "reference": it.reference, "image": it.image}
                    continue
                rows[it.id] = {"id": it.id, "question": it.question, "answer": a, "reference": it.reference,
                               "image": it.image}
        n_errors += sum("error" in rows[it.id] for it in batch)
        append_lines(out, (rows[it.id] for it in batch))  # in the split's order
        bar.update(len(batch))
    bar.close()
    if n_errors:
        log.warning("%s: %d of %d records could not be answered (error rows; --retry-errors retries them)",
                    out, n_errors, len(todo))
    return {"total": len(items), "skipped": len(items) - len(todo), "answered": len(todo) - n_errors,
            "errors": n_errors}


def llava_answer_batch(gen: Generator, max_new_tokens: int = 64):
    """answer_batch for `run_answers`; a prompt that does not fit the context is answered by its
    PromptTooLongError (an error row) instead of being truncated or crashing the batch."""
    def answer_batch(questions: list[str], images: list) -> list:
        convs = [[user_turn(q, True)] for q in questions]
        out: list = [None] * len(convs)
        fits = []
        for i, c in enumerate(convs):
            try:
                gen.check_fits(c, max_new_tokens)
                fits.append(i)
            except PromptTooLongError as e:
                out[i] = e
        if fits:
            for i, a in zip(fits, gen.generate([convs[i] for i in fits], [images[i] for i in fits], max_new_tokens)):
                out[i] = a
        return out

    return answer_batch


def candidate_answer_batch(answer_batch, ranker, top_k: int = 5, scores: bool = False):
    """`answer_batch` with AddressCLIP's top-k addresses of each image written before its question.

    The block is `conversations.candidates.with_candidates`, the format the model was trained with."""
    def answer(questions: list[str], images: list) -> list[str]:
        tops = ranker.top_k_batch(images, top_k)
        return answer_batch([with_candidates(q, top, scores) for q, top in zip(questions, tops)], images)

    return answer


def load_ranker(checkpoint: str | os.PathLike, dataset: str | os.PathLike, style: str = "full", device: str = "cpu"):
    """An AddressCLIP ranker over the dataset's address gallery (text embeddings from the gallery cache)."""
    from clip_stage.candidates import AddressRanker  # lazy: it imports torch

    if not Path(checkpoint).exists():
        raise InferenceInputError(f"candidates checkpoint {checkpoint}: not found")
    if not (Path(dataset) / "records.parquet").is_file():
        raise InferenceInputError(f"--dataset {dataset}: not a dataset folder (no records.parquet); the candidate "
                                  "gallery is the dataset's addresses")
    return AddressRanker.from_checkpoint(checkpoint, dataset, style, device)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="merged LLaVA folder, base LLaVA folder or hub id (with --adapter: "
                                                 "replaces the checkpoint's stored base)")
    p.add_argument("--adapter", default=None, help="train-llava checkpoint folder (LoRA + projector) to apply")
    p.add_argument("--eval", required=True, help="evaluation split (JSON list or JSONL of LLaVA records)")
    p.add_argument("--image-root", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="answers JSONL (appended to; ids already there are skipped)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate() call")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N records")
    p.add_argument("--retry-errors", action="store_true",
                   help="answer again the records that are error rows in --out (by default they count as done)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", "--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate (batched, KV cache); vllm: vLLM's offline engine on a merged "
                        "model with its chat template (CUDA GPU + vLLM; refused at once otherwise)")
    p.add_argument("--no-pad-to-square", action="store_true", help="resize/crop like the processor instead of "
                                                                   "LLaVA-1.5's pad-to-square")
    g = p.add_argument_group("candidate-grounded answers (a model trained with `conversations --candidates`)")
    g.add_argument("--candidates", default=None, metavar="CLIP_CHECKPOINT",
                   help="write this AddressCLIP model's top-K addresses into each question")
    g.add_argument("--dataset", default=None, help="address dataset whose addresses form the candidate gallery")
    g.add_argument("--top-k", type=int, default=5, help="candidates per question")
    g.add_argument("--candidate-scores", action="store_true", help="write each candidate's probability after it")
    return p



# the keys of infer's record that may name local files or folders (fingerprinted: `answers_source`)
_INFER_PATHS = ("target", "adapter", "adapter_base", "adapter_llm", "adapter_vision_tower", "candidates", "dataset")


def adapter_models(adapter: str, model: str | None) -> dict[str, str]:
    """The models an --adapter checkpoint loads besides its own files, as it stored them at training: its base
    (unless --model replaces it) and its swapped-in vision tower. Recorded (and fingerprinted), so a resumed run
    notices a base re-merged or replaced in place, as it does for --model."""
    stored, _, _ = read_checkpoint_args(adapter)
    names = {"adapter_vision_tower": stored.vision_tower}
    if not model:
        names.update(adapter_base=stored.model_name_or_path, adapter_llm=stored.llm)
    return {k: v for k, v in names.items() if v}


def infer_answers_source(args: argparse.Namespace) -> dict:
    """What writes infer's answers (`answers_source`): everything that can change an answer. Left out, free to
    change on a resumed run: --batch-size and --device (the same greedy answers batched or one by one, on any
    device, up to float rounding: left padding and the mask keep a batch from changing its rows), --limit and
    --retry-errors (which records are answered, not how), --eval and --image-root (each row keeps its own
    question, reference and image). The candidates' dataset, --top-k and --candidate-scores count only with
    --candidates."""
    options: dict[str, Any] = {"engine": args.engine, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
                               "dtype": args.dtype, "pad_to_square": not args.no_pad_to_square}
    if args.adapter:
        options.update(adapter_models(args.adapter, args.model))
    if args.candidates:
        options.update(candidates=args.candidates, dataset=args.dataset, top_k=args.top_k,
                       candidate_scores=args.candidate_scores)
    return answers_source("infer", args.model, {k: v for k, v in options.items() if v is not None}, _INFER_PATHS)


def check_out(out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """--out and its record (`answers_record_path`) are files that are no input and lie inside none (the
    output-folder rule of clip_stage.core.outdir, for files), and --out is not itself a record."""
    if Path(out).name.endswith(".system.json"):
        raise OutputFolderError(f"--out {out}: a .system.json file is the record of what wrote an answers file, "
                                "not answers; give the answers file (e.g. answers.jsonl)")
    check_out_files({"--out": out, "--out's record": answers_record_path(out)}, inputs)


@command_main("infer")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.engine == "vllm":  # refused before anything is read or loaded
        reason = vllm_unavailable()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
    check_run_options(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      top_k=args.top_k, device=args.device)
    if not Path(args.image_root).is_dir():
        raise InferenceInputError(f"--image-root {args.image_root}: not a folder")
    # The output-folder rule (clip_stage.core.outdir) for files: --out and its record are no input, lie inside none.
    check_out(args.out, [args.eval, args.image_root, on_disk(args.model), args.adapter, args.candidates,
                         args.dataset])
    if args.candidates and not args.dataset:
        raise SystemExit("--candidates needs --dataset (the address gallery)")
    items = eval_items(args.eval, args.limit)
    # --out is resumed only if it is an answers file (refused now, not after minutes of loading weights), read
    # without cutting or retrying anything: it may still be refused as another model's below
    done = read_done_ids(args.out, retry_errors=args.retry_errors, repair=False)
    todo = [it for it in items if it.id not in done]
    bad = unusable_images(todo, args.image_root)
    if bad:  # said before the model loads; the run still answers the others
        print(f"infer: warning: {len(bad)} of the {len(todo)} records to answer have unusable images (first: id "
              f"{bad[0][0]}: {_error_reason(ValueError(bad[0][1]), args.image_root)}); they become error rows",
              file=sys.stderr)
    # ... and only if these settings wrote it (its record): another model's answers would pass for this one's
    source = check_answers_record(args.out, infer_answers_source(args))
    ranker = load_ranker(args.candidates, args.dataset, device=args.device if args.device != "auto" else "cpu") \
        if args.candidates else None
    if args.engine == "vllm":
        try:
            vgen = load_vllm(args.model, args.adapter, args.dtype)
        except InferenceInputError as e:  # adapter not merged, no config.json or chat template: before any weights
            print(f"error: {e}", file=sys.stderr)
            return 2
        vgen.pad_to_square = not args.no_pad_to_square
        answer_batch = vllm_answer_batch(vgen, args.max_new_tokens)
    else:
        gen = load_generator(args.model, args.adapter, args.device, args.dtype)
        gen.pad_to_square = not args.no_pad_to_square
        answer_batch = llava_answer_batch(gen, args.max_new_tokens)
    if ranker is not None:
        answer_batch = candidate_answer_batch(answer_batch, ranker, args.top_k, args.candidate_scores)
    record_answers(args.out, source)
    counts = run_answers(answer_batch, items, args.image_root, args.out, args.batch_size,
                         retry_errors=args.retry_errors)
    print(f"{counts['answered']} answered, {counts['errors']} error rows, {counts['skipped']} already in {args.out}, "
          f"{counts['total']} in the split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
