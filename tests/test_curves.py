"""curves.py reads the eval records that the trainers log and draws one panel per task."""
import json

import pytest
from PIL import Image

import common
from tools import curves


def _run(path, evals):
    path.mkdir()
    for step, scores in evals:
        common.log_metrics(path, {"step": step, "reward": 0.1})  # a training record, no eval in it
        common.log_metrics(path, {"step": step, "eval": {t: {"mean": m, "strict": 0.0} for t, m in scores.items()}})
    return path


def test_curves_reads_eval_records_and_draws(tmp_path):
    a = _run(tmp_path / "mix", [(0, {"count": 0.1, "text": 0.2}), (20, {"count": 0.3, "text": 0.1})])
    b = _run(tmp_path / "opd", [(0, {"count": 0.2, "clean": 0.5})])
    assert curves.eval_curves(a) == {"count": ([0, 20], [0.1, 0.3]), "text": ([0, 20], [0.2, 0.1])}
    curves.main([f"mix={a}", str(b), "--out", str(tmp_path / "c.png")])
    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] > 2.5 * im.size[1]  # three task panels side by side


def test_curves_rejects_folders_without_evals(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        curves.main([str(tmp_path), "--out", str(tmp_path / "c.png")])
    (tmp_path / "r").mkdir()
    common.log_metrics(tmp_path / "r", {"step": 1, "reward": 0.1})
    with pytest.raises(SystemExit, match="no eval records"):
        curves.main([str(tmp_path / "r"), "--out", str(tmp_path / "c.png")])


def test_tradeoff_plots_one_point_per_checkpoint(tmp_path):
    res = {"a": {"count": {"mean": 0.3}, "text": {"mean": 0.5}, "clean": {"mean": 0.4}},
           "b": {"count": {"mean": 0.4}, "text": {"mean": 0.6}, "clean": {"mean": 0.3}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    curves.main(["--results", str(path), "a", "b", "--out", str(tmp_path / "t.png")])
    with Image.open(tmp_path / "t.png") as im:
        assert im.size[0] > 100
    with pytest.raises(SystemExit, match="no checkpoint named 'c'"):
        curves.main(["--results", str(path), "a", "c", "--out", str(tmp_path / "t.png")])
    with pytest.raises(SystemExit, match="task 'ocr' was not evaluated"):
        curves.main(["--results", str(path), "a", "--y", "ocr", "--out", str(tmp_path / "t.png")])


def test_kl_by_step_compares_a_runs_first_and_last_steps(tmp_path, capsys):
    """--kl_by_step: per task, the per-SDE-step KL over the first and the last --window training steps."""
    run = tmp_path / "opd"
    run.mkdir()
    for step in range(1, 7):  # the KL at SDE step 0 falls from 1.0 to 0.5; step 1 stays at 0.2
        common.log_metrics(run, {"step": step, "kl_by_step": {"count": [1.0 if step <= 3 else 0.5, 0.2]}})
    common.log_metrics(run, {"step": 6, "eval": {"count": {"mean": 0.3}}})  # other records are skipped
    assert curves.kl_by_step(run, 3) == {"count": (pytest.approx([1.0, 0.2]), pytest.approx([0.5, 0.2]))}
    curves.main(["--kl_by_step", f"a={run}", "--window", "3", "--out", str(tmp_path / "kl.png")])
    assert "a count: KL by SDE step, first 3 -> last 3 training steps: 1->0.5 (0.50x), 0.2->0.2 (1.00x)" in \
        capsys.readouterr().out
    assert Image.open(tmp_path / "kl.png").size[0] > 100
    with pytest.raises(SystemExit, match="no kl_by_step records"):
        curves.main(["--kl_by_step", str(_run(tmp_path / "grpo", [(0, {"count": 0.1})])), "--out", str(tmp_path / "x.png")])
