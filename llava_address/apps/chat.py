"""Chat with a LLaVA model about one photo: in the terminal (streamed tokens) or from Python.

    address-llava chat --model runs/llava-merged --image photo.jpg                 # multi-turn
    address-llava chat --model runs/llava-merged --image photo.jpg --question "Where was this taken?"
    address-llava chat --adapter runs/llava/checkpoint-200 --image photo.jpg       # base + LoRA checkpoint

In a notebook:

    from llava_address.apps.chat import answer
    reply = answer("photo.jpg", "Where was this photo taken?", model="runs/llava-merged")
    follow = answer("photo.jpg", "Which neighbourhood?", history=[("Where was this photo taken?", reply)],
                    model="runs/llava-merged")

Prompts are rendered by `llava_address.prompting` with the template of training (Vicuna v1); the image
is attached to the first user turn only, as in training. Terminal commands: /reset (forget the
conversation), /image PATH (another photo, new conversation), /quit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence, TextIO

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from conversations.candidates import with_candidates
from llava_address.eval.infer import (Generator, InferenceInputError, PromptTooLongError, check_run_options,
                                  load_generator, load_ranker, open_image, user_turn)

History = Sequence[tuple[str, str]]


def conversation(question: str, history: History = (), candidates: Sequence | None = None,
                 scores: bool = False) -> list[dict]:
    """LLaVA-format messages: the history's (question, answer) pairs, then `question`; the image, and the
    candidate addresses if any (`conversations.candidates` format, as in training), in turn one."""
    questions = [q for q, _ in history] + [question]
    if candidates:
        questions[0] = with_candidates(questions[0], candidates, scores)
    msgs: list[dict] = []
    for i, (q, (_, a)) in enumerate(zip(questions, history)):
        msgs.append(user_turn(q, with_image=i == 0))
        msgs.append({"from": "gpt", "value": a})
    msgs.append(user_turn(questions[-1], with_image=not history))
    return msgs


def fit_history(gen: Generator, question: str, history: History = (), max_new_tokens: int = 256,
                candidates: Sequence | None = None, scores: bool = False) -> tuple[tuple[str, str], ...]:
    """`history` trimmed so that the prompt leaves `max_new_tokens` of the model's context for the answer.

    The oldest turns go first, except turn one (it holds the image and the candidates, and says what the
    conversation is about), which goes last; PromptTooLongError when even `question` alone does not fit.
    """
    history = tuple(history)
    budget = gen.prompt_budget(max_new_tokens)
    if budget is None:
        return history

    def fits(h) -> bool:
        return len(gen.prompt_ids(conversation(question, h, candidates, scores))) <= budget

    if fits(history):
        return history
    # Drop turns 2, 3, ... one at a time; the prompt shrinks monotonically, so bisect the number dropped.
    lo, hi = 1, len(history) - 1  # hi: all but turn one dropped
    if hi >= 1 and fits(history[:1] + history[1 + hi:]):
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(history[:1] + history[1 + mid:]):
                hi = mid
            else:
                lo = mid + 1
        return history[:1] + history[1 + lo:]
    gen.check_fits(conversation(question, (), candidates, scores), max_new_tokens)  # raises when it cannot fit
    return ()


def resolve_candidates(candidates, image, top_k: int = 5) -> list | None:
    """A candidate list: as given (addresses or ranker dicts), or an AddressRanker's top-k for `image`."""
    if candidates is None or isinstance(candidates, (list, tuple)):
        return list(candidates) if candidates else None
    return candidates.top_k(image, top_k)


def _recording_streamer(tokenizer):
    """A TextIteratorStreamer that also keeps the generated ids, so the final answer is decoded in one piece
    (identical to batch generation) while the terminal shows text as it comes."""
    from transformers import TextIteratorStreamer

    class RecordingStreamer(TextIteratorStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.ids: list[int] = []
            self._seen_prompt = False

        def put(self, value):
            if not self._seen_prompt:  # generate() first sends the prompt
                self._seen_prompt = True
            else:
                self.ids.extend(int(x) for x in value.reshape(-1).tolist())
            super().put(value)

    return RecordingStreamer()


def stream_answer(gen: Generator, image, question: str, history: History = (), max_new_tokens: int = 256,
                  candidates: Sequence | None = None, scores: bool = False, max_time: float | None = None):
    """Yields the answer's text as it is generated, then returns the whole answer (StopIteration.value).

    Generation runs in a thread feeding a TextIteratorStreamer; errors are re-raised here. The prompt must
    fit the context (`fit_history`); max_time: seconds after which generation stops.
    """
    import torch

    conv = conversation(question, history, candidates, scores)
    gen.check_fits(conv, max_new_tokens)
    inputs = gen.batch_inputs([conv], [image])
    streamer = _recording_streamer(gen.tokenizer)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                gen.model.generate(**inputs, **gen.generation_kwargs(max_new_tokens, max_time), streamer=streamer)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
    return gen.tokenizer.decode(streamer.ids, skip_special_tokens=True).strip()


@functools.lru_cache(maxsize=2)
def _cached_generator(model: str | None, adapter: str | None, device: str, dtype: str) -> Generator:
    return load_generator(model, adapter, device, dtype)


def _as_image(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return open_image(image)


def answer(image, question: str, history: History | None = None, *, model: str | Generator | None = None,
           adapter: str | None = None, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256,
           stream: TextIO | None = None, candidates=None, top_k: int = 5, candidate_scores: bool = False,
           max_time: float | None = None) -> str:
    """The model's answer to `question` about `image` (a path or PIL image), after `history`.

    model: a loaded `Generator`, or a LLaVA folder / hub id (loaded once and cached); adapter: a
    train-llava checkpoint. history: earlier (question, answer) pairs about the same image.
    stream: a text stream (e.g. sys.stdout) that receives the tokens as they are generated.
    candidates: candidate-grounded answers (a model trained with `conversations --candidates`): an
    `clip_stage.candidates.AddressRanker` (its top_k for the image) or a list of addresses, written into the
    first user turn in the training format.
    The oldest turns of `history` (turn one last) are left out when the prompt would not leave
    `max_new_tokens` of the model's context (`fit_history`); a question that does not fit even alone is a
    PromptTooLongError. max_time: seconds after which generation stops (the answer so far is returned).
    """
    if not question or not question.strip():
        raise ValueError("empty question")
    gen = model if isinstance(model, Generator) else _cached_generator(
        None if model is None else str(model), None if adapter is None else str(adapter), device, dtype)
    img = _as_image(image)
    cands = resolve_candidates(candidates, img, top_k)
    kept = fit_history(gen, question, tuple(history or ()), max_new_tokens, cands, candidate_scores)
    chunks = stream_answer(gen, img, question, kept, max_new_tokens, cands, candidate_scores, max_time)
    while True:
        try:
            piece = next(chunks)
        except StopIteration as done:
            return done.value
        if stream is not None:
            stream.write(piece)
            stream.flush()


@dataclass
class ChatSession:
    """A multi-turn conversation about one image."""

    generator: Generator
    image: object
    history: list[tuple[str, str]] = field(default_factory=list)
    max_new_tokens: int = 256
    ranker: object | None = None
    """an AddressRanker: candidate-grounded answers (candidates computed once per image)"""
    top_k: int = 5
    candidate_scores: bool = False
    """write each candidate's probability after it (for a model trained with `conversations --candidate-scores`)"""
    dropped: int = 0
    """history turns left out so far to fit the model's context"""
    _candidates: list | None = None

    def ask(self, question: str, stream: TextIO | None = None) -> str:
        if self.ranker is not None and self._candidates is None:
            self._candidates = self.ranker.top_k(self.image, self.top_k)
        # Trimmed here too, so the session holds what the model saw (and the next turn starts from it).
        kept = list(fit_history(self.generator, question, self.history, self.max_new_tokens, self._candidates,
                                self.candidate_scores))
        self.dropped += len(self.history) - len(kept)
        self.history = kept
        reply = answer(self.image, question, self.history, model=self.generator, max_new_tokens=self.max_new_tokens,
                       stream=stream, candidates=self._candidates, candidate_scores=self.candidate_scores)
        self.history.append((question, reply))
        return reply


def repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The terminal loop; returns the number of answers given."""
    n = 0
    stdout.write("Ask about the photo. /reset, /image PATH, /quit.\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            stdout.write("\n")
            return n
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return n
        if line == "/reset":
            session.history.clear()
            stdout.write("(conversation cleared)\n")
            continue
        if line.split()[0] == "/image":
            path = line[len("/image"):].strip()
            try:
                session.image = open_image(path)
                session._candidates = None
            except InferenceInputError as e:
                stdout.write(f"error: {e}\n")
                continue
            session.history.clear()
            stdout.write(f"(new image {path}; conversation cleared)\n")
            continue
        if line.startswith("/") and not line.startswith("//"):  # a mistyped command is not a question
            stdout.write(f"unknown command {line.split()[0]}: /reset, /image PATH, /quit (start with // to ask a "
                         "question that begins with /)\n")
            continue
        if line.startswith("//"):
            line = line[1:]
        dropped = session.dropped
        try:
            stdout.write("assistant> ")
            session.ask(line, stream=stdout)
        except PromptTooLongError as e:
            stdout.write(f"\nerror: {e}\n")
            continue
        stdout.write("\n")
        if session.dropped > dropped:
            stdout.write(f"({session.dropped - dropped} earlier turns were left out to fit the model's context)\n")
        n += 1


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="merged or base LLaVA folder / hub id (with --adapter: the base)")
    p.add_argument("--adapter", default=None, help="train-llava checkpoint folder (LoRA + projector)")
    p.add_argument("--image", required=True, help="the photo to talk about")
    p.add_argument("--question", default=None, help="ask one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--dtype", "--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--candidates", default=None, metavar="CLIP_CHECKPOINT",
                   help="candidate-grounded answers: this AddressCLIP model's top-K addresses go into the first question")
    p.add_argument("--dataset", default=None, help="with --candidates: the address dataset (candidate gallery)")
    p.add_argument("--top-k", type=int, default=5, help="with --candidates: how many candidates")
    p.add_argument("--candidate-scores", action="store_true",
                   help="with --candidates: write each candidate's probability after it (as infer --candidate-scores)")
    return p


@command_main("chat")
def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.model is None and args.adapter is None:
        raise SystemExit("give --model and/or --adapter")
    if args.candidates and not args.dataset:
        raise SystemExit("--candidates needs --dataset (the address gallery)")
    check_run_options(max_new_tokens=args.max_new_tokens, top_k=args.top_k, device=args.device)
    if args.question is not None and not args.question.strip():
        raise SystemExit("--question is empty")
    image = open_image(args.image)  # fail on a bad image before loading the model
    ranker = load_ranker(args.candidates, args.dataset) if args.candidates else None
    gen = load_generator(args.model, args.adapter, args.device, args.dtype)
    session = ChatSession(gen, image, max_new_tokens=args.max_new_tokens, ranker=ranker, top_k=args.top_k,
                          candidate_scores=args.candidate_scores)
    if args.question is not None:
        session.ask(args.question, stream=stdout)
        stdout.write("\n")
        return 0
    repl(session, stdin, stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
