"""Flow-GRPO: the advantage and loss maths, learning against an lr=0 control, resume, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sde_sampler
import teacher_grpo
from sde_sampler import group_advantages, ppo_loss

REPO = Path(__file__).resolve().parents[1]


def test_group_advantages():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, global_std=True, clip=5.0)
    std = r.std()
    torch.testing.assert_close(adv[:3], (r[:3] - 3.0) / (std + 1e-4))
    assert torch.equal(adv[3:], torch.zeros(3))  # a group with no spread: zero, not NaN
    per = group_advantages(r, g, global_std=False, clip=5.0)
    torch.testing.assert_close(per[:3], (r[:3] - 3.0) / (r[:3].std() + 1e-4))
    assert torch.isfinite(per).all() and torch.equal(per[3:], torch.zeros(3))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), False, 1.0)
    assert clipped.max() == 1.0 and clipped.min() >= -1.0


def test_ppo_loss_clips_only_the_profitable_side():
    old = torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    loss, frac = ppo_loss(torch.zeros(2, requires_grad=True), old, adv, 0.1)
    assert loss.item() == 0.0 and frac.item() == 0.0
    # ratio 2 on a positive advantage: clipped at 1.1 (no incentive to push further)
    lp = torch.log(torch.tensor([2.0, 2.0])).requires_grad_()
    loss, frac = ppo_loss(lp, old, adv, 0.1)
    assert abs(loss.item() - (-1.1 + 2.0) / 2) < 1e-6 and frac.item() == 1.0
    loss.backward()
    assert lp.grad[0] == 0 and lp.grad[1] > 0


def _args(pipe_dir, out, prompts, **over):
    cfg = dict(model=str(pipe_dir), reward="brightness", prompts=str(prompts), out=str(out), resolution=32,
               num_steps=3, eval_steps=3, group_size=4, prompts_per_step=2, batch_size=8, updates_per_step=1,
               lr=3e-2, lora_rank=4, lora_alpha=4, max_steps=4, eval_every=4, eval_tasks="brightness",
               eval_prompts=4, save_every=2, beta=0.0, clip_range=0.2, ema_decay=0.0, seed=0)
    cfg.update(over)
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\na blue square\na green triangle\nthe text \"a3\"\n")
    return p


def _evals(out):
    return [r["eval"]["brightness"]["mean"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "eval" in r]


@pytest.mark.slow  # 12 s of training against a control: .ci/run runs it after the README's command
def test_grpo_raises_reward_and_lr_zero_does_not(tiny_pipe_dir, tmp_path, prompt_file, capsys):
    teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "learn", prompt_file))
    assert f"note: {prompt_file} is one file, so the periodic evals score training prompts" in capsys.readouterr().out
    teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "control", prompt_file, lr=0.0))
    learn, control = _evals(tmp_path / "learn"), _evals(tmp_path / "control")
    assert learn[0] == control[0]  # same seeds, same start
    assert control[-1] == control[0]
    assert learn[-1] > learn[0] + 0.05, learn
    assert (tmp_path / "learn" / "final" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((tmp_path / "learn" / "config.json").read_text())["lr"] == 3e-2


@pytest.mark.slow  # 12 s: .ci/run runs it after the README's command (tests/test_scale.py resumes OPD bit for bit)
def test_resume_continues_with_identical_state(tiny_pipe_dir, tmp_path, prompt_file, monkeypatch):
    """Killed after step 2 and resumed: the same weights, optimizer state and log as one run.
    The interrupted run also logs to W&B (offline): its records reach the W&B run, the resumed
    process continues that run, and logging changes no weight."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    full, part = tmp_path / "full", tmp_path / "part"
    teacher_grpo.main(_args(tiny_pipe_dir, full, prompt_file, max_steps=3, save_every=1, eval_every=0))
    teacher_grpo.main(_args(tiny_pipe_dir, part, prompt_file, max_steps=2, save_every=1, eval_every=0, wandb="t"))
    state2 = torch.load(part / "checkpoint-000002" / "training_state.pt", weights_only=True)
    teacher_grpo.main(_args(tiny_pipe_dir, part, prompt_file, max_steps=3, save_every=1, eval_every=0, wandb="t")
                      + ["--resume"])
    run_id = (part / "wandb_id").read_text()
    logs = sorted((part / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)  # one W&B run, twice opened
    assert all(b"policy_loss" in p.read_bytes() and b"reward_brightness" in p.read_bytes() for p in logs)
    assert not (full / "wandb").exists()
    a = load_file(str(full / "checkpoint-000003" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "checkpoint-000003" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full / "checkpoint-000003" / "training_state.pt", weights_only=True)
    sb = torch.load(part / "checkpoint-000003" / "training_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 3 and state2["step"] == 2
    ea, eb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(ea[i]["exp_avg_sq"], eb[i]["exp_avg_sq"]) for i in ea)
    steps = [r["step"] for r in map(json.loads, open(part / "metrics.jsonl")) if "reward" in r]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("over,message", [
    (dict(reward="nonsense"), "unknown reward 'nonsense'; valid rewards:"),
    (dict(batch_size=3), "--batch_size 3 does not divide the 8 images per rank"),
    (dict(group_size=1, batch_size=2), "--group_size must be at least 2"),
])
def test_startup_errors(tiny_pipe_dir, tmp_path, prompt_file, over, message):
    with pytest.raises(SystemExit, match=message):
        teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "x", prompt_file, **over))


def test_startup_errors_on_files(tiny_pipe_dir, tmp_path, prompt_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="empty.txt: no prompts"):
        teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "x", empty))
    bad = tmp_path / "ocr.txt"
    bad.write_text("a sign saying \"hi\"\na sign with no quotes\n")
    with pytest.raises(SystemExit, match=r"ocr.txt:2: OCR prompt has no quoted text"):
        teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "x", bad, reward="ocr"))
    teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "done", prompt_file, max_steps=1, save_every=1, eval_every=0))
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "done", prompt_file, max_steps=1))


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_torchrun_two_ranks_identical_weights(tiny_pipe_dir, tmp_path, prompt_file):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(REPO / "teacher_grpo.py"), *_args(tiny_pipe_dir, out, prompt_file, max_steps=2, save_every=100,
                                                 eval_every=0, prompts_per_step=2, batch_size=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    # the script compares every rank's weights with rank 0's (broadcast, exact) before it exits
    assert "ranks in sync: 2 ranks hold identical LoRA weights" in res.stdout
    final = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # it trained
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2]  # rank 0 alone logs


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    import common
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="local rank 1 but only 1 GPU"):
        common.setup_dist()


def test_wandb_without_the_package_is_a_clear_error(tiny_pipe_dir, tmp_path, prompt_file, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "x", prompt_file, wandb="proj"))
    assert "--wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unreachable_models_are_one_line_errors_at_startup(tiny_pipe_dir, tmp_path, prompt_file, monkeypatch, capsys):
    """Offline (the tests set HF_HUB_OFFLINE), a hub-only reward in --eval_tasks stops the run
    before the pipeline loads, naming the reward and its models; an unloadable model, and
    SD3.5-M itself, stop it in one line too."""
    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline was loaded before the reward was checked")
    monkeypatch.setattr(sde_sampler, "load_policy", no_pipeline)  # common.start_run loads the base through it
    with pytest.raises(SystemExit, match=r"^error: reward 'geneval' cannot load facebook/mask2former-swin-small"
                                         r"-coco-instance and openai/clip-vit-large-patch14 \(.*leave geneval out"):
        teacher_grpo.main(_args(tiny_pipe_dir, tmp_path / "x", prompt_file, eval_tasks="brightness,geneval"))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"^error: cannot load the model '.*nope': \w+Error"):
        teacher_grpo.main(_args(tmp_path / "nope", tmp_path / "y", prompt_file))
    with pytest.raises(SystemExit, match=r"^error: cannot load the model 'stabilityai/stable-diffusion-3.5-medium'.*"
                                         r"gated.*--model FOLDER"):
        teacher_grpo.main(_args("stabilityai/stable-diffusion-3.5-medium", tmp_path / "z", prompt_file))
    assert "\n" not in capsys.readouterr().err.strip()
