"""reproduce_tiny.sh end to end in its smoke mode: every stage runs (two at a time), resumes skip, eval sees
all."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = ["base", "count", "text", "clean", "grpo_mix@s0", "grpo_mix@s1", "merge", "sft", "opd@s0", "opd@s1",
               "opd_fresh@s0", "opd_fresh@s1", "opd_mar0", "opd_mar0.2", "opd_mar1", "opd_anchor_clean", "opd_pg",
               "opd_from_sft"]


@pytest.mark.slow
def test_smoke_chain_then_resume_skips(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "SMOKE": "1", "SEEDS": "0 1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    # the first invocation two stages at a time (and the eval on two ranks), the second one at a time
    res = subprocess.run(["bash", str(REPO / "tiny" / "reproduce.sh"), str(runs)], capture_output=True, text=True,
                         env={**env, "JOBS": "2"}, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert list(results) == CHECKPOINTS
    assert all(set(r) == {"count", "text", "clean"} for r in results.values())
    assert "total:" in res.stdout
    table = (runs / "eval" / "results.md").read_text()
    assert "| grpo_mix (2 seeds) |" in table and "| opd (2 seeds) |" in table and "| opd_fresh (2 seeds) |" in table
    assert results["opd@s0"]["count"]["vs"]["ckpt"] == "merge" and "| opd (2 seeds), mean [min, max] |" in table
    assert (runs / "curves.png").stat().st_size > 0 and (runs / "mar_sweep.png").stat().st_size > 0
    config = json.loads((runs / "opd_fresh_s0" / "config.json").read_text())
    assert config["init"] == "" and [t.split("=")[0] for t in config["teachers"]] == ["count", "text"]
    assert config["beta_mar"] == 0.5 and config["mar_every"] == 1  # as the README's tables were measured
    # a teacher copied in (as the shipped ones are) has no metrics.jsonl: the curves leave it out
    (runs / "count" / "metrics.jsonl").unlink()
    (runs / "curves.png").unlink()
    again = subprocess.run(["bash", str(REPO / "tiny" / "reproduce.sh"), str(runs)], capture_output=True, text=True,
                           env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 17
    assert f"{runs}/count has no metrics.jsonl (not trained here), left out" in again.stdout
    assert "text has no metrics.jsonl" not in again.stdout and (runs / "curves.png").stat().st_size > 0
    # the second invocation ran no stage, yet reports the stages' time over both
    stages = sum(int(line.split()[-2]) for line in (runs / "times.txt").read_text().splitlines())
    assert f"add to {stages} s over every invocation" in again.stdout


@pytest.mark.slow
def test_recipe_smoke_runs_every_variant(tmp_path):
    runs = tmp_path / "recipe"
    env = {**os.environ, "SMOKE": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(REPO / "tiny" / "recipe.sh"), str(runs)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert list(results) == ["merge", "count", "text", "old", "velocity", "velocity_anchor_base",
                             "velocity_clean_teacher", "clean_base", "clean_base_lr3e-4", "clean_at_init", "anchor_init",
                             "preset", "preset_mar0", "preset_mar0.2", "preset_mar1", "fresh"]
    old, clean_base, preset = (json.loads((runs / n / "config.json").read_text()) for n in ("old", "clean_base", "preset"))
    assert (old["kl_weighting"], preset["kl_weighting"]) == ("flowgrpo", "velocity")
    assert old["anchor"].endswith("clean") and preset["anchor"] == "" and preset["beta_mar"] == 0.5
    assert preset["mar_every"] == 1  # as docs/recipe.md's tables were measured
    assert clean_base["teachers"][-1] == "clean=base" and len(preset["teachers"]) == 2
    assert (runs / "mar_sweep.png").stat().st_size > 0
    assert results["preset"]["clean"]["vs"]["ckpt"] == "merge" and "vs" not in results["merge"]["clean"]
