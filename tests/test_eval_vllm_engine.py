"""`--engine vllm` (llava_address.eval.vllm_engine): the one-line refusal where vLLM cannot run (tested on every machine
by hiding vLLM or the GPU), the prompt it sends (the saved chat template gives the training prompt's ids), and a
`gpu`-marked run of the real engine where a CUDA GPU and vLLM are present."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from PIL import Image

from llava_address.eval import benchmark, infer, vllm_engine


@pytest.fixture(scope="module")
def merged_tiny(tiny_llava_dir, tmp_path_factory):
    """A copy of the tiny LLaVA whose processor carries the training chat template, as `merge` saves it."""
    from transformers import AutoProcessor

    from llava_address.prompting import attach_chat_template

    out = tmp_path_factory.mktemp("tiny-merged") / "merged"
    shutil.copytree(tiny_llava_dir, out)
    processor = AutoProcessor.from_pretrained(out)
    attach_chat_template(processor, "vicuna_v1")
    processor.save_pretrained(out)
    return out


def _hide(monkeypatch, vllm: bool, gpu: bool):
    """Makes vLLM look (un)installed and the GPU (un)available, whatever this machine has."""
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name == "vllm":
            return object() if vllm else None
        return real(name, *a, **k)

    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr("torch.cuda.is_available", lambda: gpu)


@pytest.mark.parametrize("vllm,gpu,words", [(False, True, "not installed"), (True, False, "CUDA GPU")])
def test_commands_refuse_in_one_line_before_loading_anything(monkeypatch, tmp_path, capsys, vllm, gpu, words):
    _hide(monkeypatch, vllm, gpu)
    out = tmp_path / "answers.jsonl"
    # nothing here exists: a command that read or loaded anything first would fail differently
    rc = infer.main(["--engine", "vllm", "--model", str(tmp_path / "no-model"), "--eval", str(tmp_path / "no.json"),
                     "--image-root", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err and "--engine vllm" in err
    assert not out.exists()
    rc = benchmark.main(["--engine", "vllm", "--dataset", str(tmp_path / "no-data"), "--eval", str(tmp_path / "no"),
                         "--out", str(tmp_path / "bench"), "--system", "ours=llava:" + str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "bench").exists()


def test_load_refuses_adapters_and_models_without_a_chat_template(monkeypatch, tiny_llava_dir, tmp_path):
    monkeypatch.setattr(vllm_engine, "vllm_unavailable", lambda: None)  # as on a GPU machine with vLLM
    with pytest.raises(infer.InferenceInputError, match="merge the adapter"):
        vllm_engine.load_vllm(tiny_llava_dir, adapter=tmp_path / "ckpt")
    with pytest.raises(infer.InferenceInputError, match="config.json"):
        vllm_engine.load_vllm(tmp_path)
    with pytest.raises(infer.InferenceInputError, match="no chat template"):
        vllm_engine.load_vllm(tiny_llava_dir)  # the bare tiny model, as built: no template, refused before vLLM


def test_prompt_is_the_training_prompt_with_one_image_id(merged_tiny):
    from transformers import AutoConfig, AutoProcessor

    from llava_address.prompting import generation_prompt

    processor = AutoProcessor.from_pretrained(merged_tiny)
    config = AutoConfig.from_pretrained(merged_tiny)
    gen = vllm_engine.VllmGenerator(llm=None, processor=processor)
    questions = ["Where was this photo taken?", "<image>\nWhat street is this?"]
    images = [Image.new("RGB", (40, 20), (200, 30, 30)), Image.new("RGB", (24, 24), (0, 0, 200))]
    requests = gen.requests(questions, images)
    for q, req in zip(questions, requests):
        training = generation_prompt([infer.user_turn(q, True)], processor.tokenizer, 1, num_images=1,
                                     image_token_id=config.image_token_id, template="vicuna_v1")
        assert req["prompt_token_ids"] == training  # vLLM expands the one image id into the features itself
        assert req["prompt_token_ids"].count(config.image_token_id) == 1
        assert req["prompt_token_ids"].count(processor.tokenizer.bos_token_id) == 1
    assert [r["multi_modal_data"]["image"].size for r in requests] == [(40, 40), (24, 24)]  # padded to square


@pytest.mark.gpu
@pytest.mark.skipif(vllm_engine.vllm_unavailable() is not None,
                    reason=f"needs a CUDA GPU and vLLM: {vllm_engine.vllm_unavailable()}")
def test_vllm_engine_answers_every_question(merged_tiny, toy_conversations, toy_dataset, tmp_path):
    out = tmp_path / "answers.jsonl"
    common = ["--model", str(merged_tiny), "--eval", str(toy_conversations / "eval.json"),
              "--image-root", str(toy_dataset / "images"), "--batch-size", "4", "--max-new-tokens", "6",
              "--limit", "8", "--dtype", "float32"]
    assert infer.main(common + ["--engine", "vllm", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["answer"], str) for r in rows)
    assert infer.main(common + ["--engine", "vllm", "--out", str(out)]) == 0  # resumable like the HF engine
    assert len(out.read_text().splitlines()) == 8
