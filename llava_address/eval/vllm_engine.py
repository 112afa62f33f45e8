"""Serving a merged LLaVA model through vLLM's offline engine: `infer --engine vllm`, `benchmark --engine vllm`.

    address-llava infer --engine vllm --model runs/merged --eval CONV/eval.json --image-root DATA/images \
        --out answers.jsonl --batch-size 64

The prompt is the saved processor's own chat template (`merge` and train-llava checkpoints store one that
reproduces the training prompt, see `llava_address.prompting.chat_template`), rendered with the assistant
opener and tokenised WITHOUT added special tokens: the template writes the BOS itself, and vLLM would add a
second one to a text prompt. The one `<image>` id of the prompt is expanded into the image's features by
vLLM's LLaVA processor; images are padded to square as in training (`llava_address.data.expand_to_square`)
and passed as `multi_modal_data`. Decoding is greedy, like the HF engine's.

vLLM needs a CUDA GPU and an environment whose torch/transformers match the versions vLLM pins. Where it
cannot run, `vllm_unavailable()` gives the reason in one line and the commands refuse before loading
anything (exit 2). A train-llava adapter must be merged first (`address-llava merge`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from conversations.records import IMAGE_TOKEN
from llava_address.eval.errors import InferenceInputError

ENGINES = ("hf", "vllm")


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot run on this machine (its message is the one-line reason)."""


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here (one line), or None when it can. Checks only; imports neither vLLM nor a model."""
    if importlib.util.find_spec("vllm") is None:
        return ("--engine vllm needs vLLM, which is not installed (pip install vllm, in an environment whose torch "
                "and transformers match the versions vLLM pins); use --engine hf")
    import torch

    if not torch.cuda.is_available():
        return "--engine vllm needs a CUDA GPU and torch sees none; use --engine hf"
    return None


def require_vllm() -> None:
    """Raises EngineUnavailable with the reason when vLLM cannot run."""
    reason = vllm_unavailable()
    if reason:
        raise EngineUnavailable(reason)


def prompt_ids(processor, question: str) -> list[int]:
    """Token ids of one question about one image, through the processor's chat template (one `<image>` id)."""
    if not getattr(processor, "chat_template", None):
        raise InferenceInputError("the model's processor has no chat template; re-save it with `address-llava "
                                  "merge` (which stores the training prompt as one)")
    question = question.replace(IMAGE_TOKEN, "").strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class VllmGenerator:
    """A vLLM engine + the model's processor (chat template, image padding colour)."""

    llm: Any
    processor: Any
    pad_to_square: bool = True
    engine_kwargs: dict = field(default_factory=dict)
    """what `vllm.LLM` was given (for reports)"""

    def requests(self, questions: Sequence[str], images: Sequence) -> list[dict]:
        """vLLM prompts: token ids + the (padded) image as multi_modal_data."""
        from llava_address.data import expand_to_square, mean_colour  # training's padding (lazy: torch)

        if self.pad_to_square:
            images = [expand_to_square(im, mean_colour(self.processor.image_processor)) for im in images]
        return [{"prompt_token_ids": prompt_ids(self.processor, q), "multi_modal_data": {"image": im}}
                for q, im in zip(questions, images)]

    def generate(self, questions: Sequence[str], images: Sequence, max_new_tokens: int = 64) -> list[str]:
        """Greedy answers, one per (question, image); vLLM schedules the whole list with its paged KV cache."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outs = self.llm.generate(self.requests(questions, images), params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]


def load_vllm(model_path: str | os.PathLike | None, adapter: str | os.PathLike | None = None, dtype: str = "auto",
              **engine_kwargs) -> VllmGenerator:
    """A merged LLaVA folder served by vLLM; refuses (EngineUnavailable / InferenceInputError) before loading
    weights when vLLM cannot run, an adapter is given, or the folder has no config or chat template."""
    require_vllm()
    if adapter is not None:
        raise InferenceInputError(f"--engine vllm serves a merged model; merge the adapter {adapter} first "
                                  "(address-llava merge)")
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        raise InferenceInputError(f"--engine vllm needs a merged model folder with config.json, got {model_path}")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_path))
    if not getattr(processor, "chat_template", None):
        raise InferenceInputError(f"{model_path}: the processor has no chat template; re-save the model with "
                                  "`address-llava merge` (which stores the training prompt as one)")
    from vllm import LLM

    kwargs = {"dtype": dtype, "limit_mm_per_prompt": {"image": 1}, "seed": 0, **engine_kwargs}
    return VllmGenerator(LLM(model=str(model_path), **kwargs), processor, engine_kwargs=kwargs)


def vllm_answer_batch(gen: VllmGenerator, max_new_tokens: int = 64):
    """`run_answers`' answer_batch for the vLLM engine."""
    def answer_batch(questions: list[str], images: list) -> list[str]:
        return gen.generate(questions, images, max_new_tokens)

    return answer_batch
