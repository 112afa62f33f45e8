"""Prompt rendering + label masks, the LLaVA dataset, image padding, collate and length-grouped batching."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava_address.config import DataArgs, ModelArgs
from conversations.records import RecordError, load_records
from llava_address.data import (LengthGroupedSampler, LlavaCollator, LlavaDataset, expand_to_square, mean_colour,
                                length_grouped_indices)
from llava_address.prompting import (IGNORE_INDEX, ConversationError, encode_conversation, generation_prompt,
                                     get_template, render_text)

N_IMG = 16
CONV = [
    {"from": "human", "value": "<image>\nWhere was this photo taken?"},
    {"from": "gpt", "value": "Main Street & Oak Avenue, Downtown."},
    {"from": "human", "value": "Which neighbourhood is this?"},
    {"from": "gpt", "value": "Downtown."},
]


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_llava_dir))


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- prompting -------------------------------------------------------------------------------------

def test_exactly_answer_tokens_and_eos_carry_loss(tok):
    enc = encode_conversation(CONV, tok, N_IMG, num_images=1)
    assert len(enc.input_ids) == len(enc.labels)
    supervised = [t for t in enc.labels if t != IGNORE_INDEX]
    expected = _ids(tok, " Main Street & Oak Avenue, Downtown.") + [tok.eos_token_id] + _ids(tok, " Downtown.") + [tok.eos_token_id]
    assert supervised == expected
    # supervised positions are exactly two contiguous spans, each ending in </s>, each right after "ASSISTANT:"
    mask = [lab != IGNORE_INDEX for lab in enc.labels]
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(starts) == 2 and all(enc.input_ids[e] == tok.eos_token_id for e in ends)
    opener = _ids(tok, "ASSISTANT:")
    for s in starts:
        assert tok.decode(enc.input_ids[s - len(opener):s]).endswith("ASSISTANT:")
    # labels equal the ids wherever they are not masked
    assert all(lab == i for lab, i in zip(enc.labels, enc.input_ids) if lab != IGNORE_INDEX)
    # the image expands to exactly N_IMG contiguous image tokens, masked
    img = tok.convert_tokens_to_ids("<image>")
    pos = [i for i, t in enumerate(enc.input_ids) if t == img]
    assert len(pos) == N_IMG and pos == list(range(pos[0], pos[0] + N_IMG))
    assert all(enc.labels[i] == IGNORE_INDEX for i in pos)
    assert enc.input_ids[0] == tok.bos_token_id
    # the system prompt of LLaVA-1.5's Vicuna v1 template (conv_vicuna_v1) is there
    text = tok.decode([t for t in enc.input_ids if t != img], skip_special_tokens=True)
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert "USER:" in text and "ASSISTANT:" in text


def test_inference_prompt_is_training_prefix(tok):
    for n_turns in (1, 2):
        train = encode_conversation(CONV[: 2 * n_turns], tok, N_IMG, num_images=1)
        prompt = generation_prompt(CONV[: 2 * n_turns - 1], tok, N_IMG, num_images=1)
        assert train.input_ids[: len(prompt)] == prompt
        # what follows the prompt is exactly the supervised answer
        first_sup = next(i for i in range(len(prompt), len(train.labels)) if train.labels[i] != IGNORE_INDEX)
        assert first_sup == len(prompt)
    assert all(lab == IGNORE_INDEX for lab in encode_conversation(CONV[:1], tok, N_IMG).labels)
    with pytest.raises(ConversationError):
        generation_prompt(CONV[:2], tok, N_IMG)


def test_render_text_is_vicuna_v1():
    text = render_text(CONV[:2])
    assert text == (get_template("vicuna_v1").system + " USER: <image>\nWhere was this photo taken? ASSISTANT: "
                    "Main Street & Oak Avenue, Downtown.</s>")
    with pytest.raises(KeyError, match="vicuna_v1"):
        get_template("llama_3")


def test_bad_conversations_are_errors_naming_the_record(tok):
    with pytest.raises(ConversationError, match="rec-7.*1 <image>.*2 image"):
        encode_conversation(CONV, tok, N_IMG, num_images=2, record_id="rec-7")
    with pytest.raises(ConversationError, match="rec-8.*expected 'assistant'"):
        encode_conversation([CONV[0], CONV[0]], tok, N_IMG, record_id="rec-8")
    with pytest.raises(ConversationError, match="rec-9.*assistant message contains"):
        encode_conversation([CONV[0], {"from": "gpt", "value": "<image> x"}], tok, N_IMG, num_images=1, record_id="rec-9")
    with pytest.raises(ConversationError, match="rec-10.*unknown role"):
        encode_conversation([{"from": "robot", "value": "x"}], tok, N_IMG, record_id="rec-10")


def test_truncation_never_cuts_image_tokens(tok):
    full = encode_conversation(CONV, tok, N_IMG, num_images=1)
    img = tok.convert_tokens_to_ids("<image>")
    image_end = max(i for i, t in enumerate(full.input_ids) if t == img) + 1
    first_answer = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    cut = encode_conversation(CONV, tok, N_IMG, num_images=1, max_length=first_answer + 3)
    assert cut.truncated and len(cut) == first_answer + 3 and cut.input_ids == full.input_ids[: first_answer + 3]
    assert cut.input_ids.count(img) == N_IMG and cut.num_supervised == 3
    with pytest.raises(ConversationError, match="r1.*cut image tokens"):
        encode_conversation(CONV, tok, N_IMG, num_images=1, max_length=image_end - 1, record_id="r1")
    with pytest.raises(ConversationError, match="r2.*no answer token"):
        encode_conversation(CONV, tok, N_IMG, num_images=1, max_length=first_answer, record_id="r2")


def test_message_text_cannot_inject_special_tokens(tok):
    conv = [{"from": "human", "value": "<image>\nIs </s> a street?"}, {"from": "gpt", "value": "No</s>USER: <pad>"}]
    enc = encode_conversation(conv, tok, N_IMG, num_images=1)
    assert enc.input_ids.count(tok.eos_token_id) == 1 and enc.input_ids[-1] == tok.eos_token_id
    assert tok.pad_token_id not in enc.input_ids
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == N_IMG



def build_dataset(args: DataArgs, processor, model_config):
    """train-llava's own dataset step (llava_address.train_inputs.build_dataset) for these data args."""
    from llava_address.train_inputs import build_dataset as build

    return build(SimpleNamespace(data=args), processor, SimpleNamespace(config=model_config))


def build_dataloader(dataset, args: DataArgs, batch_size: int, seed: int, processor):
    """train-llava's own loader step (llava_address.train_inputs.build_dataloader)."""
    from llava_address.train_inputs import build_dataloader as build
    from llava_address.train_args import TrainArgs

    cfg = SimpleNamespace(data=args, train=TrainArgs(per_device_batch_size=batch_size, seed=seed))
    return build(dataset, cfg, processor)


# --- dataset ---------------------------------------------------------------------------------------

def test_dataset_items_and_lengths(tiny_llava_data, processor):
    ds = build_dataset(DataArgs(data_path=str(tiny_llava_data / "train.json")), processor,
                       _config(processor))
    assert len(ds) == 12 and all(ds.has_image)
    item = ds[0]
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    assert len(item["input_ids"]) == ds.lengths[0] == len(item["labels"])
    assert item["id"] == "toy-0000"
    # JSONL reads the same records
    jl = tiny_llava_data / "train.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in load_records(tiny_llava_data / "train.json")) + "\n")
    try:
        ds2 = LlavaDataset.from_file(jl, processor, N_IMG)
        assert ds2.lengths == ds.lengths and torch.equal(ds2[3]["input_ids"], ds[3]["input_ids"])
    finally:
        jl.unlink()


def _config(processor):
    from types import SimpleNamespace

    vc = SimpleNamespace(image_size=32, patch_size=8)
    return SimpleNamespace(vision_config=vc, vision_feature_select_strategy="default",
                           image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"))


def test_pad_to_square_with_mean_colour(tmp_path, processor):
    Image.new("RGB", (64, 16), (255, 0, 0)).save(tmp_path / "wide.png")
    recs = [{"id": "w", "image": "wide.png", "conversations": CONV[:2]}]
    ds = LlavaDataset(recs, processor, N_IMG, image_root=tmp_path, image_aspect_ratio="pad")
    pv = ds[0]["pixel_values"][0]  # [3, 32, 32]: the 64x16 image becomes 32x8 in the middle rows
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    pixel = lambda y, x: pv[:, y, x] * std + mean  # back to [0, 1]
    assert torch.allclose(pixel(0, 16), mean, atol=0.01)       # top band: the mean colour
    assert torch.allclose(pixel(31, 0), mean, atol=0.01)       # bottom band
    assert torch.allclose(pixel(16, 16), torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # the image itself
    resized = LlavaDataset(recs, processor, N_IMG, image_root=tmp_path, image_aspect_ratio="resize")[0]["pixel_values"][0]
    assert torch.allclose(resized[:, 0, 16] * std + mean, torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # center crop
    sq = expand_to_square(Image.new("RGB", (10, 4), (0, 0, 0)), (1, 2, 3))
    assert sq.size == (10, 10) and sq.getpixel((0, 0)) == (1, 2, 3) and sq.getpixel((5, 5)) == (0, 0, 0)


def test_padding_equals_stock_llava_image_processors(processor):
    # what a deployer gets from transformers' LlavaImageProcessor(do_pad=True) is exactly the training padding
    import numpy as np
    from transformers import LlavaImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 40, 3), dtype=np.uint8))
    ip = processor.image_processor
    stock = LlavaImageProcessor(image_mean=ip.image_mean, image_std=ip.image_std)
    padded = stock(images=image, do_pad=True, do_resize=False, do_center_crop=False, do_rescale=False,
                   do_normalize=False, return_tensors="pt")["pixel_values"][0]
    ours = expand_to_square(image, mean_colour(ip))
    assert torch.equal(torch.from_numpy(np.asarray(ours)).permute(2, 0, 1), padded)


def test_bad_records_and_images_are_errors_naming_the_record(tmp_path, processor, tiny_llava_data):
    data = tmp_path / "d"
    shutil.copytree(tiny_llava_data, data)
    recs = load_records(data / "train.json")
    (data / "images" / "0001.png").write_bytes(b"not a png")
    (data / "images" / "0002.png").unlink()
    recs[3]["image"] = "../outside.png"
    ds = LlavaDataset(recs, processor, N_IMG, image_root=data)
    with pytest.raises(RecordError, match="toy-0001.*corrupt"):
        ds[1]
    with pytest.raises(RecordError, match="toy-0002.*not found"):
        ds[2]
    with pytest.raises(RecordError, match="toy-0003.*escapes"):
        ds[3]
    with pytest.raises(RecordError, match="3 unusable"):
        ds.verify_images()
    bad = [dict(recs[0], id="no-img-token", conversations=[{"from": "human", "value": "hi"}, CONV[1]]),
           dict(recs[0], id="no-conv", conversations=[]),
           dict(recs[0], id="ends-with-user", conversations=CONV[:1])]
    with pytest.raises(RecordError, match="(?s)3 of 4.*no-img-token.*0 <image>.*no-conv.*ends-with-user"):
        LlavaDataset([recs[0]] + bad, processor, N_IMG, image_root=data)
    with pytest.raises(RecordError, match="toy-0000.*cut image tokens"):
        LlavaDataset(recs[:1], processor, N_IMG, image_root=data, max_length=10)
    (data / "broken.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(RecordError, match="broken.jsonl: line 2: invalid JSON"):
        load_records(data / "broken.jsonl")


def test_collate_pads_right_and_batches_mixed_modalities(tiny_llava_dir, tiny_llava_data, processor):
    from llava_address.model import build_llava

    recs = load_records(tiny_llava_data / "train.json")[:3]
    recs.append({"id": "text-only", "conversations": [{"from": "human", "value": "Where is Broadway?"},
                                                       {"from": "gpt", "value": "Upper West Side."}]})
    ds = LlavaDataset(recs, processor, N_IMG, image_root=tiny_llava_data)
    assert ds.has_image == [True, True, True, False]
    items = [ds[3], ds[0], ds[1]]
    batch = LlavaCollator(processor.tokenizer.pad_token_id)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    L = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == (3, L) and batch["pixel_values"].shape == (2, 3, 32, 32)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
    model, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # padding changes nothing: each sample's loss alone equals its part of the batch
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**LlavaCollator(processor.tokenizer.pad_token_id)([items[1]])).logits
    n = len(items[1]["input_ids"])
    assert torch.allclose(logits[1, :n], alone[0, :n], atol=1e-4)


# --- length-grouped batching -----------------------------------------------------------------------

def _padding(lengths, order, bs):
    return sum(max(lengths[i] for i in order[s:s + bs]) * len(order[s:s + bs]) - sum(lengths[i] for i in order[s:s + bs])
               for s in range(0, len(order), bs))


def test_length_grouped_sampler():
    g = torch.Generator().manual_seed(0)
    n, bs = 203, 4
    lengths = torch.randint(20, 600, (n,), generator=g).tolist()
    has_image = [i % 3 != 0 for i in range(n)]
    sampler = LengthGroupedSampler(lengths, has_image, batch_size=bs, seed=1, megabatch_mult=8)
    order = list(sampler)
    assert sorted(order) == list(range(n))                       # a permutation
    assert list(sampler) == order                                 # deterministic for an epoch
    sampler.set_epoch(1)
    assert list(sampler) != order                                 # reshuffled next epoch
    full = (len([i for i in range(n) if has_image[i]]) // bs + len([i for i in range(n) if not has_image[i]]) // bs)
    for b in range(full):                                         # full batches hold one modality
        assert len({has_image[i] for i in order[b * bs:(b + 1) * bs]}) == 1
    first = order[:bs]
    assert max(lengths[i] for i in first) == max(lengths)         # the longest batch comes first
    random_order = torch.randperm(n, generator=g).tolist()
    assert _padding(lengths, order, bs) < 0.5 * _padding(lengths, random_order, bs)
    assert length_grouped_indices(lengths, None, bs, torch.Generator().manual_seed(3)) != \
        length_grouped_indices(lengths, None, bs, torch.Generator().manual_seed(4))


def test_build_dataloader_is_deterministic(tiny_llava_data, processor):
    args = DataArgs(data_path=str(tiny_llava_data / "train.json"))
    ds = build_dataset(args, processor, _config(processor))
    loader = build_dataloader(ds, args, batch_size=4, seed=0, processor=processor)
    a = [b["input_ids"] for b in loader]
    b = [b["input_ids"] for b in loader]
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    order0 = list(loader.sampler)
    first = LlavaCollator(processor.tokenizer.pad_token_id)([ds[i] for i in order0[:4]])
    assert torch.equal(first["input_ids"], a[0])                  # batches follow the sampler's order
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != order0


def test_answer_word_boundary_for_byte_level_tokenizer():
    """A byte-level BPE (no sentencepiece '▁' prefix) gets the space before the answer explicitly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llava_address.tiny import demo_texts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(demo_texts(50), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<image>"])
    enc = encode_conversation(CONV[:2], tok, 4, num_images=1)
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(answer) == " Main Street & Oak Avenue, Downtown.</s>"
    assert tok.decode(enc.input_ids).endswith("ASSISTANT: Main Street & Oak Avenue, Downtown.</s>")


# --- start-up length cache -------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    """The default length cache goes to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def data_copy(tmp_path, tiny_llava_data):
    """A writable copy of the tiny data file (images are not opened at construction)."""
    out = tmp_path / "data" / "train.json"
    out.parent.mkdir()
    shutil.copy(tiny_llava_data / "train.json", out)
    return out


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts the per-record encodings of every LlavaDataset (construction pass and __getitem__)."""
    calls = []
    encode = LlavaDataset._encode
    monkeypatch.setattr(LlavaDataset, "_encode", lambda self, i, rec: (calls.append(i), encode(self, i, rec))[1])
    return calls


def _cached(data, processor, cache, n_img=N_IMG, **kw):
    return LlavaDataset.from_file(data, processor, n_img, length_cache_dir=cache, **kw)


def test_length_cache_second_construction_skips_tokenising(data_copy, tmp_path, processor, tiny_llava_dir,
                                                           tiny_llava_data, encode_calls):
    from transformers import AutoProcessor

    cache = tmp_path / "cache"
    args = DataArgs(data_path=str(data_copy), image_root=str(tiny_llava_data), length_cache_dir=str(cache))
    cold = build_dataset(args, processor, _config(processor))
    assert len(encode_calls) == 12 and len(list(cache.glob("*.json"))) == 1
    # a freshly loaded tokenizer has the same fingerprint (as in another process)
    warm = build_dataset(args, AutoProcessor.from_pretrained(str(tiny_llava_dir)), _config(processor))
    assert len(encode_calls) == 12                                # nothing tokenised
    assert (warm.ids, warm.lengths, warm.has_image) == (cold.ids, cold.lengths, cold.has_image)
    assert warm.ids[0] == "toy-0000" and all(warm.has_image)
    assert torch.equal(warm[5]["input_ids"], cold[5]["input_ids"]) and len(encode_calls) == 14  # items still encode
    nocache = LlavaDataset(load_records(data_copy), processor, N_IMG, image_root=data_copy.parent,
                           image_token_id=_config(processor).image_token_id)
    assert nocache.lengths == warm.lengths


def test_length_cache_is_keyed_on_settings_and_the_file(data_copy, tmp_path, processor, encode_calls):
    import os

    from llava_address.prompting import Template

    cache = tmp_path / "cache"
    base = _cached(data_copy, processor, cache)

    def misses(**kw):
        before = len(encode_calls)
        ds = _cached(data_copy, processor, cache, **kw)
        return len(encode_calls) - before == len(ds), ds

    assert not misses()[0]
    assert misses(max_length=200)[0]
    shorter = misses(template=Template(name="vicuna_v1", system="Short."))  # same name, other definition
    assert shorter[0] and shorter[1].lengths[0] < base.lengths[0]
    assert misses(n_img=8)[0] and misses(image_token_id=base.tokenizer.unk_token_id)[0]
    st = data_copy.stat()
    os.utime(data_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))   # touched
    assert misses()[0]
    # rewritten: same ids, a longer answer -> the new length, never the cached one
    recs = load_records(data_copy)
    recs[0]["conversations"][1]["value"] += " Near the old clock tower, by the river."
    data_copy.write_text(json.dumps(recs))
    miss, ds = misses()
    assert miss and ds.lengths[0] > base.lengths[0] and ds.lengths[1:] == base.lengths[1:]
    assert not misses()[0]


@pytest.mark.parametrize("damage", ["truncated", "not-json", "fewer-records", "other-ids", "bad-length"])
def test_corrupt_length_cache_is_recomputed_with_a_warning(damage, data_copy, tmp_path, processor, encode_calls,
                                                           caplog):
    cache = tmp_path / "cache"
    good = _cached(data_copy, processor, cache)
    (path,) = cache.glob("*.json")
    text = path.read_text()
    entry = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not-json":
        path.write_bytes(b"\x00\xff garbage")
    elif damage == "fewer-records":
        path.write_text(json.dumps({**entry, "ids": entry["ids"][:-1], "lengths": entry["lengths"][:-1],
                                    "has_image": entry["has_image"][:-1]}))
    elif damage == "other-ids":
        path.write_text(json.dumps({**entry, "ids": entry["ids"][::-1]}))
    else:
        path.write_text(json.dumps({**entry, "lengths": ["9"] + entry["lengths"][1:]}))
    with caplog.at_level("WARNING", logger="llava_address.length_cache"):
        again = _cached(data_copy, processor, cache)
    assert "length cache" in caplog.text and "ignored" in caplog.text
    assert len(encode_calls) == 24 and again.lengths == good.lengths and again.ids == good.ids
    _cached(data_copy, processor, cache)                          # rewritten: the next construction hits it
    assert len(encode_calls) == 24


def test_length_cache_none_and_default(data_copy, tmp_path, processor, encode_calls):
    from llava_address.length_cache import resolve_cache_dir
    from llava_address.train import parse_args

    default = tmp_path / "xdg-cache" / "address-llava" / "llava-lengths"
    assert resolve_cache_dir("default") == resolve_cache_dir(None) == default
    build_dataset(DataArgs(data_path=str(data_copy), length_cache_dir="none"), processor, _config(processor))
    build_dataset(DataArgs(data_path=str(data_copy), length_cache_dir="none"), processor, _config(processor))
    assert len(encode_calls) == 24 and not (tmp_path / "xdg-cache").exists()
    build_dataset(DataArgs(data_path=str(data_copy)), processor, _config(processor))
    assert len(list(default.glob("*.json"))) == 1
    # the CLI keeps "none" a string (an optional field would have read it as None = the default folder)
    argv = ["--model-name-or-path", "m", "--data-path", str(data_copy)]
    assert parse_args(argv).data.length_cache_dir == "default"
    assert parse_args(argv + ["--data.length-cache-dir", "none"]).data.length_cache_dir == "none"


def test_invalid_records_raise_and_cache_nothing(data_copy, tmp_path, processor):
    recs = load_records(data_copy)
    recs[3]["conversations"] = []
    data_copy.write_text(json.dumps(recs))
    cache = tmp_path / "cache"
    with pytest.raises(RecordError) as uncached:
        LlavaDataset.from_file(data_copy, processor, N_IMG)
    for _ in range(2):  # nothing was cached by the first attempt
        with pytest.raises(RecordError) as cached:
            _cached(data_copy, processor, cache)
        assert str(cached.value) == str(uncached.value) and "1 of 12" in str(cached.value)
        assert not cache.exists() or not any(cache.iterdir())


def _build_on_rank(rank: int, world: int, port: int, data_path: str, cache: str, model_dir: str, out: str):
    """One rank of test_only_the_main_process_tokenises (spawned: a real gloo process group)."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from accelerate import PartialState
    from transformers import AutoProcessor

    from llava_address import train_inputs

    state = PartialState(cpu=True, backend="gloo")
    processor = AutoProcessor.from_pretrained(model_dir)
    calls = []
    encode = LlavaDataset._encode
    LlavaDataset._encode = lambda self, i, rec: (calls.append(i), encode(self, i, rec))[1]
    cfg = SimpleNamespace(data=DataArgs(data_path=data_path, length_cache_dir=cache))
    ds = train_inputs.build_dataset(cfg, processor, SimpleNamespace(config=_config(processor)))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"calls": len(calls), "lengths": ds.lengths}))
    state.wait_for_everyone()
    state.destroy_process_group()


@pytest.mark.slow
def test_only_the_main_process_tokenises(data_copy, tmp_path, tiny_llava_dir):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_build_on_rank, args=(2, port, str(data_copy), str(tmp_path / "cache"), str(tiny_llava_dir),
                                   str(tmp_path)), nprocs=2)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["calls"] == 12 and other["calls"] == 0 and main["lengths"] == other["lengths"]
