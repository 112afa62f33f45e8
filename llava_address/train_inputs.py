"""What a train-llava run trains and reads: the model (base, an earlier stage's weights, this stage's
trainables) and the data (dataset and per-process loader).

`cfg` is llava_address.train's RunConfig (its model, trainables, data and train sections). Used by that
module's `setup`, and by the training benchmark, which builds the same model and data for TRL.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from clip_stage.core.training import EpochSampler
from llava_address import model as model_lib
from llava_address.checkpoint_layout import ADAPTER_WEIGHTS, NON_LORA_WEIGHTS
from llava_address.components import num_image_tokens
from llava_address.convert_llava import mm_projector_file, read_mm_projector
from llava_address.data import LengthGroupedSampler, LlavaCollator, LlavaDataset
from llava_address.length_cache import resolve_cache_dir
from llava_address.prompting import attach_chat_template
from llava_address.trainables import apply_trainables


def load_stage_weights(model: torch.nn.Module, checkpoint: str | os.PathLike) -> list[str]:
    """Loads a previous stage's non-LoRA weights (non_lora_trainables.safetensors, e.g. the projector of a
    projector-alignment run, or LLaVA's own `mm_projector.bin`) into a plain LLaVA before this stage's
    trainables are applied."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    if (ckpt / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"--init-from {ckpt} holds a LoRA adapter: merge it first (address-llava merge) and "
                         "pass the merged folder as --model-name-or-path")
    if (projector := mm_projector_file(ckpt)) is not None:  # LLaVA's own projector pre-training output
        weights = read_mm_projector(projector)
    elif not (ckpt / NON_LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"--init-from {ckpt}: no {NON_LORA_WEIGHTS} or LLaVA mm_projector.bin")
    else:
        weights = load_file(str(ckpt / NON_LORA_WEIGHTS))
    own = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise KeyError(f"--init-from {ckpt}: weights the model does not have: {unknown[:5]}")
    for name, value in weights.items():
        if own[name].shape != value.shape:
            raise ValueError(f"--init-from {ckpt}: {name} is {tuple(value.shape)}, the model's is {tuple(own[name].shape)}"
                             " (a different vision tower or LLM?)")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value.to(own[name].dtype))
    return sorted(weights)


def build_model(cfg):
    """(model, processor, trainables summary) through llava_address.model."""
    from accelerate.utils import set_seed

    model, processor = model_lib.build_llava(cfg.model)
    # One training length (data.model_max_length): the saved tokenizer carries it too, since inference
    # budgets prompts by the tokenizer's limit; a tokenizer that already has a smaller one keeps it.
    tok = processor.tokenizer
    tok.model_max_length = min(tok.model_max_length, cfg.data.model_max_length)
    # Every checkpoint's processor then carries the chat template of the prompts it was trained on.
    attach_chat_template(processor, cfg.data.template)
    if cfg.train.init_from:
        load_stage_weights(model, cfg.train.init_from)
    # New parts (LoRA) are initialised from the seed alone: how the base loaded (e.g. transformers' ZeRO-3
    # aware loading draws random numbers) must not change them, so every launcher starts from the same model.
    set_seed(cfg.train.seed)
    result = apply_trainables(model, cfg.trainables)
    if isinstance(result, tuple):  # (model, summary)
        model, summary = result
    elif isinstance(result, torch.nn.Module):
        model, summary = result, None
    else:
        summary = result
    return model, processor, summary


def build_dataset(cfg, processor, model):
    """The dataset; under a multi-process launch only each node's main process runs the start-up tokenisation pass."""
    from accelerate import PartialState

    config = model.config
    # The main process tokenises every record and writes the length cache while the others wait, then they
    # read it (seconds, not minutes each). One per node: ~/.cache is usually node-local, and with a shared
    # cache folder the nodes' main processes still take one pass's time. Without a cache waiting gains
    # nothing: all ranks tokenise at once. If a main process fails (invalid records) it exits, and the
    # launcher stops the ranks still waiting.
    cached = resolve_cache_dir(cfg.data.length_cache_dir) is not None
    with PartialState().local_main_process_first() if cached else contextlib.nullcontext():
        return LlavaDataset.from_args(cfg.data, processor, num_image_tokens(config),
                                      image_token_id=getattr(config, "image_token_id", None))


def build_dataloader(dataset, cfg, processor) -> torch.utils.data.DataLoader:
    """Per-process batches; accelerate shards them (consecutive batches go to different ranks)."""
    bs = cfg.train.per_device_batch_size
    if cfg.data.group_by_length:
        sampler = LengthGroupedSampler(dataset.lengths, dataset.has_image, batch_size=bs, seed=cfg.train.seed)
    else:
        sampler = EpochSampler(len(dataset), cfg.train.seed)
    tokenizer = getattr(processor, "tokenizer", processor)
    return torch.utils.data.DataLoader(
        dataset, batch_size=bs, sampler=sampler, collate_fn=LlavaCollator(tokenizer.pad_token_id),
        num_workers=cfg.train.num_workers, drop_last=False,
        # Its own generator: starting an epoch's iterator must not draw from the global RNG, or a resumed
        # run's dropout masks would be shifted by one draw against the uninterrupted run's.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
