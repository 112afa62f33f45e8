"""Shared fixtures: tiny data and tiny models built from configs; nothing is downloaded."""

from __future__ import annotations

import os

# Set before any library reads them: no hub access, DeepSpeed's CPU accelerator, quiet tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.toy_data import make_toy_dataset


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    """A 9-sub-street, 144-image address dataset in the on-disk format (read-only: copy to modify)."""
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "dataset")


# --- clip_stage fixtures (issue 3) ---

# --- conversations fixtures (issue 4) ---


@pytest.fixture(scope="session")
def toy_conversations(toy_dataset, tmp_path_factory):
    """Conversations built from `toy_dataset` (seed 0): train.json, eval.json (LLaVA), *.jsonl, *_messages.json,
    build_info.json; images are under `toy_dataset / "images"`. Read-only."""
    from conversations.build import main

    out = tmp_path_factory.mktemp("conv") / "conversations"
    assert main(["--dataset", str(toy_dataset), "--out", str(out), "--formats", "llava,jsonl,messages"]) == 0
    return out


# --- llava_address fixtures (issue 5) ---
