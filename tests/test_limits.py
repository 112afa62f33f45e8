"""Limits (issue 12): chat trims its history to the model's context and refuses a question that cannot fit,
infer turns such a prompt into an error row, and the web demo caps questions, history and generation time,
cleans its upload cache and never shows a server path. The tiny LLaVA has a 512-token context."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from llava_address.apps import chat

from llava_address.eval import infer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "Main Street " * 200  # about 800 tokens of the tiny tokenizer: over the whole context alone


@pytest.fixture(scope="module")
def gen(tiny_llava_dir):
    return infer.load_generator(tiny_llava_dir, device="cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def _history(n: int, words: int = 12) -> list[tuple[str, str]]:
    return [(f"question {i}: " + "Oak Avenue " * words, f"answer {i}: " + "Harbour Lane " * words) for i in range(n)]


def _prompt_len(gen, question, history) -> int:
    return len(gen.prompt_ids(chat.conversation(question, history)))


def test_context_length_is_the_smaller_of_model_and_tokenizer(gen, tiny_llava_dir):
    assert gen.model.config.text_config.max_position_embeddings == 512
    assert gen.context_length == 512 and gen.prompt_budget(100) == 412
    tok = gen.tokenizer
    before = tok.model_max_length
    try:
        tok.model_max_length = 300  # a shorter training context wins
        assert gen.context_length == 300
        tok.model_max_length = int(1e30)  # transformers' "no limit" sentinel is ignored
        assert gen.context_length == 512
    finally:
        tok.model_max_length = before


def test_fit_history_drops_oldest_turns_after_the_first(gen):
    history = _history(12)
    assert _prompt_len(gen, "Which street?", history) > 512  # the whole history does not fit
    kept = chat.fit_history(gen, "Which street?", history, max_new_tokens=64)
    assert kept[0] == history[0] and kept[-1] == history[-1]  # turn one and the latest turns stay
    assert 1 < len(kept) < len(history) and list(kept[1:]) == history[len(history) - len(kept) + 1:]
    assert _prompt_len(gen, "Which street?", kept) <= 512 - 64
    # the largest history that fits: one more turn back in would not
    longer = (history[0],) + tuple(history[len(history) - len(kept):])
    assert _prompt_len(gen, "Which street?", longer) > 512 - 64
    assert chat.fit_history(gen, "Which street?", history[:2], max_new_tokens=64) == tuple(history[:2])  # fits: kept


def test_a_question_that_cannot_fit_is_one_clear_line(gen, photo):
    with pytest.raises(infer.PromptTooLongError) as err:
        chat.answer(photo, LONG, _history(3), model=gen, max_new_tokens=8)
    msg = str(err.value)
    assert "\n" not in msg and "context of 512 tokens" in msg and "minus 8" in msg
    # a question that fits alone but not with turn one: everything before it is left out, and it is answered
    q = "Oak Avenue " * 80
    assert chat.fit_history(gen, q, _history(1, words=60), max_new_tokens=8) == ()
    assert isinstance(chat.answer(photo, q, _history(1, words=60), model=gen, max_new_tokens=4), str)


def test_answer_with_a_long_history_answers_from_the_trimmed_prompt(gen, photo):
    history = _history(12)
    kept = chat.fit_history(gen, "Which street?", history, max_new_tokens=6)
    assert chat.answer(photo, "Which street?", history, model=gen, max_new_tokens=6) == \
        chat.answer(photo, "Which street?", kept, model=gen, max_new_tokens=6)


def test_chat_session_and_terminal_trim_and_refuse(gen, photo):
    session = chat.ChatSession(gen, infer.open_image(photo), history=_history(12), max_new_tokens=6)
    session.ask("Which street?")
    assert session.history[0] == _history(1)[0] and session.history[-1][0] == "Which street?"
    assert session.dropped > 0 and _prompt_len(gen, "x", session.history[:-1]) <= 512 - 6

    out = io.StringIO()
    session = chat.ChatSession(gen, infer.open_image(photo), history=_history(12), max_new_tokens=6)
    n = chat.repl(session, io.StringIO(f"{LONG}\nWhich street?\n/quit\n"), out)
    text = out.getvalue()
    assert n == 1  # the long question was refused, the next one answered
    assert "error: the prompt is" in text and "earlier turns were left out" in text


def test_chat_command_refuses_a_question_too_long_in_one_line(tiny_llava_dir, photo, capsys):
    rc = chat.main(["--model", str(tiny_llava_dir), "--image", str(photo), "--question", LONG, "--device", "cpu",
                    "--max-new-tokens", "4"], stdout=io.StringIO())
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith("chat: error: the prompt is") and "context of 512" in errors[0]


def test_infer_writes_an_error_row_for_a_prompt_that_does_not_fit(gen, photo, tmp_path):
    items = [infer.EvalItem("short", photo.name, "Where was this photo taken?", None),
             infer.EvalItem("long", photo.name, LONG, None),
             infer.EvalItem("short2", photo.name, "Which street?", None)]
    out = tmp_path / "answers.jsonl"
    counts = infer.run_answers(infer.llava_answer_batch(gen, 4), items, photo.parent, out, batch_size=3,
                               progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["short", "long", "short2"]
    assert "answer" in rows[0] and "answer" in rows[2] and "error" not in rows[0]
    assert "prompt is" in rows[1]["error"] and "answer" not in rows[1]
    assert counts == {"total": 3, "skipped": 0, "answered": 2, "errors": 1}
    # the short answers are those of a batch without the long one
    assert [rows[0]["answer"], rows[2]["answer"]] == gen.generate(
        [[infer.user_turn("Where was this photo taken?", True)], [infer.user_turn("Which street?", True)]],
        [infer.open_image(photo)] * 2, 4)


def test_generation_time_limit_stops_an_answer_early(gen, photo):
    assert gen.generation_kwargs(8, max_time=2.5)["max_time"] == 2.5 and "max_time" not in gen.generation_kwargs(8)
    full = chat.answer(photo, "Where?", model=gen, max_new_tokens=60)
    short = chat.answer(photo, "Where?", model=gen, max_new_tokens=60, max_time=0.001)
    assert len(gen.tokenizer(short)["input_ids"]) < len(gen.tokenizer(full)["input_ids"])


# --- web demo ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(gen):
    from llava_address.apps.webdemo import Demo

    return Demo(None, gen, None, max_new_tokens=4, max_question_chars=300, max_question_tokens=40,
                max_history_turns=3, max_history_chars=2000, max_time=5.0, cache_cleanup=(60, 120))


def test_web_demo_caps_question_length_in_characters_and_tokens(demo, photo):
    import gradio as gr

    with pytest.raises(gr.Error, match="301 characters; the limit is 300"):
        demo.on_ask(str(photo), "x" * 301, [])
    many_tokens = "Main Street " * 20  # 240 characters, about 80 tokens
    assert len(many_tokens) <= 300
    with pytest.raises(gr.Error, match=r"tokens; the limit is 40"):
        demo.on_ask(str(photo), many_tokens, [])
    history, box = demo.on_ask(str(photo), "Where was this photo taken?", [])
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"]


def test_web_demo_caps_the_history_the_model_sees(demo, photo, monkeypatch):
    seen = {}

    def fake_answer(image, question, history, **kw):
        seen.update(history=list(history), **kw)
        return "ok"

    monkeypatch.setattr(chat, "answer", fake_answer)
    pairs = [(f"q{i}", f"a{i}") for i in range(200)]
    messages = [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    out, _ = demo.on_ask(str(photo), "Which street?", messages)
    assert seen["history"] == [("q0", "a0"), ("q198", "a198"), ("q199", "a199")]  # turn one + the latest
    assert seen["max_time"] == 5.0 and len(out) == 402
    huge = [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
            {"role": "user", "content": "y" * 1500}, {"role": "assistant", "content": "z" * 1500},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    demo.on_ask(str(photo), "Which street?", huge)
    assert seen["history"] == [("q0", "a0"), ("q2", "a2")]  # over the character cap: the long turn goes


def test_web_demo_messages_hold_no_server_paths(demo, photo, monkeypatch, tmp_path):
    import gradio as gr

    from llava_address.apps.webdemo import _user_facing, public_message

    secret = str(tmp_path / "srv" / "models" / "llava")

    def broken_user_error(*a, **k):
        raise infer.InferenceInputError(f"cannot load the model from {secret}: config.json is damaged")

    def broken_bug(*a, **k):
        raise RuntimeError(f"CUDA error in {secret}/kernel.cu")

    for fake, expected in ((broken_user_error, "cannot load the model from .../llava"),
                           (broken_bug, "the request failed on the server")):
        monkeypatch.setattr(chat, "answer", fake)
        with pytest.raises(gr.Error) as err:
            _user_facing(demo.on_ask)(str(photo), "Where?", [])
        assert expected in err.value.message and str(tmp_path) not in err.value.message
    with pytest.raises(gr.Error) as err:  # a missing upload names no path either
        _user_facing(demo.on_ask)(str(tmp_path / "gone.png"), "Where?", [])
    assert str(tmp_path) not in err.value.message
    assert public_message(f"{secret}/a.png and C:\\data\\b.png, not a/b") == ".../a.png and .../b.png, not a/b"


def test_web_demo_cleans_its_upload_cache(demo):
    app = demo.build()
    assert app.delete_cache == (60, 120)
    from llava_address.apps.webdemo import build_parser

    args = build_parser().parse_args(["--dataset", "d", "--cache-age", "600", "--max-history-turns", "4"])
    assert args.cache_age == 600 and args.max_history_turns == 4 and args.max_time == 60.0
