"""What only shows at SD3.5-M's size or on many ranks, fought on tiny models: random streams that
never collide across ranks, steps and seeds; the VAE decoding a rollout in micro-batches; the pg
loss without anchor rows; gradient checkpointing; ranks compared from the start; checkpoints
that hold the EMA; and eight ranks (one node and two) under torchrun."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import opd_distill
import sde_sampler
import sft_coldstart
import teacher_grpo
from lora import add_student, save_adapter
from sde_sampler import load_policy

REPO = Path(__file__).resolve().parents[1]


def flags(**kw):
    return [x for k, v in kw.items() for x in ([f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)])]


def _opd_flags(pipe_dir, out, teachers, **over):
    cfg = dict(model=pipe_dir, out=out, resolution=32, num_steps=3, eval_steps=3, group_size=2, prompts_per_step=2,
               batch_size=4, lr=1e-3, max_steps=2, eval_every=0, eval_tasks="count,text", save_every=1, beta_mar=0.04,
               lora_rank=4, lora_alpha=4, ema_decay=0.5, teachers=teachers)
    return flags(**{**cfg, **over})


@pytest.fixture(scope="module")
def two_teachers(tiny_pipe_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    policy = load_policy(str(tiny_pipe_dir), device="cpu")
    params = add_student(policy, rank=4, alpha=4)
    for k, task in enumerate(("count", "text")):
        torch.manual_seed(5 + k)
        with torch.no_grad():
            for p in params:
                p.normal_(std=0.1)
        save_adapter(policy, "student", d / task)
    return [f"count={d / 'count'}", f"text={d / 'text'}"]


def _lora(folder):
    return load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))


# -----------------------------------------------------------------------------
# seeds

@pytest.mark.slow  # 4 s of hashing 1.8 million keys: .ci/run runs it after the README's command
def test_random_streams_never_collide_across_ranks_steps_seeds_and_purposes():
    # the old linear seeds collided: rank r + 31 at step s drew rank r's prompts of step s + 1
    old = {s * 7_919 + step * 31 + r for s in range(3) for step in range(200) for r in range(1024)}
    assert len(old) < 3 * 200 * 1024
    keys = [(s, step, r) for s in range(3) for step in range(200) for r in range(1024)]
    seen = set()
    for purpose in ("prompts", "noise", "shuffle"):
        seeds = {common.stream_seed(purpose, *k) for k in keys}
        assert len(seeds) == len(keys), purpose  # no two (seed, step, rank) share a stream
        assert not seeds & seen  # nor two purposes
        seen |= seeds
    # and the draws themselves: the pairs that collided before now draw different prompts and noise
    rows = [{"prompt": str(i)} for i in range(10_000)]
    for r, step in [(0, 0), (5, 17), (900, 199)]:
        assert common.sample_rows(rows, 16, 0, step, r + 31) != common.sample_rows(rows, 16, 0, step + 1, r)
        a = torch.randn(8, generator=common.step_generator("cpu", 1, step, r))
        b = torch.randn(8, generator=common.step_generator("cpu", 0, step + 1, r))
        assert not torch.equal(a, b)
    # a stream is a function of its key alone: a resumed run redraws the same
    assert common.sample_rows(rows, 16, 2, 7, 3) == common.sample_rows(rows, 16, 2, 7, 3)


# -----------------------------------------------------------------------------
# the VAE decodes GRPO's rollout in micro-batches, not in one call

def test_grpo_decodes_its_rollout_in_micro_batches(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from tools.sd35_miniature import build_sd35_miniature
    build_sd35_miniature(tmp_path / "mini")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dog\na blue cat\n")
    sizes, decode = [], AutoencoderKL.decode
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z, **k: sizes.append(len(z)) or decode(self, z, **k))
    teacher_grpo.main(flags(model=tmp_path / "mini", reward="brightness", prompts=prompts, out=tmp_path / "grpo",
                            resolution=64, t5_tokens=8, num_steps=2, group_size=4, prompts_per_step=2, batch_size=2,
                            updates_per_step=1, max_steps=1, eval_every=0, lora_rank=4, lora_alpha=4))
    assert sizes == [2, 2, 2, 2]  # 8 images, 2 per call


# -----------------------------------------------------------------------------
# --loss pg with gamma > 0 and no anchor: the first pass has nothing to differentiate

def test_pg_with_returns_and_no_anchor_trains(tiny_pipe_dir, tmp_path, two_teachers):
    out = tmp_path / "pg"
    opd_distill.main(_opd_flags(tiny_pipe_dir, out, two_teachers, loss="pg", gamma=0.9, beta_mar=0.0, max_steps=1))
    rec = json.loads((out / "metrics.jsonl").read_text())
    assert rec["grad_norm"] > 0 and rec["mar_kl"] == 0


# -----------------------------------------------------------------------------
# gradient checkpointing: the same step, with the blocks recomputed in the backward

def _stage_run(stage, pipe_dir, out, teachers, checkpointing):
    if stage == "opd":
        opd_distill.main(_opd_flags(pipe_dir, out, teachers, gradient_checkpointing=checkpointing, max_steps=1))
    elif stage == "grpo":
        prompts = out.parent / "prompts.txt"
        prompts.write_text("a red circle\na blue square\n")
        teacher_grpo.main(flags(model=pipe_dir, reward="brightness", prompts=prompts, out=out, resolution=32,
                                num_steps=3, group_size=4, prompts_per_step=2, batch_size=4, updates_per_step=1,
                                max_steps=1, eval_every=0, lora_rank=4, lora_alpha=4, beta=0.04, lr=3e-2,
                                gradient_checkpointing=checkpointing))
    else:
        sft_coldstart.main(flags(model=pipe_dir, out=out, teachers=teachers, resolution=32, samples_per_task=2,
                                 sample_steps=2, batch_size=4, lr=1e-2, lora_rank=4, lora_alpha=4, max_steps=1,
                                 probe_every=0, probe_samples=2, gradient_checkpointing=checkpointing))
    return _lora(out / "final")


# OPD and GRPO take 3-5 s each: slow-marked, .ci/run runs them after the README's command
@pytest.mark.parametrize("stage", [pytest.param("opd", marks=pytest.mark.slow), pytest.param("grpo", marks=pytest.mark.slow),
                                   "sft"])
def test_gradient_checkpointing_gives_the_same_step(stage, tiny_pipe_dir, tmp_path, two_teachers, monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    plain = _stage_run(stage, tiny_pipe_dir, tmp_path / "plain", two_teachers, False)
    assert not calls
    recomputed = _stage_run(stage, tiny_pipe_dir, tmp_path / "ckpt", two_teachers, True)
    assert calls  # the blocks did go through torch's checkpoint
    assert plain.keys() == recomputed.keys()
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


# -----------------------------------------------------------------------------
# on CUDA, a stage estimates its peak memory before it loads anything, and refuses a run that cannot fit

class Loaded(Exception):
    pass


@pytest.mark.parametrize("stage", [pytest.param("opd", marks=pytest.mark.slow), pytest.param("grpo", marks=pytest.mark.slow),
                                   "sft"])
def test_a_stage_on_cuda_checks_the_estimate_against_free_memory_first(stage, tiny_pipe_dir, tmp_path, two_teachers,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr(common, "setup_dist", lambda: (0, 1, torch.device("cuda")))

    def load_policy(*a, **k):
        raise Loaded  # the model would now move to the GPU
    monkeypatch.setattr(sde_sampler, "load_policy", load_policy)  # common.start_run loads the base through it
    for free, outcome in [(2 ** 20, SystemExit), (80 * 2 ** 30, Loaded)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2 ** 30))
        with pytest.raises(outcome) as caught:
            _stage_run(stage, tiny_pipe_dir, tmp_path / f"{stage}{free}", two_teachers, False)
        printed = capsys.readouterr().out
        assert re.search(r"estimated peak [\d.]+ GiB \(weights .*\) of [\d.]+ GiB free", printed), printed
        if outcome is SystemExit:  # 1 MiB: not even the weights fit
            assert str(caught.value).startswith("error: --batch_size") and "\n" not in str(caught.value)


# -----------------------------------------------------------------------------
# checkpoints hold the EMA as their LoRA, the live weights in their training state

def test_a_checkpoint_is_what_final_would_have_been(tiny_pipe_dir, tmp_path, two_teachers):
    out = tmp_path / "opd"
    opd_distill.main(_opd_flags(tiny_pipe_dir, out, two_teachers, max_steps=2, save_every=1))
    final, last = _lora(out / "final"), _lora(out / "checkpoint-000002")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    state = torch.load(out / "checkpoint-000002" / "training_state.pt", weights_only=True)
    ema = torch.cat([e.reshape(-1) for e in state["ema"]])
    live = torch.cat([p.reshape(-1) for p in state["live"]])
    assert not torch.equal(ema, live)  # at ema_decay 0.5 the two differ, and the folder holds the EMA
    assert sorted(torch.cat([v.reshape(-1) for v in last.values()]).tolist()) == sorted(ema.tolist())
    # resumed from step 1 (its live weights, not its EMA folder): the straight run's result, bit for bit
    cut = tmp_path / "cut"
    opd_distill.main(_opd_flags(tiny_pipe_dir, cut, two_teachers, max_steps=1, save_every=1))
    opd_distill.main(_opd_flags(tiny_pipe_dir, cut, two_teachers, max_steps=2, save_every=1) + ["--resume"])
    resumed = _lora(cut / "final")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


# -----------------------------------------------------------------------------
# many ranks under torchrun (gloo, one thread each)

# Runs opd_distill's main under torchrun, recording what each rank drew; PERTURB_RANK=k makes rank
# k's student start differently (what a rank that read another --init would do).
LAUNCHER = '''
import json, os, sys, torch
sys.path.insert(0, {repo!r})
import common, opd_distill
rank, out = int(os.environ["RANK"]), sys.argv[sys.argv.index("--out") + 1]
import lora
sample_rows, step_generator, add_student = common.sample_rows, common.step_generator, lora.add_student

def log(kind, value):
    with open(os.path.join(out, f"draws.{{rank}}.jsonl"), "a") as f:
        f.write(json.dumps([kind, value]) + "\\n")

def rows(*a, **k):
    picked = sample_rows(*a, **k)
    log("prompts", [r["prompt"] for r in picked])
    return picked

def generator(*a, **k):
    g = step_generator(*a, **k)
    copy = torch.Generator()
    copy.set_state(g.get_state())
    log("noise", torch.randn(4, generator=copy).tolist())
    return g

def student(*a, **k):
    params = add_student(*a, **k)
    if rank == int(os.environ.get("PERTURB_RANK", -1)):
        with torch.no_grad():
            params[0].add_(1e-3)
    return params

os.makedirs(out, exist_ok=True)
common.sample_rows, common.step_generator, lora.add_student = rows, generator, student
opd_distill.main(sys.argv[1:])
'''


def _torchrun(tmp_path, args, nproc, port, env=None, nodes=1):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nodes}",
            "--master_addr=127.0.0.1", f"--master_port={port}"]
    procs = [subprocess.Popen(base + [f"--node_rank={k}", str(script), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for k in range(nodes)]
    outputs = [p.communicate(timeout=900) for p in procs]
    return [(p.returncode, stdout, stderr) for p, (stdout, stderr) in zip(procs, outputs)]


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_a_rank_that_starts_differently_stops_the_run_before_training(tiny_pipe_dir, tmp_path, two_teachers):
    out = tmp_path / "run"
    (rc, stdout, stderr), = _torchrun(tmp_path, _opd_flags(tiny_pipe_dir, out, two_teachers, batch_size=2, max_steps=3),
                                      nproc=2, port=29561, env={"PERTURB_RANK": "1"})
    assert rc != 0
    assert "ranks hold different weights at the start (step 0)" in stderr
    assert not (out / "metrics.jsonl").exists()  # stopped before the first step, not after the last


def _draws(out, world):
    by_rank = [[json.loads(line) for line in open(out / f"draws.{r}.jsonl")] for r in range(world)]
    return ([[v for k, v in d if k == "prompts"] for d in by_rank], [[v for k, v in d if k == "noise"] for d in by_rank])


@pytest.mark.slow  # eight processes on two cores: about a minute each
@pytest.mark.parametrize("nodes", [1, 2])
def test_eight_ranks_draw_apart_and_end_identical(nodes, tiny_pipe_dir, tmp_path, two_teachers):
    """8 ranks, on one node or on two simulated ones (two torchrun launchers of 4 on this machine):
    every rank draws its own prompts and noise at every step, and all end with the same weights."""
    out = tmp_path / "run"
    runs = _torchrun(tmp_path, _opd_flags(tiny_pipe_dir, out, two_teachers, prompts_per_step=16, group_size=2,
                                          batch_size=2, max_steps=2, save_every=100),
                     nproc=8 // nodes, port=29563 + nodes, nodes=nodes)
    for rc, stdout, stderr in runs:
        assert rc == 0, stderr[-3000:]
    assert "ranks in sync: 8 ranks hold identical LoRA weights" in "".join(s for _, s, _ in runs)
    prompts, noise = _draws(out, 8)
    assert all(len(p) == 2 and len(n) == 2 for p, n in zip(prompts, noise))  # 2 steps each
    for step in range(2):
        assert len({json.dumps(p[step]) for p in prompts}) == 8  # no two ranks drew the same prompts
        assert len({json.dumps(n[step]) for n in noise}) == 8    # nor the same noise
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
