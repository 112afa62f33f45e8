"""The user errors of evaluation (infer, benchmark, chat, the engines): a bad image, model folder or eval file.

Their own module so that every engine (llava_address.eval.infer's HF engine, llava_address.eval.vllm_engine)
raises the same classes without importing one another.
"""

from __future__ import annotations


class InferenceInputError(ValueError):
    """A missing or unreadable image, a model folder that cannot be loaded, a malformed evaluation file."""


class PromptTooLongError(InferenceInputError):
    """A prompt that does not fit the model's context with room for the answer."""
