"""Shared fixtures: tiny data and tiny models built from configs; nothing is downloaded."""

from __future__ import annotations

import os

# Set before any library reads them: no hub access, DeepSpeed's CPU accelerator, quiet tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import shutil
import tempfile

from torch.utils.cpp_extension import get_default_build_root

# Tests never write the user's caches (~/.cache/address-llava: gallery embeddings, LLaVA record lengths);
# launched subprocesses inherit this. Compiled torch/DeepSpeed ops keep their usual folder: rebuilding them
# would cost minutes per session.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="address-llava-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import pytest  # noqa: E402

from tests.toy_data import make_toy_dataset  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    tiny models gain nothing from more, and on a shared 2-core machine contended threads are far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_logging_to_closed_streams():
    """A command's `logging.basicConfig` binds the root handler to the stderr of the test that ran it, which
    pytest closes afterwards; a later warning would then print a logging-error traceback into another test."""
    import logging

    yield
    for handler in list(logging.root.handlers):
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            logging.root.removeHandler(handler)


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


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny LLaVA-1.5 checkpoint folder (model + processor + sentencepiece tokenizer, safetensors), built from
    llava_address/model_configs/tiny-llava.json with seed 0: load it with
    `build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))`. 32 px images, 16 image tokens. Read-only."""
    from llava_address.tiny import build_tiny_llava, demo_texts, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_llava")
    tok = train_tokenizer(demo_texts(), root / "tokenizer")
    build_tiny_llava(tok, seed=0, out_dir=root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def tiny_vision_tower_dir(tmp_path_factory):
    """A tiny CLIPVisionModelWithProjection + CLIPImageProcessor folder (export-clip's layout) whose shape differs from
    `tiny_llava_dir`'s tower: hidden 48, 48 px images, patch 12 (still 16 patches), mean 0.5 / std 0.25. Read-only."""
    from llava_address.tiny import build_tiny_vision_tower

    out = tmp_path_factory.mktemp("tiny_tower") / "tower"
    build_tiny_vision_tower(out, seed=1, hidden_size=48, intermediate_size=96, image_size=48, patch_size=12,
                            image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], with_projection=True)
    return out


@pytest.fixture(scope="session")
def tiny_llava_data(tmp_path_factory):
    """A LLaVA-format conversation file (`train.json`, 12 records, 2-turn address Q&A, one image each) beside an
    `images/` folder of small solid-colour PNGs of varied sizes. Returns the data folder. Read-only."""
    from llava_address.tiny import write_toy_llava_data

    return write_toy_llava_data(tmp_path_factory.mktemp("tiny_llava_data") / "data", n=12, seed=0)
