"""clip-baselines: every variant trained with identical settings, evaluated, tabulated; fine-tuning beats zero-shot."""

from __future__ import annotations

import json

import pytest

from clip_stage.baselines import VARIANTS, main, train_argv


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TRAIN_ARGS = ["--per-device-batch-size", "16", "--max-steps", "36", "--learning-rate", "2e-3", "--warmup-steps", "3", "--num-workers", "0",
              "--progress-bar", "false", "--report-to", "none", "--save-every", "1000"]


def test_harness_produces_every_row_and_fine_tuning_beats_zero_shot(toy_dataset, tmp_path, capsys):
    out = tmp_path / "baselines"
    assert main(["--dataset", str(toy_dataset), "--out", str(out), "--model", "addressclip-tiny",
                 "--pretrained", "none", "--seeds", "0", "--", *TRAIN_ARGS]) == 0
    report = json.loads((out / "baselines.json").read_text())
    assert [r["variant"] for r in report["rows"]] == list(VARIANTS)
    by = {r["variant"]: r for r in report["rows"]}
    # identical training settings; only the three weights differ, and each run used the ones asked for
    for name, v in VARIANTS.items():
        if v.weights is None:
            assert by[name]["train"] is None
            continue
        t = by[name]["train"]
        assert t["steps"] == 36
        assert (t["loss_weights"]["address"], t["loss_weights"]["semantic"], t["loss_weights"]["geo"]) == v.weights
        assert set(t["last_losses"]) >= {"loss", "address_loss"}
        assert ("semantic_loss" in t["last_losses"]) == (v.weights[1] > 0)
        assert ("geo_loss" in t["last_losses"]) == (v.weights[2] > 0)
        assert (out / "runs" / f"{name}-seed0" / "eval" / "metrics.json").exists()
    zero = by["zero-shot"]["metrics"]["SSA-1"]
    for name in ("address-only", "address+semantic", "address+geo", "addressclip"):
        assert by[name]["metrics"]["SSA-1"] > zero + 0.2, (name, by[name]["metrics"]["SSA-1"], zero)
    assert report["comparisons"]["addressclip - zero-shot (SSA-1, points)"] > 20
    md = (out / "baselines.md").read_text()
    for name in VARIANTS:
        assert name in md
    assert "SSA-1" in capsys.readouterr().out

    # --reuse evaluates the finished runs again without retraining (same numbers)
    assert main(["--dataset", str(toy_dataset), "--out", str(out), "--model", "addressclip-tiny", "--pretrained",
                 "none", "--variants", "zero-shot", "addressclip", "--reuse", "--", *TRAIN_ARGS]) == 0
    again = json.loads((out / "baselines.json").read_text())
    assert again["rows"][1]["metrics"]["SSA-1"] == by["addressclip"]["metrics"]["SSA-1"]
    assert again["rows"][0]["metrics"]["SSA-1"] == zero  # zero-shot = the seeded initial weights

    # a finished run trained with other arguments is not silently reused as if it matched
    before = (out / "baselines.json").read_bytes()
    other = [a if a != TRAIN_ARGS[TRAIN_ARGS.index("--max-steps") + 1] else "7" for a in TRAIN_ARGS]
    assert main(["--dataset", str(toy_dataset), "--out", str(out), "--model", "addressclip-tiny", "--pretrained",
                 "none", "--variants", "addressclip", "--reuse", "--", *other]) == 2
    err = capsys.readouterr().err
    assert "addressclip-seed0 was trained with other arguments" in err and "optim.max_steps: was" in err
    assert (out / "baselines.json").read_bytes() == before


def test_harness_refuses_bad_requests(toy_dataset, tmp_path, capsys):
    base = ["--dataset", str(toy_dataset), "--out", str(tmp_path / "b"), "--model", "addressclip-tiny", "--pretrained", "none"]
    assert main([*base, "--variants", "clip+magic"]) == 2
    assert "valid:" in capsys.readouterr().err
    assert main([*base, "--", "--geo-weight", "0.5"]) == 2
    assert "set by the baseline harness" in capsys.readouterr().err
    argv = train_argv(VARIANTS["address+geo"], "d", "m", None, tmp_path, 3, ["--max-steps", "5"])
    assert argv[argv.index("--geo-weight") + 1] == "0.8" and argv[argv.index("--semantic-weight") + 1] == "0.0"
    assert argv[argv.index("--seed") + 1] == "3" and argv[-2:] == ["--max-steps", "5"]


def test_out_and_arguments_are_checked_before_anything_runs(toy_dataset, tmp_path, capsys, monkeypatch):
    import clip_stage.baselines as bl
    from clip_stage.core.outdir import write_marker

    def must_not_run(*a, **k):
        raise AssertionError("a model loaded or trained before the request was checked")

    for name in ("create_clip", "train_main", "evaluate", "load_checkpoint"):
        monkeypatch.setattr(bl, name, must_not_run)
    dataset_files = sorted(p.name for p in toy_dataset.iterdir())

    def refused(out, *extra, needle, train_args=TRAIN_ARGS):
        assert main(["--dataset", str(toy_dataset), "--out", str(out), "--model", "addressclip-tiny",
                     "--pretrained", "none", *extra, "--", *train_args]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("clip-baselines: error: ") and needle in lines[0], err

    refused(toy_dataset, needle="is the input")
    refused(toy_dataset / "baselines", needle="inside the input")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    refused(mine, needle="not a clip-baselines output")
    (tmp_path / "afile.txt").write_text("x")
    refused(tmp_path / "afile.txt", needle="is a file")
    earlier = tmp_path / "earlier"
    write_marker(earlier, "clip-baselines")
    refused(earlier, needle="pass --reuse")
    refused(tmp_path / "new", "--model", "nonexist", needle="unknown CLIP architecture")
    refused(tmp_path / "new", "--variants", "address-only", train_args=[*TRAIN_ARGS, "--address-style", "nope"],
            needle="address style")  # train-clip's own check, before the zero-shot evaluation
    assert sorted(p.name for p in toy_dataset.iterdir()) == dataset_files
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and not (tmp_path / "new").exists()
    assert [p.name for p in earlier.iterdir()] == [".address-llava.json"]
