"""The `address-llava` console command: one subcommand per pipeline stage.

Each subcommand is a module exposing `main(argv=None)`; modules are imported lazily so that
`address-llava --help` stays fast and a stage's heavy dependencies load only when it runs.
Run `address-llava <command> --help` for a stage's own options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import DEBUG_FLAG, run_guarded
from clip_stage.core.registry import Registry


@dataclass(frozen=True)
class Command:
    target: str
    """`package.module:function` called with the remaining argv."""
    help: str


COMMANDS: Registry[Command] = Registry("command")


def register_command(name: str, target: str, help: str) -> None:
    """Adds a subcommand; a duplicate name is an error (registries refuse silent overrides)."""
    if name in COMMANDS:  # checked here to name the existing target: that is where the clash is
        raise ValueError(f"command {name!r} is already registered (-> {COMMANDS[name].target})")
    COMMANDS.register(name, Command(target, help))


# Stage 1: address data
register_command("demo-city", "clip_stage.data.demo_city:main", "render the built-in demo city: synthetic street-view images + GPS")
register_command("build-dataset", "clip_stage.data.build:main", "images with GPS + a street network -> image-address dataset")
register_command("load-ial", "clip_stage.data.ial:main", "convert a published AddressCLIP dataset (Pitts-IAL / SF-IAL) to our format")
register_command("dataset-summary", "clip_stage.data.summary:summary_main", "print the summary of a built address dataset")
# Stage 2: AddressCLIP
register_command("caption", "clip_stage.data.caption:main", "fill the caption column with a BLIP captioning model")
register_command("train-clip", "clip_stage.train:main", "fine-tune an open_clip model with the AddressCLIP losses")
register_command("eval-clip", "clip_stage.evaluate:main", "SSA/SA top-1/top-5 of a CLIP model against a candidate address gallery")
register_command("export-clip", "clip_stage.export_hf:main", "export an AddressCLIP checkpoint to Hugging Face CLIPVisionModel / CLIPModel")
register_command("candidates", "clip_stage.candidates:main", "cross-fitted AddressCLIP top-K candidate addresses of every image (for candidate-grounded LLaVA)")
register_command("clip-baselines", "clip_stage.baselines:main", "zero-shot, address-only and loss-ablation runs of AddressCLIP in one table")
register_command("query-map", "clip_stage.query_map:main", "map how similar every image is to an address text, with the AUC of the named area")
register_command("plot-run", "clip_stage.core.curves:main", "draw training curves (loss terms, learning rate) of train-clip / train-llava runs, several overlaid")
# Stage 3: conversations
register_command("conversations", "conversations.build:main", "turn an address dataset into multi-turn LLaVA address Q&A")
register_command("validate", "conversations.validate:main", "validate any LLaVA-format conversation file")
register_command("conv-stats", "conversations.stats:main", "statistics of a LLaVA-format conversation file (text + PNG)")
# Stage 4: LLaVA
register_command("train-llava", "llava_address.train:main", "projector alignment / LoRA / QLoRA / full fine-tuning of LLaVA")
register_command("merge", "llava_address.merge:main", "fold a LoRA checkpoint into a plain Hugging Face LLaVA directory")
register_command("convert-llava", "llava_address.convert_llava:main", "convert an original LLaVA checkpoint (llava_llama + mm_projector) to a Hugging Face LLaVA folder")
register_command("infer", "llava_address.eval.infer:main", "batched, resumable answers of a LLaVA model for an evaluation split (JSONL)")
register_command("chat", "llava_address.apps.chat:main", "chat about one image's address in the terminal (streaming), or --question once")
# Stage 5: use and benchmark
register_command("score", "llava_address.eval.scoring:main", "score any model's free-text answers against the structured references")
register_command("benchmark", "llava_address.eval.benchmark:main", "evaluate several models (ours, base LLaVA, AddressCLIP, HF, imported) on one split")
register_command("web-demo", "llava_address.apps.webdemo:main", "Gradio web UI: AddressCLIP top-5 on a map + chat (binds 127.0.0.1)")
# Whole pipeline
register_command("demo", "llava_address.apps.pipeline:main", "run the whole pipeline on the built-in demo city")


def _resolve(target: str):
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def run_command(name: str, argv: list[str]) -> int:
    """Runs the `address-llava NAME` subcommand's `main(argv)` in-process (its module imported only now);
    returns its exit status. The whole-pipeline demo calls the stages through this."""
    if name not in COMMANDS:
        raise KeyError(f"no address-llava command {name!r}; commands: {', '.join(sorted(COMMANDS))}")
    return _resolve(COMMANDS[name].target)(argv)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="address-llava",
        description="Street-address localisation with AddressCLIP and LLaVA. One subcommand per stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<16} {c.help}" for n, c in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options (see `<command> --help`)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too (before the "
                        "command or among its options; or set ADDRESS_LLAVA_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = []
    while argv and argv[0] == DEBUG_FLAG:  # `address-llava --debug CMD ...`: tracebacks for user errors too
        debug, argv = [DEBUG_FLAG], argv[1:]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    # The same one-line-error guard as each command's own main: it also covers the import of the command.
    return run_guarded(f"address-llava {ns.command}",
                       lambda args: run_command(ns.command, args), debug + argv[1:])


if __name__ == "__main__":
    sys.exit(main())
