"""Stage 0: pretraining the tiny base (against an lr-0 control), its saved folder, its command
line and report, and the shipped base."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny.pretrain as pt
import tiny.world as tw

# -----------------------------------------------------------------------------
# the tiny base: pretraining and the shipped checkpoint

TINY = dict(num_layers=1, heads=2, head_dim=16, text_dim=16, text_layers=1)


def test_pretraining_lowers_loss_against_lr0_control(tmp_path):
    """Same seed, hence the same batches, noise and timesteps: training must beat the frozen
    model on the last steps, and improve on its own first steps."""
    _, trained = pt.pretrain(tmp_path / "base", steps=30, batch_size=8, lr=3e-3, seed=0, model=TINY,
                             warmup=5, progress=False)
    _, control = pt.pretrain(None, steps=30, batch_size=8, lr=0.0, seed=0, model=TINY, warmup=5,
                             progress=False)
    assert trained[0] == control[0]
    assert np.mean(trained[-10:]) < 0.7 * np.mean(control[-10:])
    assert np.mean(trained[-10:]) < 0.7 * np.mean(trained[:5])


def test_pretrained_folder_loads_and_encodes_as_trained(tmp_path):
    from sde_sampler import encode, load_policy
    pipe, losses = pt.pretrain(tmp_path / "base", steps=3, batch_size=4, lr=1e-3, seed=1, model=TINY,
                               progress=False)
    assert losses == pt.pretrain(None, steps=3, batch_size=4, lr=1e-3, seed=1, model=TINY, progress=False)[1]
    policy = load_policy(str(tmp_path / "base"), device="cpu", t5_tokens=tw.SAMPLING["t5_tokens"])
    prompts = [tw.prompt_set(t, "test")[0]["prompt"] for t in tw.TASKS] + [""]
    with torch.no_grad():
        want = pt.embed_prompts(pipe, prompts)
    got = encode(policy, prompts)[:2]
    for a, b in zip(got, want):  # the returned pipe holds the saved (fp16-rounded) weights
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_flaws_start_at_flaw_from():
    """Pretraining is faithful up to step flaw_from and draws flawed renders after it: the same
    losses as a run without flaws until then, and other losses after."""
    kw = dict(steps=3, batch_size=4, lr=1e-3, seed=1, model=TINY, flaw_rate=1.0, progress=False)
    late, never = pt.pretrain(None, flaw_from=2, **kw)[1], pt.pretrain(None, flaw_from=3, **kw)[1]
    assert late[:2] == never[:2] and late[2] != never[2]


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_pretraining_command_writes_base_report_and_snapshot(tmp_path):
    """docs/tinyworld.md's pretraining command, cut to 3 steps with the flaws from step 1, a snapshot
    after step 2 and 2 ODE steps in the report: both folders get a scores file (with every task's flawed share) and a grid, and
    each records the command that regenerates it."""
    out = tmp_path / "base"
    pt.main(["--out", str(out), "--steps", "3", "--flaw_from", "1", "--snapshots", "2", "--eval_steps", "2"])
    for steps, folder in ((3, out), (2, f"{out}_step2")):
        record = json.loads(Path(f"{folder}_scores.json").read_text())
        assert record["command"] == f"python -m tiny.pretrain --out {out} --steps {steps} --seed 0 --flaw_from 1"
        assert all(0 <= record["scores"][t]["flawed"] <= 1 for t in tw.TASKS)
        assert Image.open(f"{folder}_grid.png").size[0] > 8 * tw.SIZE
        assert (Path(folder) / "model_index.json").exists()


def test_shipped_base_loads_samples_and_is_mediocre():
    """assets/tiny/base is what --preset tiny loads: it samples deterministically, its samples are
    pictures (not noise, not blank), and its recorded test scores leave GRPO something to fix."""
    from sde_sampler import decode, initial_noise, load_policy, resolve_model, rollout
    path = resolve_model("", "tiny")
    policy = load_policy(path, device="cpu", t5_tokens=tw.SAMPLING["t5_tokens"])
    rows = [r for t in tw.TASKS for r in tw.prompt_set(t, "test")[:2]]

    def sample():
        x = initial_noise(policy, range(len(rows)))
        out = rollout(policy, [r["prompt"] for r in rows], tw.SAMPLING["eval_steps"], tw.SAMPLING["guidance"], 0.0,
                      latents=x)
        return decode(policy, out["latents"])

    images = sample()
    assert [im.size for im in images] == [(tw.SIZE, tw.SIZE)] * len(rows)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, sample()))
    clean, _ = tw.clean_reward(images, None, None)
    noise, _ = tw.clean_reward(decode(policy, initial_noise(policy, range(len(rows)))), None, None)
    assert noise.mean() < 0.05 and clean.mean() > 0.15  # flat colours on a light ground, unlike decoded noise
    report = json.loads((Path(path).parent / "base_scores.json").read_text())
    assert report["scores"]["clean"]["mean"] < 0.95
    assert all(0.2 <= report["scores"][t]["mean"] <= 0.7 for t in ("count", "text"))  # the tiny-world issue's band
