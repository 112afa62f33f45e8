"""Conversation templates and the ONE function that turns a conversation into token ids + training labels.

LLaVA-1.5 was instruction-tuned with the Vicuna v1 template:

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

`encode_conversation` renders it piece by piece (nanochat style): each piece of text is tokenised on its
own and the ids are concatenated, with the label of every id decided when it is appended. Only assistant
answers and their end-of-turn `</s>` carry loss; everything else is -100. Nothing is ever rendered to one
string and re-tokenised, so there is no "tokenization mismatch" and no silently unsupervised sample: a
problem is an error naming the record.

Training and inference use the same function: a conversation that ends with a user message gets the
assistant opener ("ASSISTANT:") appended, and its ids are exactly the prefix of the training ids of the
same conversation with the answer added.

`<image>` in a user message expands to exactly `num_image_tokens` image-token ids (the number of visual
features the model's projector yields per image); the count of `<image>` placeholders must match the
record's images. Truncation to `max_length` cuts text only, never image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from clip_stage.registry import Registry

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A record that cannot be turned into a correct training sample (its id is in the message)."""


@dataclass(frozen=True)
class Template:
    """A two-role chat template in LLaVA's `SeparatorStyle.TWO` layout."""

    name: str
    system: str
    """Default system prompt (a leading system message in the conversation replaces it)."""
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "
    """Follows the system prompt and every user message."""
    end_of_turn: str = "eos"
    """What closes an assistant turn: 'eos' = the tokenizer's eos id (`</s>` for Llama/Vicuna)."""


TEMPLATES: Registry[Template] = Registry("conversation template")


def register_template(template: Template) -> None:
    TEMPLATES.register(template.name, template)


def get_template(name: str | Template) -> Template:
    """A registered template by name; a Template is returned as is (custom templates need no registration)."""
    return name if isinstance(name, Template) else TEMPLATES.lookup(name)


register_template(Template(name="vicuna_v1", system=VICUNA_V1_SYSTEM))


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
    num_image_tokens: image-token ids per `<image>` (llava_address.model.num_image_tokens(config)).
    num_images: how many images the record has; the `<image>` count must equal it (None: not checked).
    image_token_id: id of the image token (default: the tokenizer's id of `<image>`).
    max_length: cut the text at this many ids; an error if the cut would fall inside or before an image's
        tokens, or (for a training sample) leave no answer token with a loss.
    """
    tpl = get_template(template)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no `<image>` token; pass image_token_id")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token, which ends every assistant turn")

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
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise ConversationError(f"record {record_id!r}: an assistant message contains {IMAGE_PLACEHOLDER}")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in messages)
    if num_images is not None and n_placeholders != num_images:
        raise ConversationError(f"record {record_id!r}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                                f"but {num_images} image(s)")

    def text_ids(text: str) -> list[int]:
        # split_special_tokens: text like "</s>" or "<image>" inside a message stays text, so a message can
        # never inject an end-of-turn or an unaccounted image token.
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    # The answer follows "ASSISTANT:" after a space. Sentencepiece-style tokenizers (Llama/Vicuna) mark the word
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
    prefix = system + tpl.sep if system else ""
    for i, (role, text) in enumerate(messages):
        if role == "user":
            # One masked piece per user turn: role, question (images expanded) and the assistant opener.
            # It ends with "ASSISTANT:" so the inference prompt is this piece's end.
            segments = f"{prefix}{tpl.user}: {text}{tpl.sep}{tpl.assistant}:".split(IMAGE_PLACEHOLDER)
            for j, seg in enumerate(segments):
                if j > 0:
                    image_spans.append((len(enc.input_ids), len(enc.input_ids) + num_image_tokens))
                    append("image", [image_token_id] * num_image_tokens, False)
                append("user", text_ids(seg), False)
            prefix = ""
        else:
            append("assistant", text_ids(answer_space + text), True)
            append("end_of_turn", [eos_id], True)

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
                eos_token: str = "</s>") -> str:
    """The template as a human-readable string (for logs and docs; never tokenised for training)."""
    tpl = get_template(template)
    messages = normalize_messages(conversation)
    system = tpl.system
    if messages and messages[0][0] == "system":
        system = messages.pop(0)[1]
    out = system + tpl.sep if system else ""
    for role, text in messages:
        out += f"{tpl.user}: {text}{tpl.sep}{tpl.assistant}:" if role == "user" else f" {text}{eos_token}"
    return out
