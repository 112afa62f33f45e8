"""The `scene` turn type: plain scene descriptions that name no place, the honest base model's training data."""

from __future__ import annotations

import json

import pytest

from clip_stage.gallery import city_addresses
from conversations.templates import QuestionType, get_question_type


def test_a_base_training_file_names_no_street_or_neighbourhood_of_the_gazetteer(toy_dataset, tmp_path):
    from conversations.build import main

    out = tmp_path / "scene"
    assert main(["--dataset", str(toy_dataset), "--out", str(out), "--type-weights", "scene=1",
                 "--min-turns", "1", "--max-turns", "1"]) == 0
    records = json.loads((out / "train.json").read_text())
    assert records and all(r["turn_types"] == ["scene"] for r in records)
    names = set()
    for a in city_addresses(toy_dataset).values():
        names.update({a.street, a.neighbourhood, a.city, *a.cross_streets})
    names.discard("")
    assert names
    for r in records:
        text = " ".join(t["value"] for t in r["conversations"]).lower()
        found = [n for n in names if n.lower() in text]
        assert not found, f"{r['id']}: names {found}"
    # while the address-carrying `caption` type of the same data does name them (the check can fail)
    out2 = tmp_path / "caption"
    assert main(["--dataset", str(toy_dataset), "--out", str(out2), "--type-weights", "caption=1",
                 "--min-turns", "1", "--max-turns", "1"]) == 0
    text = json.loads((out2 / "train.json").read_text())[0]["conversations"][1]["value"].lower()
    assert any(n.lower() in text for n in names)


def test_scene_answers_may_not_name_an_address():
    scene = get_question_type("scene")
    assert not scene.names_address
    with pytest.raises(ValueError, match="names an address"):
        QuestionType(name="x", description="", questions=scene.questions, held_out=scene.held_out,
                     answers=("{caption} on {street}", "{caption}", "{caption}!"), names_address=False)
