"""Benchmark of the AddressCLIP stage: training-step throughput and gallery ranking, baselines measured in the same run.

    .venv/bin/python scripts/bench_clip.py                          # addressclip-small, CPU
    .venv/bin/python scripts/bench_clip.py --model ViT-B-16 --batch-size 32 --device cuda --amp

(1) Training throughput (images/s) on the same model, batch and data (synthetic pre-processed images,
    address texts, captions, UTM coordinates), rounds interleaved so machine load hits every variant alike:
      plain          open_clip as it runs: model(images, address tokens padded to the context length)
                     -> open_clip.loss.ClipLoss -> backward -> AdamW step
      ours a         our step (clip_stage.train's: ContrastiveForward + AddressClipLoss), weights 1/0/0
      ours abc       our step with all three losses 1/0.2/0.8, which also encodes "caption. address"
    Target: ours abc >= 0.95x plain. L_semantic encodes a second, longer text per image; our step pays for
    it by cutting texts after the batch's last EOT (clip_stage.text_encoder; exact for causal towers,
    checked here). Two more rows show where the time goes:
      ours abc, untrimmed   the same step with texts padded to the context length
      plain, trimmed        plain ClipLoss with our trimmed text encoder (what trimming alone buys)
(2) Ranking one image against N (10,000) candidate addresses:
      cached    gallery embeddings from clip_stage.gallery.GalleryEncoder (computed once), per query:
                encode the image, one matrix product, top-5
      re-encode per query: encode all N texts again, then the same
    Target: cached >= 100x faster per query. The one-off cost of building the cache is reported too.
Peak memory: each configuration runs in a fresh child process; on CPU the peak resident set size
(ru_maxrss) minus the RSS after setup (model, optimizer, data) is reported as the step's extra memory;
on CUDA torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

STREETS = ["Mannerheimintie", "Aleksanterinkatu", "Esplanadi", "Bulevardi", "Fredrikinkatu", "Annankatu",
           "Kaivokatu", "Mikonkatu", "Unioninkatu", "Runeberginkatu", "Hietaniemenkatu", "Lapinlahdenkatu",
           "Eerikinkatu", "Kalevankatu", "Lönnrotinkatu", "Iso Roobertinkatu", "Yrjönkatu", "Albertinkatu",
           "Pursimiehenkatu", "Korkeavuorenkatu"]
HOODS = ["Kluuvi", "Kamppi", "Punavuori", "Ullanlinna", "Etu-Töölö", "Kruununhaka", "Kaartinkaupunki"]


def candidate_addresses(n: int) -> list[str]:
    """n distinct full-style addresses."""
    out, i = [], 0
    while len(out) < n:
        s = STREETS[i % len(STREETS)]
        a = STREETS[(i // len(STREETS)) % len(STREETS)]
        b = STREETS[(i // len(STREETS) ** 2) % len(STREETS)]
        out.append(f"{s} {i // 8000 + 1} between {a} and {b}, {HOODS[i % len(HOODS)]}, Helsinki")
        i += 1
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> float:
    """Resets the kernel's peak-RSS mark (Linux >= 4.0: clear_refs 5) and returns the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak below may include the setup's own peak
    return _rss_mb()


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch_texts(batch: int, dataset: str | None, seed: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
    """(addresses, captions, UTM coordinates) of one batch: synthetic, or sampled from a dataset's train split."""
    g = torch.Generator().manual_seed(seed)
    if dataset is None:
        addrs = candidate_addresses(batch)
        caps = [f"a street view of {c} buildings with {k} rows of windows and parked cars" for c, k in
                zip(["red", "grey", "white", "yellow"] * batch, range(batch))]
        coords = torch.rand(batch, 2, generator=g, dtype=torch.float64) * 2000 + torch.tensor([385000.0, 6672000.0])
        return addrs, caps, coords
    from clip_stage.core.schema import read_records

    df = read_records(dataset, "train")
    if len(df) < batch:
        raise SystemExit(f"{dataset}: {len(df)} training rows, fewer than --batch-size {batch}")
    rows = df.iloc[torch.randperm(len(df), generator=g)[:batch].tolist()]
    if rows["caption"].fillna("").eq("").any():
        raise SystemExit(f"{dataset}: empty captions (run `address-llava caption` first)")
    coords = torch.tensor(rows[["utm_x", "utm_y"]].to_numpy(), dtype=torch.float64)
    return rows["address_full"].tolist(), rows["caption"].tolist(), coords


def _setup(model_name: str, batch: int, device: str, seed: int = 0, dataset: str | None = None):
    from clip_stage.train_config import DataArgs
    from clip_stage.model import create_clip

    torch.manual_seed(seed)
    bundle = create_clip(model_name, None, device=device)
    size = bundle.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    addrs, caps, coords = batch_texts(batch, dataset, seed)
    template = DataArgs.semantic_template  # train-clip's default, "{caption}. {address}"
    address_tokens = bundle.tokenizer(addrs).to(device)
    semantic_tokens = bundle.tokenizer([template.format(caption=c, address=a) for c, a in zip(caps, addrs)]).to(device)
    return bundle, images, address_tokens, semantic_tokens, coords.to(device)


def make_step(kind: str, bundle, images, address_tokens, semantic_tokens, coords, amp: bool):
    """A closure doing one optimizer step of the given kind (see TRAIN_KINDS)."""
    from open_clip.loss import ClipLoss

    from clip_stage.losses import AddressClipLoss, logit_scale_clamp_
    from clip_stage.text_encoder import ContrastiveForward, encode_text, padding_trim

    model = bundle.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    dev = images.device.type
    ctx = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if amp else (lambda: torch.autocast(dev, enabled=False))
    trim = padding_trim(model) if kind not in ("plain", "ours-abc-untrimmed") else None
    if trim is not None:  # clip_stage.train_data.Collate does this on CPU for every batch
        address_tokens, semantic_tokens = trim(address_tokens), trim(semantic_tokens)
    if kind.startswith("plain"):
        loss_fn = ClipLoss()

        def step():
            with ctx():
                if kind == "plain":  # open_clip as is: texts padded to the context length
                    out = model(images, address_tokens)
                    img_f, txt_f = out["image_features"], out["text_features"]
                else:
                    img_f, txt_f = model.encode_image(images, normalize=True), encode_text(model, address_tokens)
                loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    weights = (1.0, 0.0, 0.0) if kind == "ours-a" else (1.0, 0.2, 0.8)
    loss_fn = AddressClipLoss(*weights)
    sem = weights[1] > 0
    forward = ContrastiveForward(model)

    def step():  # mirrors clip_stage.train's inner loop
        with ctx():
            out = forward(images, address_tokens, semantic_tokens if sem else None)
        terms = loss_fn(out["image_features"].float(), out["address_features"].float(), out["logit_scale"].float(),
                        semantic_features=out["semantic_features"].float() if sem else None,
                        coords=coords if weights[2] > 0 else None)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        logit_scale_clamp_(model)
        return terms["loss"].item()
    return step


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


TRAIN_KINDS = ["plain", "ours-a", "ours-abc", "ours-abc-untrimmed", "plain-trimmed"]
TRAIN_LABELS = {
    "plain": "open_clip ClipLoss, as open_clip runs it (plain)",
    "ours-a": "ours, address only (1/0/0)",
    "ours-abc": "ours, all three losses (1/0.2/0.8)",
    "ours-abc-untrimmed": "ours, all three, texts padded to the context",
    "plain-trimmed": "open_clip ClipLoss with our trimmed text encoder",
}


def bench_train(args) -> dict:
    kinds = args.train_kinds
    steps = {}
    for k in kinds:  # one model per kind, identical initial weights, same data tensors
        bundle, images, at, st, coords = _setup(args.model, args.batch_size, args.device, dataset=args.dataset)
        if k == "plain":
            from clip_stage.text_encoder import encode_text, padding_trim

            a, s = at.argmax(dim=-1) + 1, st.argmax(dim=-1) + 1  # lengths up to and including the EOT
            lengths = {"address_mean": float(a.float().mean()), "address_max": int(a.max()),
                       "semantic_mean": float(s.float().mean()), "semantic_max": int(s.max()),
                       "context": int(at.shape[1])}

            trim = padding_trim(bundle.model)
            with torch.no_grad():
                full = bundle.model.encode_text(st, normalize=True)
                trimmed = encode_text(bundle.model, trim(st) if trim else st)
                assert torch.allclose(full, trimmed, atol=1e-5), "trimmed text features differ from open_clip's"
        steps[k] = make_step(k, bundle, images, at, st, coords, args.amp)
    for k in kinds:
        for _ in range(args.warmup):
            steps[k]()
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            _sync(args.device)
            t = time.perf_counter()
            for _ in range(args.steps_per_round):
                steps[k]()
            _sync(args.device)
            times[k].append((time.perf_counter() - t) / args.steps_per_round)
    return {k: {"step_s": statistics.median(v), "images_per_s": args.batch_size / statistics.median(v)}
            for k, v in times.items()}, lengths


def _child_train_memory(kind: str, args_dict: dict, q) -> None:
    torch.set_num_threads(args_dict["threads"])
    args = argparse.Namespace(**args_dict)
    bundle, images, at, st, coords = _setup(args.model, args.batch_size, args.device, dataset=args.dataset)
    step = make_step(kind, bundle, images, at, st, coords, args.amp)
    step()  # first-call allocations (autograd buffers, optimizer state) are part of the setup
    base = _reset_peak()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else _peak_mb() - base
    q.put((kind, peak))


def _gallery_setup(args):
    from clip_stage.gallery import GalleryEncoder
    from clip_stage.model import create_clip

    torch.manual_seed(0)
    bundle = create_clip(args.model, None, device=args.device)
    bundle.model.eval()
    texts = candidate_addresses(args.candidates)
    image = torch.randn(1, 3, bundle.image_size, bundle.image_size).to(args.device)
    return bundle, texts, image, GalleryEncoder(None, batch_size=args.text_batch_size, device=args.device)


@torch.no_grad()
def _rank(bundle, image, text_emb, k=5):
    img = bundle.model.encode_image(image, normalize=True).float().cpu()
    return (img @ text_emb.T).topk(k, dim=1)


def bench_gallery(args) -> dict:
    from clip_stage.gallery import encode_texts

    bundle, texts, image, enc = _gallery_setup(args)
    t = time.perf_counter()
    emb = enc(bundle.model, bundle.tokenizer, texts)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    enc(bundle.model, bundle.tokenizer, texts)  # memory hit (hashes the weights and texts, then a dict lookup)
    hit_s = time.perf_counter() - t
    cached = []
    for _ in range(args.queries):
        t = time.perf_counter()
        top = _rank(bundle, image, emb)
        cached.append(time.perf_counter() - t)
    reenc = []
    for _ in range(args.reencode_queries):
        t = time.perf_counter()
        e = encode_texts(bundle.model, bundle.tokenizer, texts, args.text_batch_size, args.device)
        top2 = _rank(bundle, image, e)
        reenc.append(time.perf_counter() - t)
    assert torch.equal(top.indices, top2.indices), "cached and re-encoded rankings differ"
    return {"cached_query_s": statistics.median(cached), "reencode_query_s": statistics.median(reenc),
            "cache_build_s": build_s, "cache_lookup_s": hit_s, "embedding_mb": emb.numel() * 4 / 2**20}


def _child_gallery_memory(kind: str, args_dict: dict, q) -> None:
    from clip_stage.gallery import encode_texts

    torch.set_num_threads(args_dict["threads"])
    args = argparse.Namespace(**args_dict)
    bundle, texts, image, enc = _gallery_setup(args)
    if kind == "cached":
        emb = enc(bundle.model, bundle.tokenizer, texts)  # built before the query, as eval-clip does
        _rank(bundle, image, emb)
        base = _reset_peak()
        _rank(bundle, image, emb)
    else:
        _rank(bundle, image, encode_texts(bundle.model, bundle.tokenizer, texts[:8], args.text_batch_size, args.device))
        base = _reset_peak()
        _rank(bundle, image, encode_texts(bundle.model, bundle.tokenizer, texts, args.text_batch_size, args.device))
    q.put((kind, _peak_mb() - base))


def _in_children(target, kinds, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    out = {}
    for k in kinds:
        p = ctx.Process(target=target, args=(k, vars(args), q))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"memory child for {k} failed ({p.exitcode})")
        kind, mb = q.get()
        out[kind] = mb
    return out


def main(argv: list[str] | None = None) -> int:
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="addressclip-small", help="open_clip architecture (random init)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--dataset", default=None,
                   help="draw the training batch's addresses, captions and coordinates from this dataset folder's "
                        "train split (default: synthetic Helsinki addresses, which tokenise long)")
    p.add_argument("--train-kinds", nargs="+", choices=TRAIN_KINDS, default=TRAIN_KINDS,
                   help="training steps to compare (plain is always included: it is the baseline)")
    p.add_argument("--candidates", type=int, default=10_000)
    p.add_argument("--text-batch-size", type=int, default=512)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--reencode-queries", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the child-process peak-memory runs")
    p.add_argument("--parts", nargs="+", choices=["train", "gallery"], default=["train", "gallery"], help="what to run")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from clip_stage.core.training import check_device

    try:
        check_device(args.device)  # `--device cuda` without a GPU: one line, not a driver traceback
    except ValueError as e:
        p.error(str(e))
    args.train_kinds = ["plain"] + [k for k in args.train_kinds if k != "plain"]
    torch.set_num_threads(args.threads)
    print(f"bench_clip: model {args.model}, batch {args.batch_size}, device {args.device}, threads {args.threads}, "
          f"torch {torch.__version__}", flush=True)
    results = {"args": vars(args)}
    if "train" in args.parts:
        results.update(report_train(args))
    if "gallery" in args.parts:
        results.update(report_gallery(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _fmt_mb(mb) -> str:
    return "-" if mb is None else f"{mb:.1f}"


def report_train(args) -> dict:
    mem_unit = "MiB alloc" if args.device.startswith("cuda") else "MiB RSS"
    train, lengths = bench_train(args)
    tmem = {} if args.no_memory else _in_children(_child_train_memory, args.train_kinds, args)

    plain = train["plain"]["images_per_s"]
    print("\n(1) training step throughput, same model/batch/data")
    print(f"texts ({args.dataset or 'synthetic'}): address {lengths['address_mean']:.1f} tokens on average, "
          f"{lengths['address_max']} at most; caption + address {lengths['semantic_mean']:.1f} / "
          f"{lengths['semantic_max']}; open_clip pads both to {lengths['context']}")
    print(f"| step | images/s | s/step | vs plain | peak extra {mem_unit} |")
    print("|---|---:|---:|---:|---:|")
    for k, v in train.items():
        m = tmem.get(k)
        print(f"| {TRAIN_LABELS[k]} | {v['images_per_s']:.1f} | {v['step_s']:.4f} | {v['images_per_s'] / plain:.3f}x | "
              f"{_fmt_mb(m)} |")
    ratio = {k: v["images_per_s"] / plain for k, v in train.items()}
    ok = lambda r: "OK" if r >= 0.95 else "MISSED"  # noqa: E731
    if "ours-abc" in ratio:
        print(f"target >= 0.95x plain: ours, all three losses {ratio['ours-abc']:.3f}x {ok(ratio['ours-abc'])}")
    if "ours-a" in ratio:
        print(f"address only: {ratio['ours-a']:.3f}x {ok(ratio['ours-a'])}")
    if "ours-abc-untrimmed" in ratio:
        print(f"without trimming, all three would be {ratio['ours-abc-untrimmed']:.3f}x "
              "(L_semantic encodes a second, longer text per image)")

    return {"train": train, "train_memory": tmem, "train_ratio_vs_plain": ratio, "text_lengths": lengths}


def report_gallery(args) -> dict:
    mem_unit = "MiB alloc" if args.device.startswith("cuda") else "MiB RSS"
    gal = bench_gallery(args)
    gmem = {} if args.no_memory else _in_children(_child_gallery_memory, ["cached", "re-encode"], args)
    speed = gal["reencode_query_s"] / gal["cached_query_s"]
    print(f"\n(2) ranking one image against {args.candidates} candidate addresses")
    print(f"| method | s/query | peak extra {mem_unit} |")
    print("|---|---:|---:|")
    print(f"| re-encode gallery per query | {gal['reencode_query_s']:.4f} | {_fmt_mb(gmem.get('re-encode'))} |")
    print(f"| cached gallery | {gal['cached_query_s']:.5f} | {_fmt_mb(gmem.get('cached'))} |")
    print(f"speed-up {speed:.0f}x (target >= 100x: {'OK' if speed >= 100 else 'MISSED'}); one-off cache build "
          f"{gal['cache_build_s']:.2f} s, in-memory cache lookup {gal['cache_lookup_s']:.3f} s, "
          f"embeddings {gal['embedding_mb']:.1f} MiB")
    return {"gallery": gal, "gallery_memory": gmem, "gallery_speedup": speed}


if __name__ == "__main__":
    sys.exit(main())
