"""Every command takes `--snake_case` for its `--kebab-case` flags (LLaVA / transformers users type underscores).

One test per parser family: section configs (`clip_stage.core.config.ConfigParser`) and the single-dataclass helper
(`add_dataclass_args`), train-llava's recipe parser (the same ConfigParser), and hand-written parsers
(`clip_stage.core.config.ArgumentParser`); plus a
check that no registered command builds a parser that would miss the snake_case spellings.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re

import pytest

from clip_stage.core.config import ArgumentParser, add_dataclass_args, dash_flags
from llava_address.apps.cli import COMMANDS


def test_dash_flags_rewrites_only_known_option_names():
    known = {"--image-root", "--max-new-tokens", "--x_y"}
    argv = ["--image_root", "a_b", "--max_new_tokens=5", "--x_y", "1", "--not_known", "--", "--image_root"]
    assert dash_flags(argv, known) == ["--image-root", "a_b", "--max-new-tokens=5", "--x_y", "1", "--not_known",
                                       "--", "--image_root"]


def test_dataclass_family_accepts_both_spellings_in_any_parser(capsys):
    from conversations.build import build_parser

    def parse(*argv):
        return build_parser().parse_config(["--dataset", "d", "--out", "o", *argv])["conversations"]

    snake = parse("--eval_held_out_prob", "0.25", "--sub_street_prob=0.5", "--formats", "llava,messages")
    kebab = parse("--eval-held-out-prob", "0.25", "--sub-street-prob=0.5", "--formats", "llava,messages")
    assert snake == kebab and snake.eval_held_out_prob == 0.25 and snake.sub_street_prob == 0.5
    assert snake != parse()  # the flags did something

    # the twin is registered by the helper itself, so even argparse's own parser takes it (booleans too)
    from dataclasses import dataclass

    @dataclass
    class Opts:
        max_steps: int = 1
        """cap"""
        use_cache: bool = True
        """cache"""

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Opts)
    assert vars(p.parse_args(["--max_steps", "4", "--no-use_cache"])) == {"max_steps": 4, "use_cache": False}
    p.print_help()
    shown = capsys.readouterr().out
    assert "--max-steps" in shown and "--max_steps" not in shown  # each flag once in --help


def test_train_llava_family_accepts_llava_style_flags():
    from llava_address.train import GROUPS
    from llava_address.train_args import build_parser

    def parse(*argv):
        return build_parser(GROUPS).parse_config(["--data-path", "d.json", *argv]).sections

    snake = parse("--model_name_or_path", "X", "--train.per_device_batch_size", "3", "--learning_rate=1e-4",
                  "--gradient_checkpointing", "True")
    kebab = parse("--model-name-or-path", "X", "--train.per-device-batch-size", "3", "--learning-rate=1e-4",
                  "--gradient-checkpointing")
    assert snake == kebab
    assert snake["model"].model_name_or_path == "X" and snake["train"].per_device_batch_size == 3
    assert snake["train"].gradient_checkpointing is True and snake["train"].learning_rate == 1e-4
    assert parse("--model_name_or_path", "X", "--gradient_checkpointing", "false")["train"].gradient_checkpointing is False
    assert parse("--model-name-or-path", "X", "--gradient-checkpointing",
                 "--no-gradient_checkpointing")["train"].gradient_checkpointing is False
    with pytest.raises(SystemExit):
        parse("--model_name_or_pathh", "X")  # an unknown option is still an error


@pytest.mark.parametrize("module,snake_argv,kebab_argv", [
    ("llava_address.eval.infer", ["--eval", "e.json", "--image_root", "im_a", "--out", "o.jsonl", "--max_new_tokens", "7",
                             "--batch_size=3", "--no_pad_to_square"],
     ["--eval", "e.json", "--image-root", "im_a", "--out", "o.jsonl", "--max-new-tokens", "7", "--batch-size=3",
      "--no-pad-to-square"]),
    ("llava_address.eval.benchmark", ["--image_root", "r", "--max_new_tokens", "7", "--list_kinds"],
     ["--image-root", "r", "--max-new-tokens", "7", "--list-kinds"]),
    ("llava_address.apps.chat", ["--image", "a_b.jpg", "--max_new_tokens", "7", "--top_k", "2"],
     ["--image", "a_b.jpg", "--max-new-tokens", "7", "--top-k", "2"]),
])
def test_hand_written_parsers_accept_both_spellings(module, snake_argv, kebab_argv):
    parser = importlib.import_module(module).build_parser()
    assert isinstance(parser, ArgumentParser)
    snake, kebab = vars(parser.parse_args(snake_argv)), vars(parser.parse_args(kebab_argv))
    assert snake == kebab and snake["max_new_tokens"] == 7
    assert snake != vars(parser.parse_args(snake_argv[:2] if module != "llava_address.eval.infer" else snake_argv[:6]))


def _modules_of_commands():
    return sorted({c.target.split(":")[0] for c in COMMANDS.values()})


@pytest.mark.parametrize("module", _modules_of_commands())
def test_no_command_parser_misses_the_snake_spellings(module):
    """A command's parser is `clip_stage.core.config.ArgumentParser`, or argparse's with only dataclass fields (whose twins the
    helper registers) and dash-free hand-written flags."""
    source = inspect.getsource(importlib.import_module(module))
    if "argparse.ArgumentParser(" not in source:
        return
    dashed = re.findall(r"add_argument\(\s*\"(--[a-z0-9]+-[a-z0-9-]+)\"", source)
    assert not dashed, f"{module}: use clip_stage.core.config.ArgumentParser so {dashed} also take underscores"


@pytest.mark.parametrize("module, required", [
    ("llava_address.merge", ["--checkpoint", "c", "--out", "o"]),
    ("llava_address.convert_llava", ["--model-path", "m", "--vision-tower", "t", "--out", "o"]),
    ("llava_address.eval.infer", ["--eval", "e", "--image-root", "i", "--out", "o"]),
    ("llava_address.apps.chat", ["--image", "i"]),
    ("llava_address.eval.benchmark", []),
])
def test_weights_dtype_is_one_concept_with_both_spellings(module, required):
    """Model-loading commands take --dtype and --torch-dtype alike (transformers renamed torch_dtype to dtype)."""
    parser = importlib.import_module(module).build_parser()
    values = {vars(parser.parse_args([*required, flag, "bfloat16"])).get(dest)
              for flag in ("--dtype", "--torch-dtype", "--torch_dtype") for dest in ("dtype", "torch_dtype")}
    assert values - {None} == {"bfloat16"}


@pytest.mark.parametrize("module, required", [
    ("clip_stage.evaluate", ["--dataset", "d", "--out", "o", "--checkpoint", "c"]),
    ("clip_stage.candidates", ["--checkpoint", "c", "--dataset", "d", "--out", "o"]),
    ("clip_stage.baselines", ["--dataset", "d", "--out", "o"]),
])
def test_address_style_is_one_concept_with_train_clips_spelling_too(module, required):
    """train-clip calls it --address-style; the gallery commands' --style answers to that name as well."""
    parser = importlib.import_module(module).build_parser()
    assert {parser.parse_args([*required, flag, "street"]).style
            for flag in ("--style", "--address-style", "--address_style")} == {"street"}


def test_one_concept_one_flag_through_field_aliases(tmp_path):
    """Config fields answer to the name other commands use for the same thing (dataclass metadata ALIASES)."""
    from clip_stage.train_config import parse_config as parse_train_clip
    from conversations.build import build_parser as conversations_parser
    from llava_address.train import parse_args as parse_train_llava

    conv = lambda *a: conversations_parser().parse_config(["--dataset", "d", "--out", "o", *a])["conversations"]
    assert conv("--top-k", "3").candidate_k == conv("--candidate-k", "3").candidate_k == conv("--top_k", "3").candidate_k == 3
    clip = parse_train_clip(["--dataset", "d", "--out", "runs/x"])
    assert clip.run.output_dir == "runs/x"
    (tmp_path / "data.json").write_text("[]")
    llava = parse_train_llava(["--model-name-or-path", "m", "--data-path", str(tmp_path / "data.json"),
                               "--out", "runs/y"])
    assert llava.train.output_dir == "runs/y"


def test_every_progress_switch_answers_to_the_trainers_progress_bar_flags():
    """One concept, one name: `--progress-bar` / `--no-progress-bar` (train-clip, train-llava) also switch the
    bars of caption, candidates and build-dataset; their older spellings keep working."""
    from clip_stage.candidates import build_parser as candidates_parser
    from clip_stage.core.config import ConfigParser, Section
    from clip_stage.data.build import build_parser as build_dataset_parser
    from clip_stage.data.caption import CaptionArgs
    from clip_stage.train_config import parse_config as train_clip_config
    from llava_address.train import parse_args as train_llava_args

    def caption(*argv):
        return ConfigParser([Section("caption", CaptionArgs)]).parse_config(["--dataset", "d", *argv])["caption"].progress

    assert caption() and not caption("--no-progress-bar") and not caption("--progress", "false")
    for flag in ("--dtype", "--torch-dtype", "--torch_dtype"):  # and the weights dtype as every model loader
        assert ConfigParser([Section("caption", CaptionArgs)]).parse_config(
            ["--dataset", "d", flag, "float32"])["caption"].dtype == "float32"

    def candidates(*argv):
        return candidates_parser().parse_args(["--checkpoint", "c", "--dataset", "d", "--out", "o", *argv]).progress

    assert not candidates() and candidates("--progress-bar") and candidates("--progress")

    def build_dataset(*argv):
        return build_dataset_parser().parse_config(["--images", "i", "--gps", "g.csv", "--out", "o", *argv]).args.progress_bar

    assert build_dataset() and not build_dataset("--no-progress-bar")

    assert not train_clip_config(["--dataset", "d", "--no-progress-bar"]).run.progress_bar
    assert not train_llava_args(["--data-path", "d", "--model-name-or-path", "m", "--no-progress-bar"]).train.progress_bar
