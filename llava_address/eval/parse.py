"""Answer parsing for the closed question types: the yes/no verdict and the multiple-choice letter of a
free-text answer (addresses are parsed by `llava_address.eval.gazetteer`). Used by `llava_address.eval.scoring`.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from rapidfuzz import fuzz

from conversations.records import IMAGE_TOKEN
from llava_address.eval.gazetteer import Gazetteer, tokens

_YES = {"yes", "yeah", "yep", "correct", "right", "true", "indeed", "affirmative", "kylla", "ja"}
_NO = {"no", "nope", "not", "incorrect", "wrong", "false", "isnt", "wasnt", "ei", "nej", "negative"}


def parse_yes_no(answer: str) -> bool | None:
    """True / False from the first yes- or no-word of the answer; None if it has neither."""
    for w in tokens(answer.replace("n't", " not")):
        if w in _YES:
            return True
        if w in _NO:
            return False
    return None


# A question asks for a verdict when it opens with an auxiliary verb ("Is this X?", "Could this be X?") or
# says so ("Yes or no: ...", "... Correct?", "Confirm or deny ..."); wh-questions ("What is near X?") and
# polite requests ("Can you name the street?") do not.
_AUXILIARIES = {"is", "was", "are", "were", "am", "does", "do", "did", "could", "can", "would", "will", "should",
                "has", "have", "might", "may", "must", "isnt", "wasnt", "arent", "doesnt", "didnt"}
_WH_WORDS = {"what", "whats", "where", "which", "who", "whose", "when", "why", "how"}
_REQUEST_VERBS = {"tell", "name", "give", "describe", "pin", "identify", "list", "show", "find", "locate", "provide",
                  "explain", "work", "determine", "help"}
_VERDICT_SAID = re.compile(r"\b(yes or no|true or false|confirm or deny|right or wrong)\b", re.I)
_VERDICT_HINTED = re.compile(r"\b(guess|claims?)\b|\b(correct|right|true)\?", re.I)


def asks_yes_no(question: str) -> bool:
    """Whether a question asks for a yes/no verdict (its last line, so a prompt's candidate block is skipped)."""
    lines = [ln for ln in question.replace(IMAGE_TOKEN, " ").splitlines() if ln.strip()]
    if not lines:
        return False
    last = lines[-1]
    if _VERDICT_SAID.search(last):
        return True
    words = tokens(last.replace("n't", "nt"))
    if not words or words[0] in _WH_WORDS:
        return False
    if words[0] in _AUXILIARIES:
        return not (len(words) > 2 and words[1] == "you" and words[2] in _REQUEST_VERBS)
    return bool(_VERDICT_HINTED.search(last))


_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Ha-h])\)?\s*(?:[.):,]|$|\s)"),
    re.compile(r"(?:option|answer|choice|letter)\s*(?:is\s*)?[:\-]?\s*\(?([A-Ha-h])\)?(?![A-Za-z])", re.I),
    re.compile(r"\(([A-H])\)"),
    re.compile(r"(?<![A-Za-z])([B-H])(?![A-Za-z'])"),
]


def parse_mc(answer: str, options: Sequence[str] = (), gazetteer: Gazetteer | None = None) -> str | None:
    """The chosen letter ('A'...), from an explicit letter or, failing that, from the option the text names."""
    valid = {chr(ord("A") + i) for i in range(len(options))} if options else set("ABCDEFGH")
    for pat in _LETTER_PATTERNS:
        m = pat.search(answer)
        if m and m.group(1).upper() in valid:
            if pat is _LETTER_PATTERNS[0] and m.group(1) in "Aa" and re.match(r"^\s*a\s+\w", answer, re.I) \
                    and not re.match(r"^\s*\(?A\)", answer):
                continue  # the article "A street ...", not option A
            return m.group(1).upper()
    if options and gazetteer is not None:
        parsed = gazetteer.parse(answer)
        if parsed.sub_street:
            hits = [i for i, o in enumerate(options) if gazetteer.parse(o).sub_street == parsed.sub_street]
            if len(hits) == 1:
                return chr(ord("A") + hits[0])
    if options:
        scores = [fuzz.token_set_ratio(" ".join(tokens(answer)), " ".join(tokens(o))) for o in options]
        best = int(np.argmax(scores))
        if scores[best] >= 90 and sorted(scores)[-2:][0] < scores[best]:
            return chr(ord("A") + best)
    return None
