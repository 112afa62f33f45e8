"""Model cards and Hub pushes of `merge` and `export-clip`: the card's front matter and numbers, the merged
processor's chat template, and the push path against an injected stand-in for huggingface_hub's HfApi."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clip_stage.core.model_card import CardError, ModelCard, push_folder, read_metrics, render_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeHub:
    """Records create_repo / upload_folder and copies the uploaded folder into `remote` (a local stand-in)."""

    def __init__(self, remote: Path):
        self.remote, self.calls = remote, []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id, repo_type, commit_message))
        shutil.copytree(folder_path, self.remote / repo_id, dirs_exist_ok=True)
        return type("CommitInfo", (), {"commit_url": f"https://hub.local/{repo_id}/commit/1"})()


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: hub)
    return hub


def _benchmark_json(path: Path) -> Path:
    """benchmark.json in `address-llava benchmark`'s shape: systems with a report, one failed."""
    report = {"metrics": {"street_acc": {"value": 0.75, "correct": 3, "total": 4},
                          "cross_acc": {"value": 0.5, "correct": 2, "total": 4}},
              "distance": {"median_m": 42.0, "n": 4}}
    path.write_text(json.dumps({"ours": {"kind": "llava", "report": report},
                                "broken": {"kind": "hf", "error": "no weights"}}))
    return path


def test_card_front_matter_and_metrics(tmp_path):
    from huggingface_hub import ModelCard as HubCard

    card = ModelCard(title="m", summary="S.", pipeline_tag="image-text-to-text", base_model="llava-hf/llava-1.5-7b-hf",
                     tags=("llava",), details={"data": "a|b"}, metrics=read_metrics(_benchmark_json(tmp_path / "b.json")),
                     metrics_source="b.json")
    (tmp_path / "README.md").write_text(render_card(card))
    loaded = HubCard.load(tmp_path / "README.md")
    assert loaded.data.license == "apache-2.0" and loaded.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert loaded.data.pipeline_tag == "image-text-to-text" and loaded.data.tags == ["llava"]
    assert "| ours | 75.0% | 50.0% | 42.0 | - |" in loaded.text and "| broken | - | - | - | failed |" in loaded.text
    assert "a\\|b" in loaded.text  # a table cell cannot break the table
    odd = ModelCard(title="m", summary="S.", pipeline_tag="image-text-to-text", base_model=str(tmp_path),
                    metrics={"ev|<b>": {"a|b": 0.5}})
    text = render_card(odd)
    assert "base_model" not in text.split("---")[1]  # a local folder is no Hub base_model
    assert "| ev\\|<b> |" in text and "| a\\|b |" in text
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(CardError, match="bad.json"):
        read_metrics(tmp_path / "bad.json")
    with pytest.raises(CardError, match="namespace/name"):
        push_folder(tmp_path, "no-namespace", api=FakeHub(tmp_path))


def test_merge_writes_card_chat_template_and_pushes(tiny_llava_dir, tmp_path, fake_hub):
    from transformers import AutoProcessor

    from llava_address.config import ModelArgs, TrainablesArgs
    from llava_address.merge import main
    from llava_address.prompting import chat_template, encode_conversation, special_boundary
    from tests.test_llava_merge import _trained_checkpoint

    margs = ModelArgs(model_name_or_path=str(tiny_llava_dir))
    _trained_checkpoint(tmp_path / "ck", margs, TrainablesArgs(lora_r=4, lora_alpha=8))
    bench = _benchmark_json(tmp_path / "benchmark.json")
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(out), "--benchmark", str(bench),
                 "--push-to-hub", "me/address-llava", "--hub-private"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card
    # a local base is named in the Training table, never as the Hub's base_model (the upload would be refused)
    assert "base_model:" not in card and f"| base model | {tiny_llava_dir} |" in card
    assert "75.0%" in card and "vicuna_v1" in card
    # the merged processor prompts as training did (a checkpoint saved without a template gets it here)
    processor = AutoProcessor.from_pretrained(str(out))
    assert processor.chat_template == chat_template("vicuna_v1", special_boundary(processor.tokenizer))
    conv = [{"role": "user", "content": "<image>\nWhere was this photo taken?"}, {"role": "assistant", "content": "Main Street."},
            {"role": "user", "content": "Which neighbourhood is this?"}]
    ids = processor.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    assert list(ids) == encode_conversation(conv, processor.tokenizer, 1).input_ids
    # the card's usage snippet: the rendered prompt tokenised without special tokens starts with one BOS, not two
    assert "add_special_tokens=False" in card
    prompt = processor.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=False)
    snippet_ids = processor.tokenizer(prompt, add_special_tokens=False).input_ids
    bos = processor.tokenizer.bos_token_id
    assert snippet_ids[0] == bos and snippet_ids[1] != bos
    # pushed: the repo was created private and the whole finished folder uploaded
    assert fake_hub.calls[0] == ("create_repo", "me/address-llava", "model", True, True)
    assert fake_hub.calls[1][:3] == ("upload_folder", "me/address-llava", "model")
    remote = fake_hub.remote / "me" / "address-llava"
    assert {"README.md", "model.safetensors", "config.json"} <= {p.name for p in remote.iterdir()}
    assert (remote / "chat_template.jinja").is_file() or "chat_template" in (remote / "processor_config.json").read_text()


def test_merge_refuses_a_bad_benchmark_before_writing(tiny_llava_dir, tmp_path, capsys):
    from llava_address.config import ModelArgs, TrainablesArgs
    from llava_address.merge import main
    from tests.test_llava_merge import _trained_checkpoint

    _trained_checkpoint(tmp_path / "ck", ModelArgs(model_name_or_path=str(tiny_llava_dir)), TrainablesArgs(lora_r=4, lora_alpha=8))
    (tmp_path / "b.json").write_text("{not json")
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "m"), "--benchmark", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge: ") and "b.json" in err and "\n" not in err and not (tmp_path / "m").exists()


def test_export_clip_writes_card_and_pushes(tmp_path, fake_hub):
    from huggingface_hub import ModelCard as HubCard

    from clip_stage.export_hf import main
    from clip_stage.model import create_clip, save_checkpoint

    torch.manual_seed(1)
    bundle = create_clip("addressclip-tiny")
    save_checkpoint(tmp_path / "run" / "final", bundle.model, "addressclip-tiny", None, train_config={"seed": 1})
    (tmp_path / "metrics.json").write_text(json.dumps({"ssa_top1": 0.25, "sa_top1": 0.5, "model": "x"}))
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--no-verify",
                 "--benchmark", str(tmp_path / "metrics.json"), "--push-to-hub", "me/addressclip"]) == 0
    card = HubCard.load(tmp_path / "hf" / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification" and card.data.license == "apache-2.0"
    assert "25.0%" in card.text and "50.0%" in card.text and 'subfolder="vision_tower"' in card.text
    remote = fake_hub.remote / "me" / "addressclip"
    assert (remote / "README.md").is_file() and (remote / "vision_tower" / "config.json").is_file()


def test_card_shows_the_benchmark_tables_numbers_not_the_answered_only_ones(tmp_path):
    """A card must not publish better numbers than benchmark.md: the strict metrics (unanswered = wrong), and
    nothing for a type the system cannot answer."""
    answered_only = {"street_acc": {"value": 1.0, "correct": 1, "total": 1}}
    strict = {"street_acc": {"value": 1 / 6, "correct": 1, "total": 6}}
    old = {"half": {"kind": "jsonl", "report": {"metrics": answered_only, "strict_metrics": strict,
                                                "distance": {"median_m": None}}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_metrics(tmp_path / "old.json") == {"half": {"street_acc": 1 / 6}}
    new = {"clip": {"kind": "clip", "table": {"street": 0.7, "yes/no": None, "median error (m)": 4.0},
                    "report": {"metrics": {"yesno_acc": {"value": 0.0}}}}}
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert read_metrics(tmp_path / "new.json") == {"clip": {"street": 0.7, "median error (m)": 4.0}}


def test_benchmark_json_carries_the_table_it_printed():
    from llava_address.eval.benchmark import json_table, markdown_table

    metric = lambda c, t: {"value": c / t if t else None, "correct": c, "total": t}  # noqa: E731
    report = {"metrics": {"street_acc": metric(1, 1), "yesno_acc": metric(1, 1)},
              "strict_metrics": {"street_acc": metric(1, 4), "sub_street_acc": metric(0, 0), "cross_acc": metric(0, 2),
                                 "neighbourhood_acc": metric(0, 0), "yesno_acc": metric(1, 2), "mc_acc": metric(0, 0)},
              "distance": {"median_m": 12.0, "n": 1}, "n_answers": 1, "n_eval": 4, "unparseable": []}
    res = {"kind": "clip", "supports": ["street", "cross", "full", "mc", "neighbourhood"], "report": report}
    table = json_table(res)
    assert table["street"] == 0.25 and table["cross streets"] == 0.0 and table["median error (m)"] == 12.0
    assert table["yes/no"] is None and table["sub-street"] is None  # not supported / never asked
    assert "| 25.0% (1/4) | - | 0.0% (0/2) | - | - | - |" in markdown_table({"r": res})
