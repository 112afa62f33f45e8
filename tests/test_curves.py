"""Training curves (clip_stage.core.curves): the keys drawn, the smoothing, and `address-llava plot-run`."""

from __future__ import annotations

import json

import pytest

from clip_stage.core.curves import curve_keys, main, plot_curves, read_metric_rows, smooth, CurvesError

PNG = b"\x89PNG\r\n\x1a\n"


def _run(folder, losses, extra=None):
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": v, "lr/llm": 1e-3 * (1 - i / len(losses)), "lr/llm_no_decay": 0.0,
             "tokens": 100, **(extra or {})} for i, v in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_smoothing_removes_the_start_up_bias_and_follows_a_step():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    out = smooth([0.0] * 5 + [1.0] * 50, 0.6)
    assert out[4] == 0.0 and 0.0 < out[5] < 1.0 and out[-1] == pytest.approx(1.0, abs=1e-6)
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]


def test_curve_keys_put_the_total_loss_first_and_skip_duplicate_lr_groups():
    rows = [{"step": 1, "address_loss": 1.0, "loss": 2.0, "lr": 0.1, "images_per_s": 5.0},
            {"step": 2, "geo_loss": 0.1, "lr/projector": 0.2, "lr/projector_no_decay": 0.2, "note": "x"}]
    assert curve_keys(rows) == (["loss", "address_loss", "geo_loss"], ["lr", "lr/projector"])


def test_plot_run_overlays_runs_and_skips_a_half_written_line(tmp_path, capsys):
    a = _run(tmp_path / "lora", [3.0, 2.0, 1.5, 1.2])
    b = _run(tmp_path / "full", [3.0, 1.0, 0.5])
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a run still writing its next row
    out = tmp_path / "cmp.png"
    assert main([str(a), str(b / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    captured = capsys.readouterr()
    assert "full/metrics.jsonl: skipped 1 malformed line" in captured.err
    assert "lora: 4 rows, full: 3 rows" in captured.out
    assert read_metric_rows(b)[0][-1]["step"] == 3


@pytest.mark.parametrize("argv_tail, message", [
    (["--out", "{tmp}/x.txt"], "give a .png file"),
    (["--out", "{tmp}/x.png", "--labels", "a", "b"], "2 labels for 1 runs"),
    (["--out", "{tmp}/x.png", "--smoothing", "1"], "must be in [0, 1)"),
    (["{tmp}/nothing", "--out", "{tmp}/x.png"], "nothing: no metrics.jsonl"),
])
def test_plot_run_user_errors_are_one_line(tmp_path, capsys, argv_tail, message):
    run = _run(tmp_path / "run", [1.0, 0.5])
    argv = [str(run)] + [a.format(tmp=tmp_path) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_plot_run_never_writes_over_its_input(tmp_path, capsys):
    run = _run(tmp_path / "run", [1.0, 0.5])
    before = (run / "metrics.jsonl").read_bytes()
    fake = run / "metrics.png"
    (run / "metrics.jsonl").rename(fake)
    assert main([str(fake), "--out", str(fake)]) == 2  # the metrics file itself as the output
    assert fake.read_bytes() == before


def test_a_run_without_losses_is_refused(tmp_path):
    with pytest.raises(CurvesError, match="no loss values"):
        plot_curves(tmp_path / "x.png", {"r": [{"step": 1, "lr": 0.1}]})


def test_metrics_logger_draws_the_whole_log_of_a_resumed_run_and_clears_a_killed_figure(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from clip_stage.core import curves
    from clip_stage.core.training import MetricsLogger

    run = _run(tmp_path / "run", [3.0, 2.0, 1.0, 0.9])  # steps 1-4 of an earlier start
    killed = run / ".training_curves.png.k1ll3d.tmp.png"  # fs.atomic_write_with's staging name
    killed.write_bytes(b"half")
    accelerator = SimpleNamespace(is_main_process=True, log=lambda values, step: None)
    logger = MetricsLogger(run, accelerator, start_step=2)  # resumed from the checkpoint at step 2
    assert not killed.exists()
    logger.log({"step": 3, "loss": 1.5})
    drawn = {}
    monkeypatch.setattr(curves, "plot_curves", lambda path, runs, *a, **k: drawn.update(runs))
    logger.plot()
    assert [r["step"] for r in drawn["run"]] == [1, 2, 3]  # both starts, nothing after the checkpoint twice
