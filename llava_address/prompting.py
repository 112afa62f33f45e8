"""How a conversation becomes the model's tokens: one rendering per template, the same for training (ids +
labels, in ONE function), inference and the Jinja chat template of every saved processor.

Templates carry LLaVA's names and wording (`llava/conversation.py` of haotian-liu/LLaVA):

- `vicuna_v1` (alias `v1`, LLaVA's `conv_vicuna_v1`, what LLaVA-1.5 was fine-tuned with, `--version v1`):
      {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>
  with the system prompt "A chat between a curious user and an artificial intelligence assistant. ...".
- `llava_v1` (`conv_llava_v1`): the same layout, system prompt "... a curious human ... the human's questions."
- `plain` (`conv_llava_plain`, LLaVA's projector pre-training): no system, no roles; the user message is
  replaced by its image(s) alone and the answer is followed by "\\n" (no `</s>`): `<image>{caption}\\n`.
- `llama_2` (`conv_llama_2`) and `llava_llama_2` (`conv_llava_llama_2`): `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n
  {question} [/INST] {answer} </s><s>[INST] {question} [/INST] {answer} </s>`.

`encode_conversation` renders a template piece by piece (nanochat style): each piece of text is tokenised
on its own and the ids are concatenated, with the label of every id decided when it is appended. Only
assistant answers and their end of turn carry loss; everything else is -100. Nothing is ever rendered to
one string and re-tokenised, so there is no "tokenization mismatch" and no silently unsupervised sample: a
problem is an error naming the record.

Training and inference use the same function: a conversation that ends with a user message gets the
assistant opener ("ASSISTANT:", "[/INST]") appended, and its ids are exactly the prefix of the training ids
of the same conversation with the answer added.

`<image>` in a user message expands to exactly `num_image_tokens` image-token ids (the number of visual
features the model's projector yields per image); the count of `<image>` placeholders must match the
record's images. Truncation to `max_length` cuts text only, never image tokens.

`chat_template(template)` writes the same layout as a Jinja chat template and `attach_chat_template`
stores it in a processor, so that `processor.apply_chat_template(messages, add_generation_prompt=True)`
(transformers pipelines, vLLM, SGLang, TGI) prompts a saved model exactly as it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from clip_stage.core.registry import Registry
from conversations.records import IMAGE_TOKEN

IGNORE_INDEX = -100

# LLaVA's conv_vicuna_v1 (LLaVA-1.5's fine-tuning prompt) and conv_llava_v1 system prompts, word for word.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
    "does not make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false information."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

STYLES = ("two", "plain", "llama_2")

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A record that cannot be turned into a correct training sample (its id is in the message)."""


@dataclass(frozen=True)
class Template:
    """A chat template in one of LLaVA's separator styles: 'two' (SeparatorStyle.TWO), 'plain', 'llama_2'."""

    name: str
    system: str
    """Default system prompt (a leading system message in the conversation replaces it; 'plain' has none)."""
    user: str = "USER"
    """User role name ('two' style)."""
    assistant: str = "ASSISTANT"
    """Assistant role name ('two' style)."""
    sep: str = " "
    """'two': follows the system prompt and every user message; 'plain': follows every answer."""
    style: str = "two"
    """Layout: 'two' ({system} USER: q ASSISTANT: a</s>), 'plain' (<image>a\\n), 'llama_2' ([INST] q [/INST] a </s>)."""

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"template {self.name!r}: unknown style {self.style!r}; valid: {list(STYLES)}")


TEMPLATES: Registry[Template] = Registry("conversation template")


def register_template(template: Template, *aliases: str) -> None:
    """Registers `template` under its name and each alias (LLaVA's `v1` is `vicuna_v1`)."""
    for name in (template.name, *aliases):
        TEMPLATES.register(name, template)


def get_template(name: str | Template) -> Template:
    """A registered template by name; a Template is returned as is (custom templates need no registration)."""
    return name if isinstance(name, Template) else TEMPLATES.lookup(name)


register_template(Template(name="vicuna_v1", system=VICUNA_V1_SYSTEM), "v1")
register_template(Template(name="llava_v1", system=LLAVA_V1_SYSTEM))
register_template(Template(name="plain", system="", user="", assistant="", sep="\n", style="plain"))
register_template(Template(name="llama_2", system=LLAMA_2_SYSTEM, sep="", style="llama_2"))
register_template(Template(name="llava_llama_2", system=LLAVA_LLAMA_2_SYSTEM, sep="", style="llama_2"))


@dataclass
class Encoded:
    """Token ids of one conversation, with labels (-100 = no loss) of the same length."""

    input_ids: list[int]
    labels: list[int]
    num_images: int = 0
    truncated: bool = False
    pieces: list[tuple[str, int, bool]] = field(default_factory=list)
    """(kind, length, trainable) per appended piece: for debugging and tests."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def normalize_messages(conversation: Sequence[Mapping[str, Any]], record_id: Any = None) -> list[tuple[str, str]]:
    """LLaVA ({from, value}) or chat ({role, content}) messages -> [(role, text)] with role in user/assistant/system."""
    out = []
    for i, msg in enumerate(conversation):
        raw_role = msg.get("from", msg.get("role"))
        text = msg.get("value", msg.get("content"))
        role = _ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ConversationError(f"record {record_id!r}: message {i} has unknown role {raw_role!r} "
                                    f"(expected one of {sorted(_ROLE_ALIASES)})")
        if not isinstance(text, str):
            raise ConversationError(f"record {record_id!r}: message {i} has no text value")
        out.append((role, text))
    return out


def _checked_turns(tpl: Template, conversation, record_id) -> tuple[str, list[tuple[str, str]]]:
    """(system prompt, alternating user/assistant turns), or a ConversationError naming the record."""
    messages = normalize_messages(conversation, record_id)
    system = tpl.system
    if messages and messages[0][0] == "system":
        system = messages.pop(0)[1]
    if not messages:
        raise ConversationError(f"record {record_id!r}: empty conversation")
    for i, (role, text) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(f"record {record_id!r}: message {i} is from {role!r}, expected {expected!r} "
                                    f"(turns must alternate user/assistant, starting with the user)")
        if role == "assistant" and IMAGE_TOKEN in text:
            raise ConversationError(f"record {record_id!r}: an assistant message contains {IMAGE_TOKEN}")
    if tpl.style == "plain":
        # LLaVA's preprocess_plain: exactly one (image, caption) pair; the user text is replaced by the image.
        if len(messages) > 2 or IMAGE_TOKEN not in messages[0][1]:
            raise ConversationError(f"record {record_id!r}: the 'plain' template takes one user message with "
                                    f"{IMAGE_TOKEN} and at most one answer, got {len(messages)} message(s)")
    return system, messages


def _pieces(tpl: Template, system: str, messages: list[tuple[str, str]]) -> list[tuple[str, str, bool]]:
    """The template's layout as (kind, text, trainable) pieces.

    kind: 'text' (tokenised as is), 'answer' (an answer that follows the opener after one space, which
    sentencepiece tokenizers write as the word-start mark), 'eos' / 'bos' (the tokenizer's special ids).
    Every user piece ends with the assistant opener, so an inference prompt is the pieces up to it.
    """
    out: list[tuple[str, str, bool]] = []
    for i, (role, text) in enumerate(messages):
        if tpl.style == "two":
            if role == "user":
                prefix = system + tpl.sep if i == 0 and system else ""
                out.append(("text", f"{prefix}{tpl.user}: {text}{tpl.sep}{tpl.assistant}:", False))
            else:
                out += [("answer", text, True), ("eos", "", True)]
        elif tpl.style == "plain":
            if role == "user":
                out.append(("text", IMAGE_TOKEN * text.count(IMAGE_TOKEN), False))
            else:
                out.append(("text", text + tpl.sep, True))
        else:  # llama_2
            if role == "user":
                if i == 0:
                    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
                    out.append(("text", f"[INST] {sys_block}{text} [/INST]", False))
                else:
                    out += [("bos", "", False), ("text", f"[INST] {text} [/INST]", False)]
            else:
                out += [("answer", text + " ", True), ("eos", "", True)]
    return out


def encode_conversation(
    conversation: Sequence[Mapping[str, Any]],
    tokenizer,
    num_image_tokens: int,
    *,
    num_images: int | None = None,
    image_token_id: int | None = None,
    template: str | Template = "vicuna_v1",
    max_length: int | None = None,
    record_id: Any = None,
) -> Encoded:
    """Token ids and labels of a conversation; the inference prompt when it ends with a user message.

    conversation: messages alternating user/assistant, starting with the user (an optional leading
        system message replaces the template's system prompt). `<image>` may appear only in user messages.
    num_image_tokens: image-token ids per `<image>` (llava_address.components.num_image_tokens(config)).
    num_images: how many images the record has; the `<image>` count must equal it (None: not checked).
    image_token_id: id of the image token (default: the tokenizer's id of `<image>`).
    max_length: cut the text at this many ids; an error if the cut would fall inside or before an image's
        tokens, or (for a training sample) leave no answer token with a loss.
    """
    tpl = get_template(template)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no `{IMAGE_TOKEN}` token; pass image_token_id")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token, which ends every assistant turn")

    system, messages = _checked_turns(tpl, conversation, record_id)
    n_placeholders = sum(text.count(IMAGE_TOKEN) for _, text in messages)
    if num_images is not None and n_placeholders != num_images:
        raise ConversationError(f"record {record_id!r}: {n_placeholders} {IMAGE_TOKEN} placeholder(s) "
                                f"but {num_images} image(s)")

    def text_ids(text: str) -> list[int]:
        # split_special_tokens: text like "</s>" or "<image>" inside a message stays text, so a message can
        # never inject an end-of-turn or an unaccounted image token. verbose=False: lengths are checked here and by
        # the callers (truncation, prompt limits), so the tokenizer's own "longer than the maximum" warning is noise.
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"] \
            if text else []

    # An answer follows its opener after a space. Sentencepiece-style tokenizers (Llama/Vicuna) mark the word
    # start themselves ("▁Main"): give them the bare text, since with some tokenizer.json normalisers a leading
    # space would become a second "▁". Byte-level BPEs need the explicit space ("ĠMain").
    probe = text_ids("a")
    answer_space = "" if probe and tokenizer.convert_ids_to_tokens(probe[0]).startswith("\u2581") else " "

    enc = Encoded(input_ids=[], labels=[], num_images=n_placeholders)

    def append(kind: str, ids: list[int], trainable: bool) -> None:
        enc.input_ids.extend(ids)
        enc.labels.extend(ids if trainable else [IGNORE_INDEX] * len(ids))
        enc.pieces.append((kind, len(ids), trainable))

    if tokenizer.bos_token_id is not None:  # Llama/Vicuna always start with BOS
        append("bos", [tokenizer.bos_token_id], False)
    image_spans: list[tuple[int, int]] = []
    for kind, text, trainable in _pieces(tpl, system, messages):
        if kind == "eos":
            append("end_of_turn", [eos_id], True)
        elif kind == "bos":
            if tokenizer.bos_token_id is not None:
                append("bos", [tokenizer.bos_token_id], False)
        elif kind == "answer":
            append("assistant", text_ids(answer_space + text), True)
        elif trainable:
            append("assistant", text_ids(text), True)
        else:
            # One masked piece per user turn (images expanded), ending with the assistant opener.
            for j, seg in enumerate(text.split(IMAGE_TOKEN)):
                if j > 0:
                    image_spans.append((len(enc.input_ids), len(enc.input_ids) + num_image_tokens))
                    append("image", [image_token_id] * num_image_tokens, False)
                append("user", text_ids(seg), False)

    is_training = messages[-1][0] == "assistant"
    if max_length is not None and len(enc.input_ids) > max_length:
        if not is_training:
            raise ConversationError(f"record {record_id!r}: the prompt has {len(enc.input_ids)} tokens, more than "
                                    f"max_length={max_length}; an inference prompt is never truncated")
        last_image_end = max((end for _, end in image_spans), default=0)
        if max_length < last_image_end:
            raise ConversationError(f"record {record_id!r}: {len(enc.input_ids)} tokens; truncating to "
                                    f"max_length={max_length} would cut image tokens (they end at {last_image_end})")
        enc.input_ids = enc.input_ids[:max_length]
        enc.labels = enc.labels[:max_length]
        enc.truncated = True
    if is_training and enc.num_supervised == 0:
        raise ConversationError(f"record {record_id!r}: no answer token would carry a loss"
                                + (f" after truncation to max_length={max_length}" if enc.truncated else ""))
    return enc


def generation_prompt(conversation: Sequence[Mapping[str, Any]], tokenizer, num_image_tokens: int, **kwargs) -> list[int]:
    """Ids of the inference prompt: the conversation (ending with a user message) + the assistant opener."""
    messages = normalize_messages(conversation, kwargs.get("record_id"))
    if not messages or messages[-1][0] != "user":
        raise ConversationError(f"record {kwargs.get('record_id')!r}: an inference prompt must end with a user message")
    return encode_conversation(conversation, tokenizer, num_image_tokens, **kwargs).input_ids


def render_text(conversation: Sequence[Mapping[str, Any]], template: str | Template = "vicuna_v1",
                eos_token: str = "</s>", bos_token: str = "<s>") -> str:
    """The template as one string, without the leading BOS: what LLaVA's `Conversation.get_prompt()` returns
    (for logs, docs, tests and a tokenizer's training text; never tokenised for training: encode_conversation
    builds the ids piece by piece)."""
    tpl = get_template(template)
    system, messages = _checked_turns(tpl, conversation, None)
    out = ""
    for kind, text, _ in _pieces(tpl, system, messages):
        out += {"eos": eos_token, "bos": bos_token, "answer": " " + text}.get(kind, text)
    return out


# --- the same layout as a Jinja chat template ------------------------------------------------------

def _lit(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(text, ensure_ascii=False)


# Message content is a string (LLaVA/TRL style, `<image>` written in it) or a list of typed parts (the
# processor style): image parts become "<image>\n" before the text, as LLaVA places an image (its
# `preprocess_multimodal` moves `<image>` to the front), and text parts are joined by newlines. `sp` is
# written after every special token (bos, eos, image) that text follows: see `special_boundary`.
def _content_macros(sp: str) -> str:
    img, tok = _lit(IMAGE_TOKEN + sp), f"'{IMAGE_TOKEN}'"  # the token as a Jinja literal
    return (
        "{%- macro content(c) -%}{%- if c is string -%}{{ c.replace(" + tok + ", " + img + ") }}{%- else -%}"
        "{%- for p in c if p['type'] == 'image' -%}{{ " + img + " + '\\n' }}{%- endfor -%}"
        "{%- for p in c if p['type'] == 'text' -%}{{ p['text'] }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        "{%- macro images(c) -%}{%- if c is string -%}{{ " + tok + " * c.count(" + tok + ") }}{%- else -%}"
        "{%- for p in c if p['type'] == 'image' -%}{{ " + tok + " }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    )


def special_boundary(tokenizer) -> str:
    """What a chat template must write between a special token and the text after it ("" or " ").

    Training tokenises each piece of text on its own, so a sentencepiece tokenizer gives the piece its
    word-start mark ("</s>" then "\u2581USER", as LLaVA's own `tokenizer_image_token` does). A whole rendered
    string reproduces that either by itself (legacy Llama tokenizers, byte-level BPEs) or only when a space
    follows the special token (non-legacy Llama tokenizers, transformers 5's default). Probed, not assumed.
    """
    eos = tokenizer.eos_token
    piece = [tokenizer.eos_token_id] + tokenizer("USER: a", add_special_tokens=False)["input_ids"]
    for sp in ("", " "):
        if tokenizer(eos + sp + "USER: a", add_special_tokens=False)["input_ids"] == piece:
            return sp
    raise ValueError(f"no chat template can reproduce this tokenizer's training ids after a special token "
                     f"({type(tokenizer).__name__}); serve the model with the toolkit's own prompting")


def chat_template(template: str | Template, boundary: str = "") -> str:
    """A Jinja chat template (transformers' `apply_chat_template`) that renders `template`'s training layout.

    It starts with `bos_token` (so tokenize the rendered string with `add_special_tokens=False`, as
    `apply_chat_template(tokenize=True)` and the image-text-to-text pipeline do, or BOS comes twice), ends assistant turns with `eos_token`
    inside `{% generation %}` (assistant-token masks for TRL), and `add_generation_prompt` appends the
    assistant opener. boundary: `special_boundary(tokenizer)` of the tokenizer it will serve. Token ids
    equal `encode_conversation`'s (tested): the rendered string is the concatenation of the pieces that
    `encode_conversation` tokenises one by one.
    """
    tpl = get_template(template)
    sp = _lit(boundary)
    head = (_content_macros(boundary) + "{{- bos_token -}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]['content']) -%}"
            "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = " + _lit(tpl.system) + " -%}"
            "{%- set turns = messages -%}{%- endif -%}")
    if tpl.style == "two":
        opener = _lit(tpl.assistant + ":")
        body = ("{{- " + sp + " -}}{%- if system -%}{{ system + " + _lit(tpl.sep) + " }}{%- endif -%}"
                "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                "{%- if not loop.first -%}{{ " + sp + " }}{%- endif -%}"
                "{{ " + _lit(tpl.user + ": ") + " + content(m['content']) + " + _lit(tpl.sep) + " }}"
                "{%- else -%}{{ " + opener + " }}{% generation %}{{ ' ' + content(m['content']) + eos_token }}"
                "{% endgeneration %}{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{ " + opener + " }}{%- endif -%}")
    elif tpl.style == "plain":
        body = ("{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{ images(m['content']) }}"
                "{%- else -%}{% generation %}{{ " + sp + " + content(m['content']) + " + _lit(tpl.sep) + " }}"
                "{% endgeneration %}{%- endif -%}{%- endfor -%}")
    else:  # llama_2: "[/INST]" is written with the user turn, so the generation prompt adds nothing
        body = ("{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                "{%- if loop.first -%}{{ " + sp + " + '[INST] ' }}{%- if system -%}"
                "{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}"
                "{%- endif -%}{%- else -%}{{ bos_token + " + sp + " + '[INST] ' }}{%- endif -%}"
                "{{ content(m['content']) + ' [/INST]' }}"
                "{%- else -%}{% generation %}{{ ' ' + content(m['content']) + ' ' + eos_token }}{% endgeneration %}"
                "{%- endif -%}{%- endfor -%}")
    return head + body


def attach_chat_template(processor, template: str | Template) -> None:
    """Stores `chat_template(template)` in a processor and its tokenizer, so that `save_pretrained` writes
    it (chat_template.jinja) and every server that prompts through it prompts as training did."""
    tokenizer = getattr(processor, "tokenizer", processor)
    jinja = chat_template(template, special_boundary(tokenizer))
    processor.chat_template = jinja
    tokenizer.chat_template = jinja
