"""LLaVA's conversation templates word for word, and the chat template saved with every processor: its token
ids (and assistant masks) equal the training encoder's for multi-turn conversations, with and without
AddressCLIP candidates, for every template."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from llava_address.config import DataArgs
from llava_address.prompting import (IGNORE_INDEX, TEMPLATES, ConversationError, attach_chat_template,
                                     chat_template, encode_conversation, get_template, render_text)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONV = [
    {"from": "human", "value": "<image>\nWhere was this photo taken?"},
    {"from": "gpt", "value": "Main Street & Oak Avenue, Downtown."},
    {"from": "human", "value": "Which neighbourhood is this?"},
    {"from": "gpt", "value": "Downtown."},
]
CANDIDATES = "Candidates (AddressCLIP top-5):\n1. Main Street & Oak Avenue\n2. Broadway & West 72nd Street\n"

# Written from haotian-liu/LLaVA llava/conversation.py: the system prompts of conv_vicuna_v1, conv_llava_v1,
# conv_llama_2 and conv_llava_llama_2, and Conversation.get_prompt() of the TWO and LLAMA_2 separator styles
# (sep " ", sep2 "</s>"; LLAMA_2: sep "<s>", sep2 "</s>", the leading "<s>" stripped), and preprocess_plain.
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYS = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA2_SYS = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
              "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
              "or illegal content. Please ensure that your responses are socially unbiased and positive in nature."
              "\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of "
              "answering something not correct. If you don't know the answer to a question, please don't share "
              "false information.")
LLAVA_LLAMA2_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                    "that the user provides, and assist the user with a variety of tasks using natural language.")


def _two(system):
    return (system + " USER: <image>\nWhere was this photo taken? ASSISTANT: Main Street & Oak Avenue, Downtown.</s>"
            "USER: Which neighbourhood is this? ASSISTANT: Downtown.</s>")


def _llama2(system):
    return (f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nWhere was this photo taken? [/INST] Main Street & Oak "
            "Avenue, Downtown. </s><s>[INST] Which neighbourhood is this? [/INST] Downtown. </s>")


REFERENCE = {
    "vicuna_v1": _two(VICUNA_SYS),
    "v1": _two(VICUNA_SYS),
    "llava_v1": _two(LLAVA_SYS),
    "llama_2": _llama2(LLAMA2_SYS),
    "llava_llama_2": _llama2(LLAVA_LLAMA2_SYS),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_rendered_prompt_is_llavas(name):
    assert render_text(CONV, name) == REFERENCE[name]
    # the generation prompt: LLaVA appends (assistant, None), which renders the opener alone
    prompt = render_text(CONV[:3], name)
    assert prompt == REFERENCE[name][: len(prompt)]
    assert prompt.endswith("Which neighbourhood is this? ASSISTANT:" if "llama" not in name
                           else "[INST] Which neighbourhood is this? [/INST]")


def test_plain_is_llavas_pretraining_layout():
    # preprocess_plain: the user message becomes the image alone; the caption follows with sep "\n", no </s>
    assert render_text(CONV[:2], "plain") == "<image>Main Street & Oak Avenue, Downtown.\n"
    assert render_text(CONV[:1], "plain") == "<image>"
    with pytest.raises(ConversationError, match="plain"):
        render_text(CONV, "plain")


def test_template_names_and_recipes():
    assert get_template("v1") is get_template("vicuna_v1")
    assert {"vicuna_v1", "v1", "llava_v1", "plain", "llama_2", "llava_llama_2"} <= set(TEMPLATES)
    # every LLaVA-1.5 recipe fine-tunes with what LLaVA-1.5 used (--version v1 = conv_vicuna_v1)
    recipes = sorted((Path(__file__).parents[1] / "llava_address" / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        data = (yaml.safe_load(recipe.read_text()) or {}).get("data", {})
        assert get_template(data.get("template", DataArgs.template)).system == VICUNA_SYS, recipe.name


# --- chat templates --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_llava_dir))


def _chat_messages(conv, image):
    """The processor's message format: typed content parts, the image as a part before the text."""
    out = []
    for m in conv:
        role = "user" if m["from"] == "human" else "assistant"
        text = m["value"]
        parts = []
        if "<image>\n" in text:
            parts.append({"type": "image", "image": image})
            text = text.replace("<image>\n", "")
        out.append({"role": role, "content": parts + [{"type": "text", "text": text}]})
    return out


def _flat(x):
    return list(x[0]) if x and isinstance(x[0], list) else list(x)


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "plain"])
@pytest.mark.parametrize("candidates", [False, True])
def test_chat_template_ids_equal_training_ids(processor, name, candidates):
    from llava_address.components import num_image_tokens
    from transformers import AutoConfig

    n_img = num_image_tokens(AutoConfig.from_pretrained(processor.tokenizer.name_or_path))
    tok = processor.tokenizer
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    conv = [dict(m) for m in CONV[: 2 if name == "plain" else 4]]
    if candidates:
        conv[0]["value"] = "<image>\n" + CANDIDATES + "Where was this photo taken?"
    attach_chat_template(processor, name)
    messages = _chat_messages(conv, image)
    checked = 0
    for k in range(1, len(conv) + 1):
        ends_with_user = k % 2 == 1
        enc = encode_conversation(conv[:k], tok, n_img, num_images=1, template=name)
        out = processor.apply_chat_template(messages[:k], tokenize=True, return_dict=True,
                                            add_generation_prompt=ends_with_user,
                                            return_assistant_tokens_mask=not ends_with_user)
        assert _flat(out["input_ids"]) == enc.input_ids, (name, k, processor.apply_chat_template(messages[:k]))
        if not ends_with_user:  # TRL's assistant-only loss would supervise exactly our labels
            assert _flat(out["assistant_masks"]) == [int(lab != IGNORE_INDEX) for lab in enc.labels]
        checked += 1
    assert checked == len(conv)


def test_chat_template_survives_save_and_string_content(processor, tmp_path):
    from transformers import AutoProcessor

    attach_chat_template(processor, "vicuna_v1")
    processor.save_pretrained(str(tmp_path))
    again = AutoProcessor.from_pretrained(str(tmp_path))
    assert again.chat_template == processor.chat_template == again.tokenizer.chat_template
    # LLaVA/TRL-style string content with `<image>` written in it, and a system message replacing the default
    conv = [{"role": "system", "content": "You locate streets."},
            {"role": "user", "content": "<image>\n" + CANDIDATES + "Where was this photo taken?"}]
    text = again.apply_chat_template(conv, add_generation_prompt=True)
    assert text.startswith(again.tokenizer.bos_token) and text.endswith("Where was this photo taken? ASSISTANT:")
    assert "You locate streets. USER: <image>" in text and "curious" not in text
    tok = again.tokenizer
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert _flat(ids) == encode_conversation(conv, tok, 1, template="vicuna_v1").input_ids
    # another template gives another text: the template is not a constant
    assert chat_template("llava_v1") != chat_template("vicuna_v1")


def test_train_llava_checkpoint_carries_its_chat_template(tiny_llava_dir, tiny_llava_data, tmp_path):
    from transformers import AutoProcessor

    from llava_address.prompting import special_boundary
    from llava_address.train import parse_args, train
    from tests.test_llava_distributed import _args

    out = tmp_path / "run"
    result = train(parse_args(_args(tiny_llava_dir, tiny_llava_data, out, "--max-steps", 1, "--save-every", 1,
                                    "--data.template", "llava_v1")))
    saved = AutoProcessor.from_pretrained(str(result.checkpoints[-1]))
    assert saved.chat_template == chat_template("llava_v1", special_boundary(saved.tokenizer))
    assert "curious human" in saved.chat_template
