"""The phrasing registry: enough phrasings, held-out ones disjoint, answers always name an address."""

import pytest

from conversations import templates
from conversations.templates import QUESTION_TYPES, QuestionType, classify_question, fill, get_question_type

SAMPLE = {"candidate": "Esplanadi", "choices": "A. Esplanadi, Kluuvi\nB. Bulevardi, Kamppi"}
EXPECTED_TYPES = {"full_address", "street", "cross_streets", "place", "yes_no", "multiple_choice", "caption"}


def test_every_turn_type_of_the_issue_is_registered():
    assert EXPECTED_TYPES <= set(QUESTION_TYPES)


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPES))
def test_phrasing_counts_and_disjoint_held_out(name):
    qt = QUESTION_TYPES[name]
    assert len(qt.questions) >= 15
    assert qt.held_out and not set(qt.questions) & set(qt.held_out)
    answers = qt.answers or (qt.answers_yes + qt.answers_no)
    assert len(answers) >= 3


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPES))
def test_questions_classify_back_to_their_type(name):
    qt = QUESTION_TYPES[name]
    for q in qt.questions:
        assert classify_question(fill(q, SAMPLE)) == (name, False), q
    for q in qt.held_out:
        assert classify_question("<image>\n" + fill(q, SAMPLE)) == (name, True), q


def test_unknown_question_is_not_classified():
    assert classify_question("What colour is the bus?") is None


def _qt(**kw):
    base = dict(name="x", description="d", questions=tuple(f"Question number {i}?" for i in range(15)),
                held_out=("Something else entirely?",), answers=("It is {full}.", "{full}.", "This is {street}."))
    base.update(kw)
    return QuestionType(**base)


def test_question_type_checks():
    _qt()  # the base is valid
    with pytest.raises(ValueError, match="at least 15"):
        _qt(questions=("Where?",) * 3)
    with pytest.raises(ValueError, match="held-out phrasings also used"):
        _qt(held_out=("question NUMBER 3?",))
    with pytest.raises(ValueError, match="names no address"):
        _qt(answers=("It is {full}.", "{full}.", "Somewhere nice."))
    with pytest.raises(ValueError, match="refusal"):
        _qt(answers=("It is {full}.", "{full}.", "I cannot tell, maybe {street}."))
    with pytest.raises(ValueError, match="unknown placeholders"):
        _qt(answers=("It is {full}.", "{full}.", "{street} {bogus}"))
    with pytest.raises(ValueError, match="duplicate"):
        _qt(questions=("Same?",) * 15)


def test_registry_refuses_duplicates_and_names_valid_types():
    with pytest.raises(ValueError, match="already registered"):
        templates.register_question_type(QUESTION_TYPES["street"])
    with pytest.raises(KeyError, match=r"unknown question type 'streets'; valid: \["):
        get_question_type("streets")
