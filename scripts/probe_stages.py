"""Where does the address signal go? Linear probes on each stage of a finished demo's LLaVA, same images.

    python scripts/probe_stages.py --demo runs/demo [--model runs/demo/llava/merged] [--limit 0]

For every image of the train and test splits, the script reads out features at each stage of the LLaVA that
answers (the merged model, with its own tower features and projector), then trains a multinomial logistic
regression (torch, full batch, L2) on the train split and reports test accuracy for the street and the
sub-street label:

- `tower CLS (last layer)`: the tower's last hidden state, CLS token (what AddressCLIP retrieval is built on);
- `tower patches (mean, layer L)`: the mean of the patch features of the layer the projector reads;
- `projector output (mean)`: the mean of the image tokens the LLM receives;
- `LLM last hidden (prompt end)`: the LLM's last hidden state at the last prompt token, when it is about to
  answer "Where was this photo taken?" (plain question, no candidates).

A drop between two rows is signal lost by that stage. Prints a markdown table.

A second table does the same for yes/no verification (does the photo show the place the question names?),
which needs the LLM to compare the named place with the image: the LLM's last hidden state at the end of each
yes/no question (plain, no candidates; train: every yes/no turn of the training conversations, each asked
alone with its image; test: the evaluation file's yes/no questions) probed for the expected verdict, and the
model's own forced choice there (its "Yes" logit against its "No" logit). The tower's own verdict is
AddressCLIP retrieval's row in the benchmark (yes when its top-1 address is the named place).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fit_probe(x_tr, y_tr, x_te, y_te, classes: int, steps: int = 300, wd: float = 1e-3) -> float:
    mean, std = x_tr.mean(0, keepdim=True), x_tr.std(0, keepdim=True) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    lin = torch.nn.Linear(x_tr.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x_tr), y_tr) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(x_te).argmax(1) == y_te).float().mean())


@torch.no_grad()
def stage_features(gen, image_root: Path, images: list[str], batch: int = 32) -> dict[str, torch.Tensor]:
    """Features of each stage for `images`, from `gen` (an `llava_address.eval.infer.Generator`)."""
    from llava_address.eval.infer import open_image, user_turn

    model, cfg = gen.model, gen.model.config
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    feats: dict[str, list[torch.Tensor]] = {"tower CLS (last layer)": [], f"tower patches (mean, layer {layer})": [],
                                            "projector output (mean)": [], "LLM last hidden (prompt end)": []}
    for i in range(0, len(images), batch):
        pil = [open_image(image_root / p) for p in images[i:i + batch]]
        pv = gen.pixel_values(pil)
        out = model.model.vision_tower(pv, output_hidden_states=True)
        feats["tower CLS (last layer)"].append(out.hidden_states[-1][:, 0])
        hs = out.hidden_states[layer]
        feats[f"tower patches (mean, layer {layer})"].append(hs[:, 1:].mean(1))
        selected = hs[:, 1:] if strategy == "default" else hs
        feats["projector output (mean)"].append(model.model.multi_modal_projector(selected).mean(1))
        inputs = gen.batch_inputs([[user_turn("Where was this photo taken?", True)] for _ in pil], pil)
        h = model(**inputs, output_hidden_states=True).hidden_states[-1]
        feats["LLM last hidden (prompt end)"].append(h[:, -1])  # left-padded: the last position is the prompt end
    return {k: torch.cat(v).float() for k, v in feats.items()}


def yes_no_questions(conversations_file: Path, eval_file: bool) -> list[tuple[str, str, bool]]:
    """(image, question, expected yes) of every yes/no question, candidate blocks removed."""
    from conversations.candidates import split_candidates
    from conversations.records import load_records

    out = []
    for r in load_records(conversations_file):
        if eval_file:
            ref = r.get("reference") or {}
            if ref.get("question_type") == "yes_no":
                question = split_candidates(r["conversations"][0]["value"])[1]
                out.append((str(r["image"]), question, ref["expected_answer"] == "yes"))
            continue
        turns = r["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            verdict = gpt["value"].split(maxsplit=1)[0].strip(".,").lower() if gpt["value"].strip() else ""
            if verdict in ("yes", "no"):
                out.append((str(r["image"]), split_candidates(human["value"])[1], verdict == "yes"))
    return out


@torch.no_grad()
def yes_no_features(gen, image_root: Path, questions: list[tuple[str, str, bool]],
                    batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM last hidden state at the end of each yes/no prompt, and whether "Yes" outscores "No" there."""
    from llava_address.eval.infer import open_image, user_turn

    yes_id, no_id = (gen.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    hidden, says_yes = [], []
    for i in range(0, len(questions), batch):
        chunk = questions[i:i + batch]
        pil = [open_image(image_root / image) for image, _, _ in chunk]
        inputs = gen.batch_inputs([[user_turn(q, True)] for _, q, _ in chunk], pil)
        # left-padded prompts of different lengths: positions as generate() gives them
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = gen.model(**inputs, position_ids=positions, output_hidden_states=True)
        hidden.append(out.hidden_states[-1][:, -1])
        says_yes.append(out.logits[:, -1, yes_id] > out.logits[:, -1, no_id])
    return torch.cat(hidden).float(), torch.cat(says_yes)


def main(argv: list[str] | None = None) -> int:
    from clip_stage.core.config import ArgumentParser  # the project's parser: --a_b = --a-b, one-line errors

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a demo run folder whose llava stage finished")
    ap.add_argument("--model", default=None, help="LLaVA folder to probe (default: <demo>/llava/merged)")
    ap.add_argument("--limit", type=int, default=0, help="images per split (0: all)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from clip_stage.core.schema import read_records

    demo = Path(args.demo)
    model_dir = Path(args.model) if args.model else demo / "llava" / "merged"
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir}: no LLaVA model (config.json)", file=sys.stderr)
        return 2
    records = read_records(demo / "dataset")
    splits = {s: records[records["split"] == s] for s in ("train", "test")}
    if args.limit:
        splits = {s: df.head(args.limit) for s, df in splits.items()}
    from llava_address.eval.infer import load_generator

    gen = load_generator(str(model_dir), device="cpu", dtype="float32")  # once, for every probe below
    feats = {s: stage_features(gen, demo / "dataset" / "images", df["image"].astype(str).tolist())
             for s, df in splits.items()}
    rows, result = ["| stage | street | sub-street |", "|---|---:|---:|"], {}
    for stage in feats["train"]:
        accs = {}
        for label in ("street", "sub_street"):
            names = sorted(set(records[label].astype(str)))
            index = {n: i for i, n in enumerate(names)}
            y = {s: torch.tensor([index[v] for v in df[label].astype(str)]) for s, df in splits.items()}
            accs[label] = fit_probe(feats["train"][stage], y["train"], feats["test"][stage], y["test"], len(names))
        result[stage] = accs
        rows.append(f"| {stage} | {100 * accs['street']:.1f}% | {100 * accs['sub_street']:.1f}% |")
    print("\n".join(rows))

    conversations = demo / "conversations"
    yes_no = {"train": yes_no_questions(conversations / "train.json", eval_file=False),
              "test": yes_no_questions(conversations / "eval.json", eval_file=True)}
    if args.limit:
        yes_no = {s: q[:args.limit] for s, q in yes_no.items()}
    if yes_no["train"] and yes_no["test"]:
        x, says = {}, {}
        for split, questions in yes_no.items():
            x[split], says[split] = yes_no_features(gen, demo / "dataset" / "images", questions)
        y = {s: torch.tensor([int(yes) for _, _, yes in q]) for s, q in yes_no.items()}
        probe = fit_probe(x["train"], y["train"], x["test"], y["test"], 2)
        forced = float((says["test"].long() == y["test"]).float().mean())
        share_yes = float(y["test"].float().mean())
        result["yes_no"] = {"train_questions": len(yes_no["train"]), "test_questions": len(yes_no["test"]),
                            "LLM last hidden (yes/no prompt end)": probe, "model's forced Yes/No": forced,
                            "majority answer": max(share_yes, 1 - share_yes)}
        print(f"\n| yes/no ({len(yes_no['train'])} train / {len(yes_no['test'])} test questions) | accuracy |\n"
              f"|---|---:|\n| majority answer | {100 * max(share_yes, 1 - share_yes):.1f}% |\n"
              f"| LLM last hidden at the end of the question (probe) | {100 * probe:.1f}% |\n"
              f"| the model's own forced choice there (Yes vs No logit) | {100 * forced:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
