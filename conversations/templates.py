"""Question and answer phrasings for every turn type: a registry keyed by exact type name.

Each question type has at least 15 training question phrasings, a disjoint set of held-out phrasings
used only for the evaluation split (to test whether the model generalises beyond the wording it was
trained on), and several answer phrasings. Every answer names an address (there is no refusal style),
except the `scene` type: plain scene descriptions that name no place at all, which is what a general
(not address-tuned) base model is trained on.

Placeholders: questions may use `{candidate}` (yes/no) and `{choices}` (multiple choice); answers use
`{full}` (address in the configured style), `{street}`, `{segment}` (street between / near its cross
streets), `{between}` ("between A and B" / "near A"), `{neighbourhood}`, `{city}`, `{place}`
("neighbourhood, city"), `{candidate}`, `{letter}`, `{choice}`, `{caption}`. An answer phrasing is only
used when all its placeholders have non-empty values, so a record without a neighbourhood never gets
"in , Helsinki".

Used by `conversations.build` (rendering) and `conversations.stats` (recognising the type of a question
in a file that carries no `turn_types`). Run `python -m conversations.templates` to print the registry.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass

from clip_stage.core.registry import Registry
from conversations.candidates import split_candidates
from conversations.records import IMAGE_TOKEN

MIN_QUESTIONS = 15
# Answers must name an address through one of these placeholders.
ADDRESS_FIELDS = frozenset({"full", "street", "segment", "place", "neighbourhood", "choice"})
QUESTION_FIELDS = frozenset({"candidate", "choices"})
ANSWER_FIELDS = frozenset({"full", "street", "segment", "between", "neighbourhood", "city", "place",
                           "candidate", "letter", "choice", "caption", "caption_lower"})
REFUSAL_WORDS = ("cannot", "can't", "unable", "sorry", "impossible", "not possible", "no way to")


@functools.lru_cache(maxsize=4096)
def placeholders(template: str) -> frozenset[str]:
    return frozenset({name for _, name, _, _ in string.Formatter().parse(template) if name})


def _normalise(template: str) -> str:
    """Lower-cased wording with placeholders and punctuation folded, to compare phrasings."""
    text = re.sub(r"\{[a-z_]+\}", "{}", template.lower())
    return re.sub(r"[^a-z0-9{} ]+", "", re.sub(r"\s+", " ", text)).strip()


def template_regex(template: str) -> re.Pattern:
    """A regex matching any rendering of `template` (placeholders match any non-empty text)."""
    parts, pattern = string.Formatter().parse(template), ""
    for literal, name, _, _ in parts:
        pattern += re.escape(literal)
        if name:
            pattern += "(.+?)"
    return re.compile(pattern + r"\Z", re.DOTALL)


@dataclass(frozen=True)
class QuestionType:
    name: str
    description: str
    questions: tuple[str, ...]
    """training phrasings"""
    held_out: tuple[str, ...]
    """evaluation-only phrasings, disjoint from `questions`"""
    answers: tuple[str, ...] = ()
    """answer phrasings (yes/no uses `answers_yes` / `answers_no` instead)"""
    answers_yes: tuple[str, ...] = ()
    answers_no: tuple[str, ...] = ()
    names_address: bool = True
    """False only for plain scene descriptions: their answers must then name NO address field"""

    def __post_init__(self):
        where = f"question type {self.name!r}"
        if len(self.questions) < MIN_QUESTIONS:
            raise ValueError(f"{where}: {len(self.questions)} training phrasings, need at least {MIN_QUESTIONS}")
        if not self.held_out:
            raise ValueError(f"{where}: no held-out phrasings")
        train_norm = {_normalise(q) for q in self.questions}
        if len(train_norm) != len(self.questions):
            raise ValueError(f"{where}: duplicate training phrasings")
        overlap = train_norm & {_normalise(q) for q in self.held_out}
        if overlap:
            raise ValueError(f"{where}: held-out phrasings also used for training: {sorted(overlap)}")
        for q in self.questions + self.held_out:
            bad = placeholders(q) - QUESTION_FIELDS
            if bad or IMAGE_TOKEN in q:
                raise ValueError(f"{where}: question {q!r} uses unknown placeholders {sorted(bad)} or {IMAGE_TOKEN}")
        answer_sets = [self.answers] if self.answers else [self.answers_yes, self.answers_no]
        for answers in answer_sets:
            if len(answers) < 3:
                raise ValueError(f"{where}: needs at least 3 answer phrasings per answer kind")
            for a in answers:
                names = placeholders(a)
                if names - ANSWER_FIELDS:
                    raise ValueError(f"{where}: answer {a!r} uses unknown placeholders {sorted(names - ANSWER_FIELDS)}")
                if self.names_address and not names & ADDRESS_FIELDS:
                    raise ValueError(f"{where}: answer {a!r} names no address (needs one of {sorted(ADDRESS_FIELDS)})")
                if not self.names_address and names & (ADDRESS_FIELDS | {"street", "city", "between", "candidate"}):
                    raise ValueError(f"{where}: answer {a!r} names an address, but this type must not")
                if any(w in a.lower() for w in REFUSAL_WORDS):
                    raise ValueError(f"{where}: answer {a!r} reads as a refusal")
        if not self.answers and not all(a.startswith("Yes") for a in self.answers_yes):
            raise ValueError(f"{where}: yes answers must start with 'Yes'")
        if not self.answers and not all(a.startswith("No") for a in self.answers_no):
            raise ValueError(f"{where}: no answers must start with 'No'")


QUESTION_TYPES: Registry[QuestionType] = Registry("question type")
get_question_type = QUESTION_TYPES.lookup


def register_question_type(qt: QuestionType) -> None:
    QUESTION_TYPES.register(qt.name, qt)


def fill(template: str, values: dict[str, str]) -> str:
    return template.format(**{k: values.get(k, "") for k in placeholders(template)})


def usable(templates: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """The phrasings whose placeholders all have non-empty values."""
    return [t for t in templates if all(values.get(k) for k in placeholders(t))]


_MATCHERS: list[tuple[re.Pattern, str, bool]] | None = None


def classify_question(text: str) -> tuple[str, bool] | None:
    """(question type, is held-out) of a rendered question (without `<image>`), or None if unknown."""
    global _MATCHERS  # a cache of compiled patterns, filled once; not configuration
    if _MATCHERS is None:
        _MATCHERS = [(template_regex(q), qt.name, held)
                     for qt in QUESTION_TYPES.values()
                     for held, qs in ((False, qt.questions), (True, qt.held_out)) for q in qs]

    text = split_candidates(text.replace(IMAGE_TOKEN, "").strip())[1]
    for pattern, name, held in _MATCHERS:
        if pattern.match(text):
            return name, held
    return None


register_question_type(QuestionType(
    name="full_address",
    description="the full street-level address",
    questions=(
        "Where was this photo taken?",
        "What is the address of this place?",
        "Where is this?",
        "Which address is shown in this image?",
        "Can you tell me where this picture was taken?",
        "What is the street address of this location?",
        "Where was this picture taken? Give the address.",
        "Tell me the address of the place in this photo.",
        "What address does this street view correspond to?",
        "Identify the location of this photo as a street address.",
        "Where exactly is this street scene?",
        "What is the location of this image?",
        "Give the street address where this photo was captured.",
        "Where in the city was this taken?",
        "Please provide the address for this image.",
        "What location is shown here?",
        "At which address was this image taken?",
    ),
    held_out=(
        "Could you pin down the street address of this picture?",
        "Name the spot shown here as a postal-style address.",
        "If you had to mail a letter to this place, what address would you write?",
        "Work out the precise address visible in this shot.",
        "What's the whereabouts of this scene, in address form?",
        "Determine this photograph's street location.",
    ),
    answers=(
        "This photo was taken on {full}.",
        "{full}.",
        "The address is {full}.",
        "It was taken at {full}.",
        "This is {full}.",
        "This location is {full}.",
    ),
))

register_question_type(QuestionType(
    name="street",
    description="the main street only",
    questions=(
        "Which street is this?",
        "What street was this photo taken on?",
        "Name the street in this image.",
        "What is the name of this street?",
        "On which street is this?",
        "Which street does this picture show?",
        "What street is shown here?",
        "Tell me the street name.",
        "Which road is this?",
        "What street am I looking at?",
        "Can you name the street in this photo?",
        "What is this street called?",
        "Which street was this image taken on?",
        "Identify the street in this photo.",
        "What's the name of the street in the picture?",
        "On what street was this photo captured?",
    ),
    held_out=(
        "Whose street sign would you expect to read here?",
        "Give just the road name for this view.",
        "The camera stood on which thoroughfare?",
        "Only the street, please: where is this?",
        "Say which named road this scene belongs to.",
    ),
    answers=(
        "This is {street}.",
        "The street is {street}.",
        "{street}.",
        "It was taken on {street}.",
        "This photo shows {street}, in {place}.",
        "The photo was taken on {street}.",
    ),
))

register_question_type(QuestionType(
    name="cross_streets",
    description="the cross streets bounding the sub-street",
    questions=(
        "Between which streets was this photo taken?",
        "What are the nearest cross streets?",
        "Which cross streets are near this location?",
        "Between which cross streets is this?",
        "Which intersections is this stretch of street between?",
        "What streets cross this one nearby?",
        "Name the cross streets closest to this spot.",
        "Which part of the street is this, between which intersections?",
        "What are the cross streets here?",
        "Which block of the street is this?",
        "Between which two streets is this section?",
        "Which cross streets bound this block?",
        "Tell me the nearest intersecting streets.",
        "Where on the street is this, in terms of cross streets?",
        "Which stretch of the street was this taken on?",
        "What cross street is this near?",
    ),
    held_out=(
        "Narrow it down: this block runs from which corner to which corner?",
        "Locate this frame by its neighbouring junctions.",
        "Which corners enclose the segment in view?",
        "By the intersections around it, where is this view?",
        "State the junctions flanking this piece of road.",
    ),
    answers=(
        "This is {segment}.",
        "It was taken on {segment}.",
        "This stretch of {street} lies {between}.",
        "The photo shows {street}, {between}.",
        "It is on {segment}, in {place}.",
    ),
))

register_question_type(QuestionType(
    name="place",
    description="the neighbourhood and city",
    questions=(
        "Which neighbourhood is this?",
        "In which neighbourhood and city was this photo taken?",
        "What part of the city is this?",
        "Which district is this in?",
        "What neighbourhood does this photo show?",
        "Which city and neighbourhood is this?",
        "In what area of the city was this taken?",
        "Name the neighbourhood in this picture.",
        "Which part of town is shown here?",
        "What district was this photo taken in?",
        "Where in the city is this neighbourhood?",
        "Which area is this street in?",
        "Tell me the neighbourhood and city of this image.",
        "What neighbourhood is this street view from?",
        "Which city district does this image belong to?",
        "In which part of the city is this scene?",
    ),
    held_out=(
        "Roughly speaking, which quarter of town are we in?",
        "Forget the street: what locality hosts this view?",
        "If a local described this area, what would they call it?",
        "Place this scene within its municipality and borough.",
        "Give the wider area this snapshot belongs to.",
    ),
    answers=(
        "This is {place}.",
        "It was taken in {place}.",
        "This photo is from {neighbourhood}, {city}, on {street}.",
        "The neighbourhood is {neighbourhood}, in {city}.",
        "{place}.",
        "This is {street} in {place}.",
    ),
))

register_question_type(QuestionType(
    name="yes_no",
    description="verify a proposed street or sub-street (hard negatives from nearby and sibling streets)",
    questions=(
        "Is this {candidate}?",
        "Was this photo taken on {candidate}?",
        "Is this picture from {candidate}?",
        "Could this be {candidate}?",
        "Does this image show {candidate}?",
        "Is this location {candidate}?",
        "Was this taken at {candidate}?",
        "Am I looking at {candidate}?",
        "Is the address of this photo {candidate}?",
        "Is this street view from {candidate}?",
        "Does this photo come from {candidate}?",
        "Is this place {candidate}? Answer yes or no.",
        "Was this image captured on {candidate}?",
        "Is this scene located on {candidate}?",
        "Would you say this is {candidate}?",
        "Yes or no: is this {candidate}?",
    ),
    held_out=(
        "Someone claims this is {candidate}. Are they right?",
        "True or false, this shot was made on {candidate}?",
        "My friend says we're on {candidate}. Correct?",
        "Confirm or deny that the camera was on {candidate}.",
        "Check this guess for me: {candidate}?",
    ),
    answers_yes=(
        "Yes, this is {candidate}. The full address is {full}.",
        "Yes. The photo was taken on {full}.",
        "Yes, it is: {full}.",
        "Yes, this is {full}.",
    ),
    answers_no=(
        "No, this is not {candidate}. It was taken on {full}.",
        "No. This photo is from {full}.",
        "No, the correct address is {full}.",
        "No, this is {full}, not {candidate}.",
    ),
))

register_question_type(QuestionType(
    name="multiple_choice",
    description="pick the right address among nearby candidates (letters)",
    questions=(
        "Which of these addresses is where this photo was taken?\n{choices}",
        "Where was this photo taken?\n{choices}\nAnswer with the letter of the correct option.",
        "Choose the correct address for this image.\n{choices}",
        "Which address matches this street view?\n{choices}",
        "Select the location of this photo from the options below.\n{choices}",
        "{choices}\nWhich of the addresses above is shown in the image?",
        "Pick the address of this place.\n{choices}",
        "Which option gives the address of this photo?\n{choices}",
        "Here are some candidate addresses:\n{choices}\nWhich one is correct?",
        "Where is this? Choose one.\n{choices}",
        "Which of the following is the location of this picture?\n{choices}",
        "Select the right address.\n{choices}\nReply with the option letter.",
        "From the choices below, where was this taken?\n{choices}",
        "Which candidate address corresponds to this image?\n{choices}",
        "Identify the address of this scene.\n{choices}",
        "This photo was taken at one of these addresses:\n{choices}\nWhich one?",
    ),
    held_out=(
        "Only one of these fits the view. Tell me its letter.\n{choices}",
        "Quiz time! Guess the spot:\n{choices}",
        "Among the listed options, which is the genuine location?\n{choices}",
        "{choices}\nOne of the above is the real place. Which?",
        "Rank not needed, just name the matching entry:\n{choices}",
    ),
    answers=(
        "{letter}. {choice}",
        "The answer is {letter}: {choice}.",
        "{letter}: {choice}",
        "{letter}. This photo was taken on {choice}.",
    ),
))

register_question_type(QuestionType(
    name="caption",
    description="describe the scene (from the caption) and give its address",
    questions=(
        "Describe this scene and tell me where it is.",
        "What can you see in this photo, and where was it taken?",
        "Describe the image and give its address.",
        "What does this street look like, and where is it?",
        "Give a short description of this photo and its location.",
        "Describe what is shown here and name the address.",
        "Tell me about this picture, including where it was taken.",
        "What is in this image, and what is the address?",
        "Describe this street view.",
        "Can you describe this place and say where it is?",
        "Briefly describe the scene and its location.",
        "Describe the photo, then give the street address.",
        "What do you see here, and where is it?",
        "Summarise this image and tell me the address.",
        "Describe the surroundings in this picture and locate them.",
        "Write a caption for this photo that includes its address.",
    ),
    held_out=(
        "Paint me a picture in words of this view, and place it on the map.",
        "Narrate what the camera captured and where it stood.",
        "Explain the contents of this frame along with its street location.",
        "Sketch out this setting verbally, address included.",
        "Walk me through the scene and finish with where it is.",
    ),
    answers=(
        "{caption} It was taken on {full}.",
        "{caption} The address is {full}.",
        "This photo was taken on {full}. {caption}",
        "{caption} This is {full}.",
    ),
))

register_question_type(QuestionType(
    name="scene",
    description="describe the scene only (from the caption); names no address: the general base model's data",
    names_address=False,
    questions=(
        "Describe this scene.",
        "What can you see in this photo?",
        "Describe the image.",
        "What does this street look like?",
        "Give a short description of this photo.",
        "Describe what is shown here.",
        "Tell me about this picture.",
        "What is in this image?",
        "Describe this street view.",
        "Can you describe this place?",
        "Briefly describe the scene.",
        "Describe the photo in one sentence.",
        "What do you see here?",
        "Summarise this image.",
        "Write a caption for this photo.",
    ),
    held_out=(
        "Paint me a picture in words of this view.",
        "Narrate what the camera captured.",
        "Explain the contents of this frame.",
    ),
    answers=(
        "{caption}",
        "This photo shows {caption_lower}",
        "In this picture: {caption_lower}",
    ),
))


def describe() -> str:
    lines = []
    for qt in QUESTION_TYPES.values():
        n_ans = len(qt.answers) or f"{len(qt.answers_yes)} yes / {len(qt.answers_no)} no"
        lines.append(f"{qt.name:<16} {len(qt.questions):>3} questions, {len(qt.held_out)} held out, "
                     f"{n_ans} answers  ({qt.description})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
