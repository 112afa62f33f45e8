"""train-clip and train-llava speak one vocabulary: the same flags for the concepts they share, read from
their `--help`, and the old spellings are gone (pre-1.0: no aliases)."""

from __future__ import annotations

import re

import pytest

from clip_stage.core.training import CHECKPOINT_RE, EpochSampler, checkpoint_name, epoch_permutation

# The concepts both trainers have, in HF Trainer's words.
SHARED = {
    "--output-dir", "--learning-rate", "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-epsilon",
    "--num-epochs", "--max-steps", "--per-device-batch-size", "--max-grad-norm", "--mixed-precision",
    "--gradient-checkpointing", "--seed", "--save-every", "--save-total-limit", "--log-every", "--resume",
    "--stop-at-step", "--num-workers", "--report-to", "--progress-bar",
}
OLD = {"--lr", "--grad-clip", "--keep-checkpoints", "--stop-after-steps", "--epochs", "--batch-size", "--precision",
       "--grad-checkpointing", "--beta1", "--beta2", "--eps", "--progress", "--tensorboard"}


def _help_flags(command: str, capsys) -> set[str]:
    """The option names a command's --help lists (the option column only, not the help texts)."""
    from llava_address.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    flags: set[str] = set()
    for line in capsys.readouterr().out.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            flags.update(re.findall(r"--[\w.-]+", re.split(r"\s{2,}", stripped)[0]))
    return {f.replace("_", "-") for f in flags}


def test_both_trainers_show_the_same_names_for_shared_concepts(capsys):
    clip, llava = _help_flags("train-clip", capsys), _help_flags("train-llava", capsys)
    assert SHARED <= clip, sorted(SHARED - clip)
    assert SHARED <= llava, sorted(SHARED - llava)
    assert not OLD & clip and not OLD & llava, sorted(OLD & (clip | llava))


def test_resume_takes_a_path_or_latest_in_both():
    from clip_stage.train_config import parse_config
    from llava_address.train import parse_args

    assert parse_config(["--dataset", "d", "--resume", "latest"]).run.resume == "latest"
    assert parse_config(["--dataset", "d", "--resume", "runs/x/checkpoint-000002"]).run.resume == "runs/x/checkpoint-000002"
    assert parse_config(["--dataset", "d"]).run.resume is None
    assert parse_args(["--data-path", "d", "--model-name-or-path", "m", "--resume", "latest"]).train.resume == "latest"


def test_checkpoint_names_and_epoch_order_are_shared():
    assert checkpoint_name(120) == "checkpoint-000120" and CHECKPOINT_RE.match(checkpoint_name(7))
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == epoch_permutation(10, 3, 0)
    sampler.set_epoch(1)
    assert list(sampler) == epoch_permutation(10, 3, 1) != first
