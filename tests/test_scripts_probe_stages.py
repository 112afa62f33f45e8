"""scripts/probe_stages.py: the per-stage probes read the right questions and run on a finished demo's layout."""

from __future__ import annotations

import json

from conversations.candidates import with_candidates
from tests.script_loader import load_script


def test_yes_no_questions_come_with_their_verdicts_and_without_candidate_blocks(toy_conversations, tmp_path):
    probe = load_script("probe_stages")
    train = json.loads((toy_conversations / "train.json").read_text())
    # One training conversation asked with candidates: the probe asks its question plainly.
    record = next(r for r in train if any(t["value"].startswith(("Yes", "No,", "No.")) for t in r["conversations"]))
    turn = next(i for i, t in enumerate(record["conversations"]) if t["value"].startswith(("Yes", "No,", "No.")))
    plain_question = record["conversations"][turn - 1]["value"].replace("<image>", "").strip()
    record["conversations"][turn - 1]["value"] = with_candidates(plain_question, ["Bulevardi, Kamppi, Helsinki"])
    (tmp_path / "train.json").write_text(json.dumps(train))

    questions = probe.yes_no_questions(tmp_path / "train.json", eval_file=False)
    expected = sum(t["value"].split(maxsplit=1)[0].strip(".,") in ("Yes", "No")
                   for r in train for t in r["conversations"] if t["from"] == "gpt")
    assert len(questions) == expected > 0
    assert {yes for _, _, yes in questions} == {True, False}
    assert not [q for _, q, _ in questions if "Candidate addresses" in q]
    assert (str(record["image"]), plain_question, record["conversations"][turn]["value"].startswith("Yes")) in questions

    evaluation = json.loads((toy_conversations / "eval.json").read_text())
    asked = probe.yes_no_questions(toy_conversations / "eval.json", eval_file=True)
    yes_no = [r for r in evaluation if r["reference"]["question_type"] == "yes_no"]
    assert [yes for _, _, yes in asked] == [r["reference"]["expected_answer"] == "yes" for r in yes_no]


def test_probe_stages_runs_on_a_demo_folder_and_reports_every_stage(toy_dataset, toy_conversations, tiny_llava_dir,
                                                                    tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "dataset").symlink_to(toy_dataset)
    (demo / "conversations").symlink_to(toy_conversations)
    out = tmp_path / "probe.json"
    assert load_script("probe_stages").main(["--demo", str(demo), "--model", str(tiny_llava_dir), "--limit", "24",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"tower CLS (last layer)", "projector output (mean)", "LLM last hidden (prompt end)", "yes_no"} <= set(result)
    assert result["yes_no"]["train_questions"] == 24
    for stage, accs in result.items():
        values = accs.values() if stage != "yes_no" else [accs["LLM last hidden (yes/no prompt end)"]]
        assert all(0.0 <= v <= 1.0 for v in values)
    assert load_script("probe_stages").main(["--demo", str(tmp_path / "nothing")]) == 2
