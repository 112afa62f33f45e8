"""Chat: the Python `answer` API, history in the prompt, streamed = generated text, the terminal command."""

import io

import numpy as np
import pytest
from PIL import Image

from llava_address.apps import chat

from llava_address.eval import infer


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
                        "/image /no/such/file.png\n/bogus\n/quit\n")
    out = io.StringIO()
    assert chat.main(["--model", str(tiny_llava_dir), "--image", str(photo), "--max-new-tokens", "6", "--device", "cpu"],
                     stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    replies = [line.split("assistant> ", 1)[1] for line in text.splitlines() if "assistant> " in line]
    assert len(replies) == 3
    assert replies[0].strip() == replies[1].strip() == one_shot  # /reset forgot the first exchange
    assert "(conversation cleared)" in text and "error: image /no/such/file.png not found" in text
    assert "unknown command /bogus" in text  # not sent to the model: still three replies


# --- the web demo (Gradio): upload checks, top-5 + map, chat; a real server on 127.0.0.1 ---

def test_uploads_are_checked_before_decoding(tmp_path):
    from llava_address.apps.webdemo import UploadError, UploadLimits, load_upload

    ok = tmp_path / "ok.jpg"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(ok)
    assert load_upload(ok).size == (64, 48)
    cases = {
        "text.png": (lambda p: p.write_text("<html>not an image</html>"), "not a readable image"),
        "huge.png": (lambda p: Image.new("L", (5000, 10)).save(p), "5000x10 pixels"),
        "tiny.png": (lambda p: Image.new("RGB", (4, 4)).save(p), "4x4 pixels"),
        "scan.tiff": (lambda p: Image.new("L", (16, 16)).save(p), "TIFF files are not accepted"),
        "big.png": (lambda p: p.write_bytes(ok.read_bytes() + b"\0" * 4096), "limit is"),
        "truncated.png": (lambda p: p.write_bytes((tmp_path / "ok.jpg").read_bytes()[:200]), "not a readable image"),
    }
    limits = UploadLimits(max_bytes=ok.stat().st_size + 1024, max_side=4096)
    for name, (make, message) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(UploadError, match=message):
            load_upload(path, limits)
    with pytest.raises(UploadError, match="no image"):
        load_upload(None)


def test_web_demo_top_k_sets_the_panel_and_the_grounded_question(served_demo, photo, monkeypatch):
    import dataclasses

    demo = dataclasses.replace(served_demo[0], top_k=3, candidate_scores=True)
    _, rows, _, _ = demo.on_upload(str(photo))
    assert [r[1] for r in rows] == [t["address"] for t in demo.ranker.top_k(infer.open_image(photo), 3)]
    asked = {}
    monkeypatch.setattr(chat, "answer", lambda *a, **kw: asked.update(kw) or "Esplanadi")
    demo.on_ask(str(photo), "Where was this photo taken?", [], use_candidates=True)
    assert asked["candidates"] is demo.ranker and asked["top_k"] == 3 and asked["candidate_scores"] is True
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(demo, top_k=0)


@pytest.fixture(scope="module")
def served_demo(tiny_llava_dir, toy_dataset):
    """The web demo (tiny AddressCLIP + tiny LLaVA) served on 127.0.0.1 for this module's tests."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from llava_address.eval.gazetteer import Gazetteer
    from llava_address.apps.webdemo import AddressRanker, Demo, launch

    ranker = AddressRanker.from_args(None, "addressclip-tiny", None, toy_dataset)
    demo = Demo(ranker, infer.load_generator(tiny_llava_dir, device="cpu"), Gazetteer.from_dataset(toy_dataset),
                max_new_tokens=4)
    app = launch(demo, host="127.0.0.1", port=None, block=False)
    yield demo, app
    app.close()


def test_web_demo_serves_top5_map_and_chat_on_localhost(served_demo, photo, tmp_path):
    from gradio_client import Client, handle_file

    demo, app = served_demo
    top = demo.ranker.top_k(infer.open_image(photo), 5)
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert [t["similarity"] for t in top] == sorted((t["similarity"] for t in top), reverse=True)
    assert all(t["address"] in demo.ranker.gallery.texts and t["sub_streets"] for t in top)

    assert app.local_url.startswith("http://127.0.0.1:")
    client = Client(app.local_url, verbose=False)
    preview, table, plot, chat_history = client.predict(handle_file(str(photo)), api_name="/rank")
    assert preview is not None
    assert [row[1] for row in table["data"]] == [t["address"] for t in top]
    assert plot is not None and not chat_history
    history, box = client.predict(handle_file(str(photo)), "Where was this photo taken?", [], api_name="/ask")
    assert [m["role"] for m in history] == ["user", "assistant"] and box == ""
    reply = history[1]["content"]
    reply = reply if isinstance(reply, str) else reply[0]["text"]
    assert reply == chat.answer(photo, "Where was this photo taken?", model=demo.generator, max_new_tokens=4)
    not_image = tmp_path / "evil.png"
    not_image.write_text("#!/bin/sh\necho pwned\n")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(not_image)), api_name="/rank")


def test_web_demo_in_a_headless_browser(served_demo, photo, tmp_path):
    """Debian's chromium + chromedriver drive the real page: upload, top-5 and map, a chat turn, a rejection."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    demo, app = served_demo
    top = demo.ranker.top_k(infer.open_image(photo), 5)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1200"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    wait = WebDriverWait(driver, 90)

    def body() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    try:
        driver.get(app.local_url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(photo))
        wait.until(lambda d: all(t["address"] in body() for t in top))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=matplotlib] img, .js-plotly-plot, "
                                                              "img[src^='data:image']"))
        driver.find_element(By.CSS_SELECTOR, "textarea").send_keys("Where was this photo taken?")
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Ask").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=bot]"))
        users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=user]")]
        assert users == ["Where was this photo taken?"]

        evil = tmp_path / "evil.png"
        evil.write_text("<script>alert(1)</script>")
        driver.get(app.local_url)  # a fresh page: the file box now holds the photo
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(evil))
        wait.until(lambda d: "not a readable image" in body())
    finally:
        driver.quit()
