"""One config system: train-clip, train-llava, conversations and build-dataset parse booleans, lists, `none`,
`_`/`-` flag spellings, YAML sections and flag-over-file precedence the same way (clip_stage.core.config)."""

from __future__ import annotations

import pytest

from clip_stage.core.config import ConfigError, ConfigParser, Section


def _clip(argv):
    from clip_stage.train_config import build_parser

    return build_parser().parse_config(["--dataset", "d", *argv])


def _llava(argv):
    from llava_address.train import GROUPS
    from llava_address.train_args import build_parser

    return build_parser(GROUPS).parse_config(["--data-path", "d.json", "--model-name-or-path", "m", *argv])


def _conversations(argv):
    from conversations.build import build_parser

    return build_parser().parse_config(["--dataset", "d", "--out", "o", *argv])


def _build_dataset(argv):
    from clip_stage.data.build import build_parser

    return build_parser().parse_config(["--images", "i", "--out", "o", *argv])


# (parse, section, a boolean field, an optional field and a value for it, a list or comma-list field)
COMMANDS = {
    "train-clip": (_clip, "data", "augment", ("optim", "max_steps", "7", 7)),
    "train-llava": (_llava, "train", "gradient_checkpointing", ("train", "max_steps", "7", 7)),
    "conversations": (_conversations, "conversations", "overwrite", None),
    "build-dataset": (_build_dataset, "build", "overwrite", None),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_booleans_are_spelled_the_same_in_every_command(command):
    parse, section, name, _ = COMMANDS[command]
    flag = "--" + name.replace("_", "-")
    snake = "--" + name
    for argv, want in (([flag], True), ([flag, "false"], False), ([flag, "no"], False), ([flag, "1"], True),
                       (["--no-" + name.replace("_", "-")], False), ([snake, "True"], True),
                       (["--no-" + name], False), ([flag, "--no-" + name.replace("_", "-")], False)):
        assert getattr(parse(argv)[section], name) is want, (command, argv)
    with pytest.raises(SystemExit):
        parse([flag, "maybe"])


@pytest.mark.parametrize("command", ["train-clip", "train-llava"])
def test_none_unsets_an_optional_field_and_a_number_sets_it(command):
    parse, _, _, (section, name, text, value) = COMMANDS[command]
    flag = "--" + name.replace("_", "-")
    assert getattr(parse([flag, text])[section], name) == value
    for word in ("none", "None", "null"):
        assert getattr(parse([flag, text, flag, word])[section], name) is None
    with pytest.raises(SystemExit):
        parse([flag, "seven"])


@pytest.mark.parametrize("command", ["train-clip", "train-llava"])
def test_lists_take_spaces_commas_and_repeats(command):
    parse = COMMANDS[command][0]
    section = "run" if command == "train-clip" else "train"
    for argv in (["--report-to", "wandb", "mlflow"], ["--report-to", "wandb,mlflow"],
                 ["--report-to", "wandb", "--report-to", "mlflow"], ["--report_to=wandb,mlflow"]):
        assert parse(argv)[section].report_to == ("wandb", "mlflow"), (command, argv)
    assert parse(["--report-to", "none"])[section].report_to == ()


def test_comma_list_text_fields_take_yaml_lists_and_mappings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("formats: [llava, jsonl]\ntype-weights: {street: 1, place: 2}\n")
    conv = _conversations(["--config", str(cfg)])["conversations"]
    assert conv.formats == "llava,jsonl" and conv.type_weights == "street=1,place=2"
    assert _conversations(["--formats", "llava,jsonl"])["conversations"].formats == "llava,jsonl"
    cfg.write_text("build: {highway_classes: [residential, primary]}\n")
    assert _build_dataset(["--config", str(cfg)])["build"].highway_classes == "residential,primary"


@pytest.mark.parametrize("command", COMMANDS)
def test_underscores_and_dashes_are_one_flag(command):
    parse, section, _, _ = COMMANDS[command]
    name, values = {
        "train-clip": ("per_device_batch_size", ("4", 4)), "train-llava": ("per_device_batch_size", ("4", 4)),
        "conversations": ("max_turns", ("3", 3)), "build-dataset": ("chunk_rows", ("4", 4)),
    }[command]
    section = {"train-clip": "optim", "train-llava": "train"}.get(command, section)
    text, value = values
    dashed, snake = "--" + name.replace("_", "-"), "--" + name
    qualified = f"--{section}.{name}" if command in ("train-clip", "train-llava", "build-dataset") else None
    for argv in ([dashed, text], [snake, text], [f"{dashed}={text}"], *(([qualified, text],) if qualified else ())):
        assert getattr(parse(argv)[section], name) == value, (command, argv)
    with pytest.raises(SystemExit):
        parse([dashed + "x", text])  # an unknown flag is still refused


def test_a_name_two_sections_share_is_spelled_with_its_section():
    from llava_address.train import GROUPS
    from llava_address.train_args import build_parser

    parsed = _llava(["--model.vision-tower", "t", "--trainables.vision_tower", "full", "--model_max_length", "64"])
    assert parsed["model"].vision_tower == "t" and parsed["trainables"].vision_tower == "full"
    assert parsed["data"].model_max_length == 64  # one field, one flag: no section needed
    with pytest.raises(SystemExit):
        _llava(["--vision-tower", "t"])  # ambiguous, so not a flag
    help_text = build_parser(GROUPS).format_help()
    assert "--model-max-length" in help_text and "--data.model-max-length" in help_text
    assert "--model.model-max-length" not in help_text


@pytest.mark.parametrize("command", COMMANDS)
def test_yaml_sections_then_flags(command, tmp_path):
    parse, section, _, _ = COMMANDS[command]
    cfg = tmp_path / "c.yaml"
    yaml_text, flags, check = {
        "train-clip": ("optim:\n  learning_rate: 1.0e-3\n  num_epochs: 5\nrun: {save-every: 7}\nseed: 3\n", ["--num-epochs", "6"],
                       lambda p: (p["optim"].learning_rate, p["optim"].num_epochs, p["run"].save_every, p["optim"].seed) == (1e-3, 6, 7, 3)),
        "train-llava": ("train:\n  learning_rate: 1e-3\n  num_epochs: 5\ntrainables: {lora_r: 8}\n",
                        ["--num-epochs", "6"],
                        lambda p: (p["train"].learning_rate, p["train"].num_epochs, p["trainables"].lora_r) == (1e-3, 6, 8)),
        "conversations": ("conversations:\n  seed: 5\nmax_turns: 3\n", ["--seed", "6"],
                          lambda p: (p["conversations"].seed, p["conversations"].max_turns) == (6, 3)),
        "build-dataset": ("split:\n  split: geo\n  seed: 5\nbuild: {workers: 2}\n", ["--seed", "6"],
                          lambda p: (p["split"].split, p["split"].seed, p["build"].workers) == ("geo", 6, 2)),
    }[command]
    cfg.write_text(yaml_text)
    flag = "--config" if command == "train-llava" else "--config"
    parsed = parse([flag, str(cfg), *flags])
    assert check(parsed) and parsed.config_file == str(cfg)

    cfg.write_text(f"{section}:\n  no_such_field: 1\n")
    with pytest.raises(ConfigError, match="no_such_field"):
        parse([flag, str(cfg)])
    cfg.write_text("no_such_section: {a: 1}\n")
    with pytest.raises(ConfigError, match="no_such_section"):
        parse([flag, str(cfg)])


@pytest.mark.parametrize("command", ["train-clip", "train-llava"])
def test_bad_yaml_values_name_the_file_and_key(command, tmp_path):
    parse, _, bool_name, (section, name, _, _) = COMMANDS[command]
    cfg = tmp_path / "c.yaml"
    flag = "--config" if command == "train-llava" else "--config"
    cfg.write_text(f"{section}:\n  {name}: seven\n")
    with pytest.raises(ConfigError, match=f"{cfg}: {section}.{name}: expected int"):
        parse([flag, str(cfg)])
    cfg.write_text(f"{section}:\n  {name}: none\n")  # a YAML string reads as the same text after the flag
    assert getattr(parse([flag, str(cfg)])[section], name) is None


def test_help_shows_field_docstrings_in_every_command():
    from clip_stage.data.build import build_parser as build_dataset_parser
    from clip_stage.train_config import build_parser as clip_parser
    from conversations.build import build_parser as conversations_parser
    from llava_address.train import GROUPS
    from llava_address.train_args import build_parser as llava_parser

    for parser, doc in ((clip_parser(), "Peak learning rate."), (llava_parser(GROUPS), "peak learning rate of the LLM"),
                        (conversations_parser(), "fewest question/answer pairs"),
                        (build_dataset_parser(), "GPS-table rows read, checked and geocoded at a time")):
        text = " ".join(parser.format_help().split())
        assert doc in text, parser.prog
        assert "--no-" not in text  # the negative spellings are hidden: one entry per flag


def test_unknown_flag_and_bad_value_are_one_line_with_exit_2(capsys):
    from llava_address.apps.cli import main

    for argv in (["conversations", "--dataset", "d", "--out", "o", "--max-turnz", "3"],
                 ["train-clip", "--dataset", "d", "--num-epochs", "many"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{argv[0]}: error: " in err[0] and ("--max-turnz" in err[0] or "many" in err[0]), err
    assert main(["train-clip", "--dataset", "d", "--mixed-precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("train-clip: error: model: mixed_precision 'fp8'; valid: ('auto', 'no', 'bf16', 'fp16')")


def test_a_single_section_command_takes_flat_yaml_and_no_prefixed_flags(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Opts:
        size: int = 1
        """how big"""
        tags: tuple[str, ...] = ()
        """labels"""

    parser = ConfigParser([Section("opts", Opts)], prog="x")
    cfg = tmp_path / "o.yaml"
    cfg.write_text("size: 2\ntags: a,b\n")
    assert parser.parse_config(["--config", str(cfg), "--tags", "c"])["opts"] == Opts(2, ("c",))
    assert parser.parse_config(["--config", str(cfg)])["opts"] == Opts(2, ("a", "b"))
    with pytest.raises(SystemExit):
        parser.parse_config(["--opts.size", "3"])
