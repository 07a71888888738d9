"""eval.py: deterministic and cached, the same numbers under torchrun, grids, start-up errors."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import rewards
import scoring
from lora import add_student, save_adapter
from sde_sampler import load_policy

REPO = Path(__file__).resolve().parents[1]
TASKS = ["count", "text", "clean"]
NUM_PROMPTS, GRID_PROMPTS = 3, 2


@pytest.fixture(scope="module")
def lora_dir(tiny_pipe_dir, tmp_path_factory):
    """A second checkpoint: a random LoRA saved as our diffusers folder."""
    policy = load_policy(str(tiny_pipe_dir), device="cpu")
    params = add_student(policy, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    return save_adapter(policy, "student", tmp_path_factory.mktemp("lora") / "student")


def _args(pipe_dir, out, *ckpts, **over):
    cfg = dict(model=str(pipe_dir), tasks=",".join(TASKS), num_prompts=NUM_PROMPTS, resolution=32, eval_steps=2,
               batch_size=3, grid_prompts=GRID_PROMPTS, out=str(out), seed=0)
    cfg.update(over)
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))] + ["--ckpt", *ckpts]


def _outputs(out):
    out = Path(out)
    return json.loads((out / "results.json").read_text()), (out / "details.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def first_run(tiny_pipe_dir, lora_dir, tmp_path_factory):
    """One evaluation of base and the LoRA, from an empty cache: (out, results, details, cache mtimes)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    evaluation.main(_args(tiny_pipe_dir, out, "base", f"lora={lora_dir}"))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.png")}
    return out, *_outputs(out), stamps


def test_outputs(first_run):
    out, results, details, stamps = first_run
    assert len(stamps) == 2 * len(TASKS) * NUM_PROMPTS  # every image sampled once and cached
    assert list(results) == ["base", "lora"] and all(list(r) == TASKS for r in results.values())
    for r in results.values():
        assert all(r[t]["n"] == NUM_PROMPTS and 0 <= r[t]["mean"] <= 1 and 0 <= r[t]["strict"] <= 1 for t in TASKS)
    rows = [json.loads(line) for line in details]
    assert len(rows) == 2 * len(TASKS) * NUM_PROMPTS
    assert [r["seed"] for r in rows[:9]] == [0, 1, 2] * 3  # the i-th prompt of every task: seed + i
    assert {"checkpoint", "task", "prompt", "seed", "score", "strict", "info", "image"} <= set(rows[0])
    assert "read" in next(r for r in rows if r["task"] == "text")["info"]
    assert rows[:9] != [{**r, "checkpoint": "base"} for r in rows[9:]]  # the LoRA changes the images
    table = (out / "results.md").read_text()
    assert "| checkpoint | count | text | clean | average |" in table and "| lora |" in table


def test_periodic_eval_and_eval_py_are_one_path(first_run, tiny_pipe_dir, lora_dir):
    """A training run's periodic eval (scoring.evaluate) of one task's first prompts gives the
    scores eval.py gave the same checkpoint: same seeds, same sampler, same reward, whatever the
    batch size (eval.py ran in batches of 3, this in batches of 2)."""
    from prompts import load_prompts, spread
    from lora import load_adapter
    _, _, details, _ = first_run
    want = [d for d in map(json.loads, details) if d["checkpoint"] == "lora" and d["task"] == "text"]
    policy = load_policy(str(tiny_pipe_dir), device="cpu", resolution=32)
    adapter = load_adapter(policy, str(lora_dir), "lora")
    # two tasks, as a training run's evals hold them: each task's prompts numbered from 0, as eval.py numbers them
    rows = [r for t in ("count", "text") for r in spread(load_prompts(t, "test")[:NUM_PROMPTS], 0)]
    summary, images, got = scoring.evaluate(policy, rows, 2, evaluation.DEFAULTS["guidance"], 2, adapter=adapter)
    got = [d for d in got if d["task"] == "text"]
    assert [d["score"] for d in got] == [d["score"] for d in want] and [d["seed"] for d in got] == [0, 1, 2]
    assert summary["text"]["n"] == NUM_PROMPTS and summary["text"]["mean"] == pytest.approx(
        sum(d["score"] for d in want) / NUM_PROMPTS)
    # evenly spaced prompts (the periodic evals' pick) keep the seed of their place in the whole set
    picked = spread(load_prompts("text", "test"), 4)
    assert [j["seed"] for j in scoring.seeded_jobs(picked, 0)] == [r["index"] for r in picked] != [0, 1, 2, 3]


def test_full_weight_checkpoint_side_by_side(first_run, tiny_pipe_dir, tmp_path, capsys):
    """A fully fine-tuned transformer's weights as a --ckpt: sampled through their own copy. The
    base's own weights saved as one give exactly the base's scores; perturbed ones do not."""
    from safetensors.torch import save_file
    from lora import base_weights
    _, results, _, _ = first_run
    state = {k: v.detach().clone().contiguous() for k, v in
             base_weights(load_policy(str(tiny_pipe_dir), device="cpu").transformer).items()}
    save_file(state, str(tmp_path / "same.safetensors"))
    state["proj_out.weight"] += 0.05 * torch.randn(state["proj_out.weight"].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "full"
    evaluation.main(_args(tiny_pipe_dir, out, "base", str(tmp_path / "same.safetensors"), str(tmp_path / "tuned.safetensors")))
    got = json.loads((out / "results.json").read_text())
    assert "full weights, its own frozen copy" in capsys.readouterr().out
    for t in TASKS:
        assert got["same"][t]["mean"] == got["base"][t]["mean"] == results["base"][t]["mean"]
    assert any(got["tuned"][t]["mean"] != got["base"][t]["mean"] for t in TASKS)
    fingerprints = json.loads((out / "config.json").read_text())["fingerprints"]
    assert fingerprints["same"].startswith("full:") and fingerprints["same"] != fingerprints["tuned"]


def test_second_run_identical_from_cache(first_run, tiny_pipe_dir, lora_dir, tmp_path, capsys):
    out, results, details, stamps = first_run
    evaluation.main(_args(tiny_pipe_dir, out, "base", f"lora={lora_dir}"))
    log = capsys.readouterr().out
    assert "base: generated 0 images, 9 from the cache" in log and "lora: generated 0 images" in log
    assert _outputs(out) == (results, details)
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.png")} == stamps
    # a --num_prompts run is a prefix of a longer one: only the new prompts are sampled
    evaluation.main(_args(tiny_pipe_dir, tmp_path / "more", "base", num_prompts=NUM_PROMPTS + 1,
                          cache_dir=out / "cache"))
    assert "base: generated 3 images, 9 from the cache" in capsys.readouterr().out


def test_grid_has_one_row_per_prompt_and_one_column_per_checkpoint(first_run, tiny_pipe_dir, lora_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "grid"
    # the LoRA again under its stem: the same weights key the same cached images
    evaluation.main(_args(tiny_pipe_dir, out, "base", f"lora={lora_dir}", str(lora_dir),
                          cache_dir=first_run[0] / "cache"))
    assert "student: generated 0 images, 9 from the cache" in capsys.readouterr().out
    assert list(json.loads((out / "results.json").read_text())) == ["base", "lora", "student"]
    cell = -(-evaluation.CELL_MIN // 32) * 32  # 32 px scaled up, nearest
    for task in TASKS:
        grid = Image.open(out / f"grid_{task}.png")
        assert grid.size == (3 * cell + 2 * evaluation.GAP,
                             scoring.GRID_HEADER + GRID_PROMPTS * (scoring.GRID_CAPTION + cell))
    grid = Image.open(out / "grid_count.png")
    y0 = scoring.GRID_HEADER + scoring.GRID_CAPTION + 16  # below the score label
    col = lambda c: grid.crop((c * (cell + evaluation.GAP), y0, c * (cell + evaluation.GAP) + cell, y0 + cell - 16))
    assert col(1).tobytes() == col(2).tobytes() != col(0).tobytes()


def test_another_reward_rescores_cached_images(first_run, tiny_pipe_dir, lora_dir, tmp_path, monkeypatch, capsys):
    """A reward without prompts of its own (like pickscore) scores every other task's images, from the cache."""
    import rewards

    def gray(images, prompts, metadata):
        return torch.tensor([np.asarray(im.convert("L")).mean() / 255 for im in images]), [{} for _ in images]
    monkeypatch.setitem(rewards.REWARDS, "gray", gray)
    out = tmp_path / "rescore"
    evaluation.main(_args(tiny_pipe_dir, out, "base", f"lora={lora_dir}", tasks=",".join(TASKS + ["gray"]),
                          cache_dir=first_run[0] / "cache"))
    log = capsys.readouterr().out
    assert "base: generated 0 images, 9 from the cache" in log and "lora: generated 0 images" in log
    results, details = _outputs(out)
    assert {k: {t: v[t] for t in TASKS} for k, v in results.items()} == first_run[1]
    assert results["base"]["gray"]["n"] == len(TASKS) * NUM_PROMPTS and "strict" not in results["base"]["gray"]
    scored = [json.loads(x) for x in details if json.loads(x)["task"] == "gray"]
    assert [r["prompt_task"] for r in scored[:9]] == [t for t in TASKS for _ in range(NUM_PROMPTS)]
    assert "| checkpoint | count | text | clean | gray | average |" in (out / "results.md").read_text()


def test_images_per_prompt_extends_one_image_per_prompt(first_run, tiny_pipe_dir, tmp_path, capsys):
    """k images per prompt, each from its own noise; image 0 is the one-image run's, from the cache."""
    out = tmp_path / "k2"
    evaluation.main(_args(tiny_pipe_dir, out, "base", images_per_prompt=2, cache_dir=first_run[0] / "cache"))
    assert "base: generated 9 images, 9 from the cache" in capsys.readouterr().out
    results, details = _outputs(out)
    rows = [json.loads(line) for line in details]
    count = [r for r in rows if r["task"] == "count"]
    stride = evaluation.SEED_STRIDE
    assert [r["seed"] for r in count] == [0, 1, 2, stride, stride + 1, stride + 2]
    assert [r["prompt"] for r in count[:3]] == [r["prompt"] for r in count[3:]]
    assert count[:3] == [json.loads(x) for x in first_run[2] if json.loads(x)["task"] == "count"][:3]
    for t in TASKS:
        mine = [r["score"] for r in rows if r["task"] == t]
        assert results["base"][t]["n"] == 2 * NUM_PROMPTS
        assert results["base"][t]["mean"] == pytest.approx(sum(mine) / len(mine))
    table = (out / "results.md").read_text()
    assert f"2 images per prompt, the j-th from seed + i + {stride:,} j" in table and "count 3, text 3" in table


def test_vs_reports_the_paired_change_and_its_standard_error(first_run, tiny_pipe_dir, lora_dir, tmp_path, capsys):
    """--vs base: the LoRA's change against the base per task, the mean of per-prompt differences
    (here one image per prompt) with their standard error, from the cached images."""
    out = tmp_path / "vs"
    evaluation.main(_args(tiny_pipe_dir, out, "base", f"lora={lora_dir}", vs="base", cache_dir=first_run[0] / "cache"))
    assert "lora: generated 0 images" in capsys.readouterr().out
    results, details = _outputs(out)
    rows = [json.loads(line) for line in details]
    for t in TASKS:
        assert "vs" not in results["base"][t]
        vs = results["lora"][t]["vs"]
        score = {(r["checkpoint"], r["prompt"]): r["score"] for r in rows if r["task"] == t}
        d = torch.tensor([score[("lora", p)] - score[("base", p)] for c, p in score if c == "base"])
        assert len(d) == NUM_PROMPTS and vs["ckpt"] == "base"
        assert vs["change"] == pytest.approx(results["lora"][t]["mean"] - results["base"][t]["mean"])
        assert vs["se"] == pytest.approx((d.std() / len(d) ** 0.5).item())
    table = (out / "results.md").read_text()
    cells = [f"{results['lora'][t]['vs']['change']:+.3f} ±{results['lora'][t]['vs']['se']:.3f}" for t in TASKS]
    assert "Change against `base` on the same prompts and noise" in table
    assert re.search(r"\| lora \| " + r" \| ".join(r"(\*\*)?" + re.escape(c) + r"(\*\*)?" for c in cells) + r" \|", table)
    with pytest.raises(SystemExit, match="--vs 'nope' is not one of this eval's checkpoints \\(base, lora\\)"):
        evaluation.main(_args(tiny_pipe_dir, tmp_path / "x", "base", f"lora={lora_dir}", vs="nope"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("ckpt,message", [
    ("student=/no/such/lora", r"--ckpt student: /no/such/lora: LoRA checkpoint not found"),
    ("base=/x", "the name 'base' is reserved"),
])
def test_bad_checkpoint_fails_at_startup_with_its_name(tiny_pipe_dir, lora_dir, tmp_path, ckpt, message):
    with pytest.raises(SystemExit, match=message):
        evaluation.main(_args(tiny_pipe_dir, tmp_path / "x", "base", f"ok={lora_dir}", ckpt))
    assert not (tmp_path / "x" / "results.json").exists()


@pytest.mark.filterwarnings("ignore:.*no lora_alpha stored")
def test_bad_checkpoint_file_and_task(tiny_pipe_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="--ckpt junk: "):
        evaluation.main(_args(tiny_pipe_dir, tmp_path / "x", "base", str(junk)))
    wrong = tmp_path / "wrong.pt"  # a LoRA for another architecture: caught against the loaded base
    torch.save({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
                "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)}, wrong)
    with pytest.raises(SystemExit, match="--ckpt other: .*wrong.pt: layer transformer_blocks.0.attn.to_q has LoRA shape"):
        evaluation.main(_args(tiny_pipe_dir, tmp_path / "x", "base", f"other={wrong}"))
    with pytest.raises(SystemExit, match="unknown reward 'nope'"):
        evaluation.main(_args(tiny_pipe_dir, tmp_path / "x", "base", tasks="count,nope"))
    with pytest.raises(SystemExit, match="pickscore' has no built-in prompts"):
        evaluation.main(_args(tiny_pipe_dir, tmp_path / "x", "base", tasks="pickscore"))


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_torchrun_two_ranks_same_numbers(first_run, tiny_pipe_dir, lora_dir, tmp_path):
    out, results, details, _ = first_run
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           str(REPO / "eval.py"), *_args(tiny_pipe_dir, two, "base", f"lora={lora_dir}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("generated 9 images") == 2  # rank 0 alone reports, once per checkpoint
    assert _outputs(two)[0] == results
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "image"} for x in lines]
    assert strip(_outputs(two)[1]) == strip(details)
    for task in TASKS:  # the ranks run 1 thread, this process more: float sums may round a pixel by 1
        a, b = (np.asarray(Image.open(d / f"grid_{task}.png"), dtype=np.int16) for d in (out, two))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_repeated_ckpt_flags():
    import common
    cfg = common.parse_config(evaluation.DEFAULTS, evaluation.PRESETS, ["--ckpt", "base", "--ckpt", "a=X", "b=Y"])
    assert cfg["ckpt"] == ["base", "a=X", "b=Y"]


def test_runs_over_seeds_are_summarised_as_mean_and_range():
    assert evaluation.seed_groups(["base", "opd@s0", "opd@s1", "mix@s0", "a@sx", "solo@s3"]) == \
        {"opd": ["opd@s0", "opd@s1"]}
    res = {"base": {"count": {"mean": 0.1, "n": 2}, "text": {"mean": 0.5, "n": 2}},
           "opd@s0": {"count": {"mean": 0.2, "n": 2}, "text": {"mean": 0.6, "n": 2}},
           "opd@s1": {"count": {"mean": 0.4, "n": 2}, "text": {"mean": 0.4, "n": 2}}}
    cfg = dict(model="m", eval_steps=20, guidance=4.5, resolution=32, seed=0, split="test")
    table = evaluation.results_table(res, cfg, {"count": 2, "text": 2})
    assert "| opd (2 seeds) | 0.300 [0.200-0.400] | 0.500 [0.400-0.600] | 0.400 [0.400-0.400] |" in table
    assert "base (" not in table
    for name, change in (("opd@s0", 0.1), ("opd@s1", 0.3)):  # --vs base: the seeds' paired changes too
        res[name]["count"]["vs"] = {"ckpt": "base", "change": change, "se": 0.04}
        res[name]["text"]["vs"] = {"ckpt": "base", "change": -change, "se": 0.2}
    table = evaluation.results_table(res, cfg, {"count": 2, "text": 2})
    assert "| opd@s0 | **+0.100 ±0.040** | -0.100 ±0.200 |" in table and "| opd@s1 | **+0.300 ±0.040** |" in table
    assert "| opd (2 seeds), mean [min, max] | +0.200 [+0.100, +0.300] | -0.200 [-0.300, -0.100] |" in table
    # a model folder under the working directory is named relative to it (results.md is shipped), others as given
    assert table.startswith("# Eval: m\n")
    inside = dict(cfg, model=str(Path.cwd() / "assets" / "tiny" / "base"))
    assert evaluation.results_table(res, inside, {"count": 2, "text": 2}).startswith("# Eval: assets/tiny/base\n")
    outside = dict(cfg, model="/elsewhere/base")
    assert evaluation.results_table(res, outside, {"count": 2, "text": 2}).startswith("# Eval: /elsewhere/base\n")


def test_scores_per_prompt_tag():
    """A task whose prompts carry several tags is also summarised per tag (GenEval-style); a task
    scoring other tasks' images (pickscore) and a one-tag task are not."""
    rows = [{"task": "count", "row": i, "metadata": {"tag": tag}} for i, tag in enumerate(("single", "single", "position"))] + \
           [{"task": "text", "row": 0, "metadata": {"tag": "text"}}]
    records = [{"job": i, "task": t, "score": s, "info": info} for t, i, s, info in [
        ("count", 0, 1.0, {"strict": True}), ("count", 1, 0.5, {"strict": False}),
        ("count", 2, 0.1, {"strict": False}), ("text", 3, 0.3, {"strict": False}),
        *[("pickscore", i, 0.8 + 0.1 * (i == 3), {}) for i in range(4)]]]
    res = scoring.summarise(records, rows)
    assert res["count"]["tags"] == {"single": {"mean": 0.75, "strict": 0.5, "n": 2, "se": pytest.approx(0.25)},
                                    "position": {"mean": 0.1, "strict": 0.0, "n": 1, "se": 0.0}}
    assert abs(res["count"]["mean"] - 1.6 / 3) < 1e-9 and "tags" not in res["text"] and "tags" not in res["pickscore"]
    # pickscore's prompts are the other tasks' (count's row 0 is not text's row 0): 4 prompts, not 3
    assert res["pickscore"]["se"] == pytest.approx(torch.tensor([0.8, 0.8, 0.8, 0.9]).std().item() / 2)
    cfg = dict(model="m", eval_steps=20, guidance=4.5, resolution=32, seed=0, split="test")
    table = evaluation.results_table({"base": res}, cfg, {"count": 3, "text": 1, "pickscore": 4})
    assert re.search(r"\| base \| 0\.533 ±0\.\d{3} \(0\.333\) \| 0\.300 ±0\.000 \(0\.000\) \|", table), table
    assert "| checkpoint | single (2) | position (1) |" in table
    assert "| base | 0.750 (0.500) | 0.100 (0.000) |" in table


def test_geneval_headline_is_the_mean_of_its_tags_and_failed_reads_are_reported():
    """results.md shows GenEval's official overall (the mean of the per-tag pass rates: (1 + 0) / 2,
    not the pooled 2/3) beside its per-tag table, and counts the images the OCR engine failed on."""
    rows = [{"task": "geneval", "row": i, "metadata": {"tag": t}} for i, t in enumerate(("two_object",) * 2 + ("position",))]
    rows += [{"task": "ocr", "row": i, "metadata": {}} for i in range(2)]
    records = [{"job": j, "task": rows[j]["task"], "score": s, "info": info} for j, s, info in [
        (0, 1.0, {"strict": True}), (1, 1.0, {"strict": True}), (2, 0.2, {"strict": False}),
        (3, 0.9, {"strict": False, "failed": False}), (4, 0.0, {"strict": False, "failed": True})]]
    res = scoring.summarise(records, rows)
    assert res["geneval"]["strict"] == 0.5 and res["geneval"]["strict_pooled"] == pytest.approx(2 / 3)
    assert res["ocr"]["failed"] == 1 and "failed" not in res["geneval"]
    cfg = dict(model="m", eval_steps=20, guidance=4.5, resolution=32, seed=0, split="test")
    table = evaluation.results_table({"base": res}, cfg, {"geneval": 3, "ocr": 2})
    assert re.search(r"\| base \| \S+ ±\S+ \(0\.500\) \|", table), table
    assert "| base | 1.000 (1.000) | 0.200 (0.000) |" in table
    assert "Images the OCR engine failed on, scored 0 (checkpoint, task, images): base ocr 1." in table


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_readme_teachers_command_on_shipped_checkpoints(tmp_path):
    """docs/results.md's stage-1 table command, as written there, with 2 ODE steps instead of 20 and
    1 image per prompt instead of the preset's 4 (test_images_per_prompt_* covers several): every
    shipped teacher, GRPO-Mix and the merge on every task, and the count table per prompt tag."""
    text = (REPO / "docs" / "results.md").read_text()
    line = re.search(r"^ +(python eval\.py --preset tiny --ckpt base --ckpt count=assets/tiny/count .*?--out runs/teachers)$",
                     text.replace("\\\n", " "), re.M).group(1)
    args = shlex.split(line)[2:]
    args[args.index("--out") + 1] = str(tmp_path / "teachers")
    evaluation.main(args + ["--eval_steps", "2", "--batch_size", "64", "--images_per_prompt", "1"])
    results = json.loads((tmp_path / "teachers" / "results.json").read_text())
    assert list(results) == ["base", "count", "text", "clean", "grpo_mix", "merge"]
    assert all(set(r) == {"count", "text", "clean"} for r in results.values())
    assert all(r["count"]["n"] == 64 and r["clean"]["n"] == 32 for r in results.values())
    assert all(set(r["count"]["tags"]) == {"single", "counting", "two_object", "position"} for r in results.values())
    table = (tmp_path / "teachers" / "results.md").read_text()
    assert "count 64, text 64, clean 32" in table
    assert "| checkpoint | single (8) | counting (16) | two_object (20) | position (20) |" in table


def test_shipped_checkpoints_name_no_machine_paths():
    """A shipped run's config must load on any clone: its base is named relative to the repo."""
    for cfg in sorted((REPO / "assets" / "tiny").glob("*/config.json")):
        model = json.loads(cfg.read_text()).get("model")
        if model is not None:
            assert not Path(model).is_absolute(), f"{cfg.relative_to(REPO)}: model {model!r}"


def test_bare_paths_are_named_after_their_run():
    """A run's final/ and checkpoint-N/ go by the run's name, so a run's checkpoints sit side by side."""
    from eval import parse_checkpoints
    got = parse_checkpoints(["base", "runs/opd/final/", "runs/opd/checkpoint-000200", "x/merge.safetensors"])
    assert got == {"base": None, "opd": "runs/opd/final/", "opd_200": "runs/opd/checkpoint-000200",
                   "merge": "x/merge.safetensors"}


@pytest.fixture
def fake_aesthetic(monkeypatch):
    """The aesthetic metric replaced by a model-free stand-in with the real one's shape of output:
    a [0, 1] score and its published value (here the mean pixel, 0-255) in info["aesthetic"]."""
    import rewards

    def brightness(images, prompts=None, metadata=None):
        raw = torch.tensor([np.asarray(im, np.float32).mean() for im in rewards.to_pil(images)])
        return raw / 255, [{"aesthetic": float(r)} for r in raw]
    monkeypatch.setitem(rewards.REWARDS, "aesthetic", brightness)
    monkeypatch.setattr(evaluation, "preload", lambda names: None)
    return lambda path: np.asarray(Image.open(path), np.float32).mean()


def test_metrics_score_every_prompt_set_on_their_published_scale(tiny_pipe_dir, tmp_path, fake_aesthetic):
    """--metrics: every image of every prompt set scored on the metric's own scale, over all and
    per set; a prompt set with no reward of its name (drawbench) is scored by the metrics alone;
    --images_per_prompt TASK=K; the average column leaves the metrics out."""
    (tmp_path / "drawbench.txt").write_text("a photo of a cat\na red car\n")
    out = tmp_path / "e"
    results = evaluation.main(_args(tiny_pipe_dir, out, "base", tasks="count,drawbench", num_prompts=2,
                                    metrics="aesthetic", images_per_prompt="count=2")
                              + ["--prompts", f"drawbench={tmp_path / 'drawbench.txt'}"])
    res = results["base"]
    assert set(res) == {"count", "aesthetic"}
    details = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    metric = [d for d in details if d["task"] == "aesthetic"]
    assert len(metric) == 2 * 2 + 2  # count: 2 prompts x 2 images; drawbench: 2 x 1
    for d in metric:  # the published value, read off the image itself
        assert d["score"] == pytest.approx(fake_aesthetic(d["image"]), rel=1e-5)
    assert res["aesthetic"]["mean"] == pytest.approx(np.mean([d["score"] for d in metric]), rel=1e-6)
    assert {s: v["n"] for s, v in res["aesthetic"]["sets"].items()} == {"count": 4, "drawbench": 2}
    assert res["count"]["n"] == 4 and "sets" not in res["count"]
    table = (out / "results.md").read_text()
    assert "`aesthetic` per prompt set" in table and "images per prompt count 2, drawbench 1" in table
    row = next(line for line in table.splitlines() if line.startswith("| base |"))
    assert row.endswith(f"| {res['count']['mean']:.3f} |")  # the average: the rewards' mean only


@pytest.mark.parametrize("over,message", [
    (dict(metrics="nope"), "unknown --metrics 'nope'"),
    (dict(tasks="count,pickscore", metrics="pickscore"), "'pickscore' is both a task and a metric"),
    (dict(tasks="count,drawbench"), "unknown reward 'drawbench'"),
    (dict(images_per_prompt="text=2"), "--images_per_prompt 'text=2': 'text' is not one of --tasks"),
    (dict(images_per_prompt="0"), "--images_per_prompt '0': the number of images must be a whole number >= 1"),
])
def test_bad_metrics_and_images_per_prompt(tiny_pipe_dir, tmp_path, over, message):
    args = _args(tiny_pipe_dir, tmp_path / "e", "base", **{"tasks": "count", **over})
    if "drawbench" in over.get("tasks", ""):
        (tmp_path / "d.txt").write_text("a cat\n")
        args += ["--prompts", f"drawbench={tmp_path / 'd.txt'}"]
    with pytest.raises(SystemExit, match=re.escape(message)):
        evaluation.main(args)


def test_periodic_evals_score_the_metrics_too(tiny_pipe_dir, tmp_path, fake_aesthetic, monkeypatch):
    """--metrics in a training stage: its periodic evals log each metric over every eval image."""
    import opd_distill
    from test_opd_distill import _args as opd_args, _lora
    monkeypatch.setattr(rewards, "preload", lambda names: None)  # common.start_run fetches through it
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=3)
    opd_distill.main(opd_args(tiny_pipe_dir, tmp_path / "run", [f"count={tmp_path / 'count'}"], max_steps=1,
                              eval_every=1, metrics="aesthetic", eval_tasks="count,text"))
    evals = [json.loads(line)["eval"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"eval"' in line]
    assert len(evals) == 2 and all(set(e) == {"count", "text", "aesthetic"} for e in evals)
    assert set(evals[0]["aesthetic"]["sets"]) == {"count", "text"} and evals[0]["aesthetic"]["mean"] > 1
