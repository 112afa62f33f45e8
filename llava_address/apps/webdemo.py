"""A small web demo: upload a street photo, see AddressCLIP's top-K addresses (`--top-k`, 5) on a map of the
city, and chat with the LLaVA model about it, with those addresses in the question if you tick the box
(candidate-grounded answers; `--candidate-scores` adds their probabilities, as `infer` and `chat` do).

    address-llava web-demo --dataset runs/demo/dataset --clip runs/demo/clip --model runs/demo/llava-merged
    # then open http://127.0.0.1:7860

Either model may be left out (its panel says so). The server binds to 127.0.0.1 unless `--host` says
otherwise; uploads are limited in bytes (`--max-upload-mb`) and image side (`--max-side`), and anything
that is not a JPEG/PNG/WebP/BMP image is rejected before it reaches a model. The chat caps a question's
length (`--max-question-chars`, `--max-question-tokens`), the history the model sees (`--max-history-turns`,
older turns after the first are left out, then whatever the model's context cannot hold) and each answer's
generation time (`--max-time`); uploads are deleted from the server after `--cache-age` seconds. Messages
shown in the browser never hold the server's file paths. Built with Gradio.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip_stage.candidates import AddressRanker  # AddressCLIP's ranker: infer, chat and benchmark use the same one
from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main, is_user_error, one_line
from clip_stage.plots import plain_text
from clip_stage.query_map import QueryMapConfig, QueryMapper
from llava_address.apps import chat
from llava_address.eval.gazetteer import Gazetteer
from llava_address.eval.infer import check_run_options, load_generator

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


class UploadError(ValueError):
    """An upload that is not an acceptable image."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024
    """largest accepted file"""
    max_side: int = 4096
    """largest accepted width or height, in pixels"""
    min_side: int = 8
    """smallest accepted width or height"""
    formats: tuple[str, ...] = ALLOWED_FORMATS
    """accepted PIL formats"""

    def __post_init__(self):
        if self.max_bytes <= 0 or self.max_side <= 0 or not 0 < self.min_side <= self.max_side:
            raise ValueError("upload limits must be positive and min_side <= max_side")


def _human(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def load_upload(path: str | os.PathLike | None, limits: UploadLimits = UploadLimits()):
    """The uploaded file as an RGB PIL image, or UploadError saying why it is refused.

    Sizes are checked from the header before the pixels are decoded, so an oversized image (or a
    decompression bomb) is never decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise UploadError("no image uploaded")
    path = Path(path)
    if not path.is_file():
        raise UploadError("the upload is missing")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise UploadError(f"the file is {_human(size)}; the limit is {_human(limits.max_bytes)}")
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            if fmt not in limits.formats:
                raise UploadError(f"{fmt or 'unknown'} files are not accepted; upload one of {', '.join(limits.formats)}")
            if max(w, h) > limits.max_side or min(w, h) < limits.min_side:
                raise UploadError(f"the image is {w}x{h} pixels; sides must be {limits.min_side}-{limits.max_side}")
            im.verify()
        with Image.open(path) as im:
            return im.convert("RGB")
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UploadError(f"not a readable image ({type(e).__name__})") from None


# An absolute path (POSIX, or a Windows drive) inside a message: replaced by its last part before a message
# reaches the browser, so the server's folder layout is never shown.
_ABS_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:[\\/]|/)[^\s'\"(),;]*")


def public_message(text: str) -> str:
    """`text` with every absolute path cut to its file name (`.../name`)."""
    return _ABS_PATH.sub(lambda m: ".../" + re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1], text)


def _user_facing(handler):
    """A handler whose failures reach the browser as gr.Error messages without server paths: a user error
    (the project's ValueErrors, e.g. a prompt too long for the model) says what it is; anything else is
    logged here with its traceback and shown as a generic failure."""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        import gradio as gr

        try:
            return handler(*args, **kwargs)
        except gr.Error as e:
            raise gr.Error(public_message(str(e.message))) from None
        except Exception as e:
            if is_user_error(e):
                raise gr.Error(public_message(one_line(e))) from None
            log.exception("web demo: %s failed", handler.__name__)
            raise gr.Error("the request failed on the server (its log has the details)") from None

    return wrapped


def city_map(gazetteer, top: list[dict], title: str = ""):
    """A matplotlib figure of the city's sub-streets (UTM metres) with the top addresses highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    geoms = [s.geometry_utm for s in gazetteer.sub_streets.values() if s.geometry_utm is not None]
    # Metres from the city's south-west corner: readable ticks instead of 6-7 digit UTM numbers.
    x0 = min((g.bounds[0] for g in geoms), default=0.0)
    y0 = min((g.bounds[1] for g in geoms), default=0.0)

    def draw(geom, **kw):
        for line in getattr(geom, "geoms", [geom]):
            xs, ys = line.xy
            ax.plot(np.asarray(xs) - x0, np.asarray(ys) - y0, **kw)

    for g in geoms:
        draw(g, color="#bbbbbb", lw=1)
    colours = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd"]
    for t in reversed(top):
        c = colours[(t["rank"] - 1) % len(colours)]
        label = plain_text(f"{t['rank']}. {t['address'][:72]}")
        for sid in t["sub_streets"]:
            g = gazetteer.sub_streets[sid].geometry_utm if sid in gazetteer.sub_streets else None
            if g is None:
                continue
            draw(g, color=c, lw=4 if t["rank"] == 1 else 2.5, label=label)
            label = None
            p = g.interpolate(0.5, normalized=True)
            ax.annotate(str(t["rank"]), (p.x - x0, p.y - y0), color=c, fontsize=10, fontweight="bold", ha="center",
                        va="bottom")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("east (m)")
    ax.set_ylabel("north (m)")
    ax.set_title(plain_text(title or f"AddressCLIP top-{len(top)}"), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = sorted(range(len(labels)), key=lambda i: labels[i])
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    return fig


@dataclass
class Demo:
    """The demo's state-free handlers (the Gradio app calls these; tests call them directly)."""

    ranker: AddressRanker | None
    generator: Any | None
    gazetteer: Any | None
    limits: UploadLimits = UploadLimits()
    max_new_tokens: int = 128
    query_mapper: Any | None = None
    """clip_stage.query_map.QueryMapper over the test images, for the "address query" box (None: box says so)"""
    max_question_chars: int = 1000
    """longest accepted question, in characters (checked before it is tokenised)"""
    max_question_tokens: int = 256
    """longest accepted question, in tokens of the chat model"""
    max_history_turns: int = 8
    """earlier (question, answer) pairs the model sees at most: the first, then the latest"""
    max_history_chars: int = 16000
    """characters of earlier turns the model sees at most (the client sends the history: it is not trusted)"""
    max_time: float | None = 60.0
    """seconds one answer may generate for (the answer so far is shown); None: no limit"""
    cache_cleanup: tuple[int, int] | None = (3600, 3600)
    """(every N seconds, delete uploads older than M seconds) from the server's upload cache; None: never"""
    top_k: int = 5
    """AddressCLIP addresses in the panel, and in the question of a candidate-grounded chat"""
    candidate_scores: bool = False
    """a candidate-grounded question gives each address's probability after it (as the model was trained)"""

    def __post_init__(self):
        if min(self.max_question_chars, self.max_question_tokens, self.max_history_turns, self.max_history_chars) < 1:
            raise ValueError("web demo: question and history limits must be at least 1")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError("web demo: max_time must be positive")
        if self.top_k < 1:
            raise ValueError("web demo: top_k must be at least 1")

    def check_question(self, message: str) -> None:
        """gr.Error when the question is empty or over the character or token cap."""
        import gradio as gr

        if not message or not message.strip():
            raise gr.Error("type a question")
        if len(message) > self.max_question_chars:
            raise gr.Error(f"the question is {len(message)} characters; the limit is {self.max_question_chars}")
        if self.generator is not None:
            n = len(self.generator.tokenizer(message, add_special_tokens=False)["input_ids"])
            if n > self.max_question_tokens:
                raise gr.Error(f"the question is {n} tokens; the limit is {self.max_question_tokens}")

    def capped_history(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """At most `max_history_turns` pairs and `max_history_chars` characters: turn one (the image's
        question), then the latest turns; `chat.answer` then trims to the model's context."""
        if len(pairs) > self.max_history_turns:
            pairs = pairs[:1] + (pairs[len(pairs) - self.max_history_turns + 1:] if self.max_history_turns > 1 else [])
        while pairs and sum(len(q) + len(a) for q, a in pairs) > self.max_history_chars:
            pairs = pairs[:1] + pairs[2:] if len(pairs) > 1 else []
        return pairs

    def on_upload(self, path):
        """(preview, top-K table rows, map figure, cleared chat) for an uploaded photo.

        The upload arrives as a file (not a decoded image), so it is checked here before any decoding.
        """
        import gradio as gr

        try:
            image = load_upload(path, self.limits)
        except UploadError as e:
            raise gr.Error(str(e)) from None
        if self.ranker is None:
            return image, [["-", "no AddressCLIP model loaded", "", ""]], None, []
        top = self.ranker.top_k(image, self.top_k)
        rows = [[t["rank"], t["address"], t["similarity"], t["probability"]] for t in top]
        fig = city_map(self.gazetteer, top) if self.gazetteer is not None else None
        return image, rows, fig, []

    def on_query(self, text: str):
        """(map figure, summary) of how similar every test image is to an address text (`address-llava query-map`)."""
        import gradio as gr

        if not text or not text.strip():
            raise gr.Error("type an address")
        if self.query_mapper is None:
            raise gr.Error("no AddressCLIP model loaded")
        res = self.query_mapper.query([text])[0]
        s = res.summary()
        where = ("no geometry matched" if s["level"] is None
                 else f"{s['level']} **{s['matched']}** ({len(s['sub_streets'])} sub-streets, {s['method']} match)")
        auc = "n/a" if s["auc"] is None else f"{s['auc']:.3f}"
        return self.query_mapper.figure(res), (f"{where}; AUC {auc}, {s['n_inside']} images inside / "
                                               f"{s['n_outside']} outside")

    def on_ask(self, path, message: str, history: list | None, use_candidates: bool = False):
        """The chat history (messages) with the user's message and the model's answer appended.

        use_candidates: give the model AddressCLIP's top-K addresses in the first question (candidate-grounded
        answers, for a model trained with `conversations --candidates`)."""
        import gradio as gr

        history = list(history or [])
        if self.generator is None:
            raise gr.Error("no LLaVA model loaded")
        self.check_question(message)
        try:
            image = load_upload(path, self.limits)
        except UploadError as e:
            raise gr.Error(str(e)) from None
        pairs, pending = [], None
        for m in history:
            role, content = m["role"], m["content"]
            text = content if isinstance(content, str) else " ".join(
                c.get("text", "") for c in content if isinstance(c, dict)) if isinstance(content, list) else str(content)
            if role == "user":
                pending = text
            elif role == "assistant" and pending is not None:
                pairs.append((pending, text))
                pending = None
        if use_candidates and self.ranker is None:
            raise gr.Error("candidate-grounded answers need an AddressCLIP model (--clip)")
        reply = chat.answer(image, message, self.capped_history(pairs), model=self.generator,
                            max_new_tokens=self.max_new_tokens, candidates=self.ranker if use_candidates else None,
                            top_k=self.top_k, candidate_scores=self.candidate_scores, max_time=self.max_time)
        return history + [{"role": "user", "content": message}, {"role": "assistant", "content": reply}], ""

    def build(self):
        import gradio as gr

        on_upload, on_ask, on_query = (_user_facing(h) for h in (self.on_upload, self.on_ask, self.on_query))
        with gr.Blocks(title="Where was this photo taken?", delete_cache=self.cache_cleanup) as app:
            gr.Markdown("## Where was this photo taken?\nUpload a street photo: AddressCLIP ranks the city's "
                        "addresses, and you can ask the LLaVA model about it.")
            with gr.Row():
                with gr.Column():
                    photo = gr.File(label="photo (JPEG, PNG, WebP, BMP)", type="filepath",
                                    file_types=[".jpg", ".jpeg", ".png", ".webp", ".bmp"])
                    preview = gr.Image(label="preview", interactive=False, height=240)
                    table = gr.Dataframe(headers=["rank", "address", "similarity", "probability"],
                                         label=f"AddressCLIP top-{self.top_k}", interactive=False)
                with gr.Column():
                    plot = gr.Plot(label="map")
            chatbot = gr.Chatbot(label="chat", height=300)
            with gr.Row():
                box = gr.Textbox(placeholder="Where was this photo taken?", show_label=False, scale=4)
                ask = gr.Button("Ask", scale=1)
            grounded = gr.Checkbox(label=f"give the model AddressCLIP's top-{self.top_k} candidates "
                                         "(candidate-grounded answers)", value=False)
            photo.upload(on_upload, inputs=photo, outputs=[preview, table, plot, chatbot], api_name="rank")
            ask.click(on_ask, inputs=[photo, box, chatbot, grounded], outputs=[chatbot, box], api_name="ask")
            box.submit(on_ask, inputs=[photo, box, chatbot, grounded], outputs=[chatbot, box])
            gr.Markdown("### Where does AddressCLIP see an address?\nEvery test image coloured by its similarity "
                        "to your text; the area the text names is outlined.")
            with gr.Row():
                query = gr.Textbox(label="address query", placeholder="a street, a neighbourhood, or any wording",
                                   scale=4)
                show = gr.Button("Show on map", scale=1)
            query_info = gr.Markdown()
            query_plot = gr.Plot(label="similarity map")
            show.click(on_query, inputs=query, outputs=[query_plot, query_info], api_name="query_map")
            query.submit(on_query, inputs=query, outputs=[query_plot, query_info])
        return app


def launch(demo: Demo, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True):
    """Starts the server (127.0.0.1 unless told otherwise) and returns the Gradio app."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("web demo bound to %s: it is reachable from other machines", host)
    app = demo.build()
    app.queue(default_concurrency_limit=1)  # one model, one generation at a time
    app.launch(server_name=host, server_port=port, share=False, max_file_size=demo.limits.max_bytes,
               prevent_thread_lock=not block, show_error=True, quiet=not block)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava web-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="address dataset folder (gallery and map)")
    p.add_argument("--clip", default=None, help="train-clip checkpoint for the top-K panel")
    p.add_argument("--clip-model", default=None, help="or an open_clip model name (with --clip-pretrained)")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or weights file")
    p.add_argument("--model", default=None, help="LLaVA folder / hub id for the chat (with --adapter: the base)")
    p.add_argument("--adapter", default=None, help="train-llava checkpoint for the chat")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.add_argument("--max-side", type=int, default=4096, help="largest accepted image width/height")
    p.add_argument("--top-k", type=int, default=5, help="AddressCLIP addresses in the panel and in a "
                   "candidate-grounded question")
    p.add_argument("--candidate-scores", action="store_true",
                   help="write each candidate's probability after it (for a model trained that way)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="chat answer length limit")
    p.add_argument("--max-question-chars", type=int, default=1000, help="longest accepted question (characters)")
    p.add_argument("--max-question-tokens", type=int, default=256, help="longest accepted question (tokens)")
    p.add_argument("--max-history-turns", type=int, default=8,
                   help="earlier chat turns the model sees at most (the first, then the latest)")
    p.add_argument("--max-time", type=float, default=60.0, help="seconds one answer may generate for")
    p.add_argument("--cache-age", type=int, default=3600,
                   help="uploads older than this many seconds are deleted from the server (checked as often)")
    return p


@command_main("web-demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_run_options(max_new_tokens=args.max_new_tokens, top_k=args.top_k, device=args.device)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    ranker = None
    if args.clip or args.clip_model:
        ranker = AddressRanker.from_args(args.clip, args.clip_model, args.clip_pretrained, args.dataset, device)
    gen = load_generator(args.model, args.adapter, device) if (args.model or args.adapter) else None
    if ranker is None and gen is None:
        raise SystemExit("give --clip/--clip-model and/or --model/--adapter")
    mapper = None
    if ranker is not None:
        mapper = QueryMapper(ranker.bundle, args.dataset, QueryMapConfig(split="test", device=device))
    demo = Demo(ranker, gen, Gazetteer.from_dataset(args.dataset),
                UploadLimits(max_bytes=int(args.max_upload_mb * 2**20), max_side=args.max_side),
                args.max_new_tokens, query_mapper=mapper, max_question_chars=args.max_question_chars,
                max_question_tokens=args.max_question_tokens, max_history_turns=args.max_history_turns,
                max_time=args.max_time, cache_cleanup=(args.cache_age, args.cache_age), top_k=args.top_k,
                candidate_scores=args.candidate_scores)
    launch(demo, args.host, args.port, block=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
