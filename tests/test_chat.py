"""Chat: the Python `answer` API, history in the prompt, streamed = generated text, the terminal command."""

import io

import numpy as np
import pytest
from PIL import Image

from llava_address import chat, infer


@pytest.fixture(scope="module")
def gen(tiny_llava_dir):
    return infer.load_generator(tiny_llava_dir, device="cpu")


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_answer_returns_what_batch_generation_gives_and_streams(gen, photo):
    image = infer.open_image(photo)
    expected = gen.generate([[infer.user_turn("Where was this photo taken?", True)]], [image], max_new_tokens=12)[0]
    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            Recorder.writes += 1
            return super().write(s)

    out = Recorder()
    got = chat.answer(photo, "Where was this photo taken?", model=gen, max_new_tokens=12, stream=out)
    assert got == expected and got
    # Streamed piece by piece (the random tiny model emits byte tokens, so the pieces' text may differ).
    assert Recorder.writes >= 2 and out.getvalue().strip()
    assert chat.answer(image, "Where was this photo taken?", model=gen, max_new_tokens=12) == expected  # PIL input


def test_history_is_part_of_the_prompt(gen, photo):
    first = chat.conversation("Where was this photo taken?")
    second = chat.conversation("Which neighbourhood?", [("Where was this photo taken?", "Esplanadi, Kamppi")])
    assert first[0]["value"].startswith("<image>") and len(second) == 3
    assert "<image>" in second[0]["value"] and "<image>" not in second[2]["value"]  # the image once, turn one
    ids1, ids2 = gen.prompt_ids(first), gen.prompt_ids(second)
    assert ids2[:len(ids1)] == ids1 and len(ids2) > len(ids1)
    image_id = gen.model.config.image_token_id
    assert ids2.count(image_id) == ids1.count(image_id)


def test_bad_input_is_a_clear_error(gen, tmp_path):
    with pytest.raises(infer.InferenceInputError, match="not found"):
        chat.answer(tmp_path / "missing.jpg", "Where?", model=gen)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(infer.InferenceInputError, match="not a readable image"):
        chat.answer(tmp_path / "text.jpg", "Where?", model=gen)
    with pytest.raises(ValueError, match="empty question"):
        chat.answer(tmp_path / "text.jpg", "  ", model=gen)


def test_chat_command_one_shot_and_multi_turn(tiny_llava_dir, photo):
    out = io.StringIO()
    assert chat.main(["--model", str(tiny_llava_dir), "--image", str(photo), "--question", "Where was this photo taken?",
                      "--max-new-tokens", "6", "--device", "cpu"], stdout=out) == 0
    one_shot = out.getvalue().strip()
    assert one_shot

    stdin = io.StringIO("Where was this photo taken?\n/reset\nWhere was this photo taken?\nAnd the street?\n"
                        "/image /no/such/file.png\n/quit\n")
    out = io.StringIO()
    assert chat.main(["--model", str(tiny_llava_dir), "--image", str(photo), "--max-new-tokens", "6", "--device", "cpu"],
                     stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    replies = [line.split("assistant> ", 1)[1] for line in text.splitlines() if "assistant> " in line]
    assert len(replies) == 3
    assert replies[0].strip() == replies[1].strip() == one_shot  # /reset forgot the first exchange
    assert "(conversation cleared)" in text and "error: image /no/such/file.png not found" in text
