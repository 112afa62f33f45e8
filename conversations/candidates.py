"""The one format of AddressCLIP candidates in a LLaVA prompt, used the same way at training and inference.

The candidates go into the first user turn, after `<image>` and before the question:

    <image>
    Candidate addresses (AddressCLIP top-5):
    1. Mannerheimintie between Arkadiankatu and Simonkatu, Kamppi, Helsinki
    2. Mannerheimintie between Simonkatu and Kaivokatu, Kamppi, Helsinki
    ...
    Where was this photo taken?

With scores, each line ends with the retrieval probability: `1. ... (p=0.42)`. The conversation builder writes
this block from cross-fitted candidates (`clip_stage.candidates`); `infer`, `chat`, `benchmark`, `web-demo` and
`answer()` write it from the live AddressCLIP ranking; both call `candidate_block` and `with_candidates`.

When the true address is not among the candidates, training answers to address questions open with
`NONE_FITS` and then name the right address, so the model learns to say so instead of copying a candidate.
"""

from __future__ import annotations

import re
from typing import Sequence

from conversations.records import IMAGE_TOKEN

HEADER = "Candidate addresses (AddressCLIP top-{k}):"
NONE_FITS = "None of the candidates fits."
_HEADER_RE = re.compile(r"^Candidate addresses \(AddressCLIP top-\d+\):$")


def candidate_block(candidates: Sequence[dict | str], scores: bool = False) -> str:
    """The candidate lines (see the module docstring); `candidates` are dicts with 'address' (and 'probability')."""
    items = [c if isinstance(c, dict) else {"address": c} for c in candidates]
    if not items:
        return ""
    lines = [HEADER.format(k=len(items))]
    for i, c in enumerate(items, 1):
        text = " ".join(str(c["address"]).split())
        if scores and c.get("probability") is not None:
            text += f" (p={float(c['probability']):.2f})"
        lines.append(f"{i}. {text}")
    return "\n".join(lines)


def with_candidates(question: str, candidates: Sequence[dict | str], scores: bool = False) -> str:
    """`question` (without `<image>`) preceded by its candidate block."""
    block = candidate_block(candidates, scores)
    question = question.strip()
    return f"{block}\n{question}" if block else question


def split_candidates(text: str) -> tuple[list[str], str]:
    """(candidate addresses, the rest) of a user turn written by `with_candidates` (no block: ([], text))."""
    lines = text.replace(IMAGE_TOKEN, "").strip().splitlines()
    if not lines or not _HEADER_RE.match(lines[0].strip()):
        return [], text
    cands, i = [], 1
    while i < len(lines) and re.match(r"^\d+\. ", lines[i]):
        cands.append(re.sub(r" \(p=[0-9.]+\)$", "", lines[i].split(". ", 1)[1]))
        i += 1
    return cands, "\n".join(lines[i:]).strip()


__all__ = ["HEADER", "NONE_FITS", "candidate_block", "with_candidates", "split_candidates"]
