"""curves.py reads the eval records that the trainers log and draws one panel per task."""
import json

import pytest
from PIL import Image

import common
import curves


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
