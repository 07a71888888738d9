"""A CFG-free student (opd_distill.py --student_guidance 1): its loss and gradient are the
conditional velocity's against the guided labels, and eval.py samples it at the guidance it records."""
import json

import numpy as np

import pytest
import torch
from PIL import Image

import eval as evaluation
import opd_distill
import scoring
from lora import load_adapter
from opd_distill import distill_micro_batch
from sde_sampler import encode, sd3_sigmas, sde_step, transition_kl, using_adapter, velocity
from test_opd_distill import _lora


def _conditional_velocity(policy, x, sigma, cond):
    """The transformer on the prompt's embeddings alone, written out: no unconditional half."""
    e, p, _, _ = cond
    t = torch.full((len(x),), sigma * 1000)
    return policy.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p,
                              return_dict=False)[0].float()


@pytest.mark.slow  # 7 s: .ci/run runs it after the README's command
def test_cfg_free_loss_and_gradient_equal_a_direct_computation(policy, tmp_path):
    for k, name in enumerate(["count", "text", "anchor"]):
        _lora(policy, tmp_path / name, seed=40 + k, std=0.1)
        load_adapter(policy, tmp_path / name, name)
    params = _lora(policy, tmp_path / "init", seed=50, std=0.05)
    cfg = dict(noise_level=0.7, kl_weighting="velocity", loss="pathwise", beta_mar=0.3, clip_range=1e-4, gamma=0.0,
               guidance=4.5, student_guidance=1.0, mar_every=1)
    prompts, routed = ["a red circle", 'the text "ab"', "two blue squares"], ["count", "text", "count"]
    sig = sd3_sigmas(policy.pipe.scheduler.config, 4)

    def one_pass(c):
        for p in params:
            p.grad = None
        kl, mar = distill_micro_batch(policy, prompts, routed, "anchor", sig, 3, torch.Generator().manual_seed(7),
                                      c, 0.5)
        return torch.cat([p.grad.reshape(-1).clone() for p in params]), kl, mar

    got, kl_got, mar_got = one_pass(cfg)

    # by hand: the student's conditional velocity, the routed teachers' and the anchor's at CFG 4.5,
    # the rollout stepped by the conditional velocity from the same noise
    for p in params:
        p.grad = None
    gen = torch.Generator().manual_seed(7)
    cond = encode(policy, prompts)
    x = torch.randn((3, *policy.latent_shape), generator=gen)
    kls, mars = [], []
    for j in range(3):
        s, s_next = sig[j].item(), sig[j + 1].item()
        with torch.no_grad():
            v_t = torch.empty_like(x)
            for i, name in enumerate(routed):
                with using_adapter(policy, name):
                    v_t[i:i + 1] = velocity(policy, x[i:i + 1], s, tuple(c[i:i + 1] for c in cond), 4.5)
            with using_adapter(policy, "anchor"):
                v_a = velocity(policy, x, s, cond, 4.5)
        v = _conditional_velocity(policy, x, s, cond)
        kl = transition_kl(v, v_t, s, s_next, 0.7, "velocity")
        mar = transition_kl(v, v_a, s, s_next, 0.7, "velocity")
        ((kl.mean() + 0.3 * mar.mean()) * 0.5).backward()
        kls.append(kl.detach())
        mars.append(mar.detach())
        x = sde_step(v.detach(), x, s, s_next, 0.7, generator=gen)[0]
    want = torch.cat([p.grad.reshape(-1).clone() for p in params])
    assert want.abs().max() > 0
    torch.testing.assert_close(kl_got, torch.stack(kls, 1), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(mar_got, torch.stack(mars, 1), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)

    # the control: the guided student (the default, 0 = --guidance) learns another gradient
    guided, _, _ = one_pass({**cfg, "student_guidance": 0.0})
    assert (guided - got).abs().max() > 1e-3 * got.abs().max()


def test_eval_samples_each_checkpoint_at_its_recorded_guidance(tiny_pipe_dir, policy, tmp_path, monkeypatch, capsys):
    """A run's checkpoint folder records its guidance in config.json (a CFG-free student's 1):
    eval.py samples it there and the others at --guidance's default, and a --guidance given on
    the command line sets every checkpoint's."""
    free, guided = tmp_path / "free", tmp_path / "guided"
    _lora(policy, free, seed=60, std=0.05)
    (free / "config.json").write_text(json.dumps({"guidance": 4.5, "student_guidance": 1.0}))
    _lora(policy, guided, seed=61, std=0.05)
    (guided / "config.json").write_text(json.dumps({"guidance": 4.5, "student_guidance": 0.0}))
    seen = {}
    sample = scoring.sample_images

    def spy(policy, jobs, num_steps, guidance, *a, **k):
        seen[k.get("desc")] = guidance
        return sample(policy, jobs, num_steps, guidance, *a, **k)

    monkeypatch.setattr(scoring, "sample_images", spy)
    args = ["--model", str(tiny_pipe_dir), "--tasks", "count", "--num_prompts", "2", "--resolution", "32",
            "--eval_steps", "2", "--batch_size", "2", "--grid_prompts", "1", "--ckpt", "base", f"free={free}",
            f"guided={guided}", "--cache_dir", str(tmp_path / "cache")]
    evaluation.main(args + ["--out", str(tmp_path / "e1")])
    assert seen == {"base": 4.5, "free": 1.0, "guided": 4.5}
    assert "guidance 4.5 (free 1: the guidance each run records)" in (tmp_path / "e1" / "results.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.png"))) == 6
    evaluation.main(args + ["--out", str(tmp_path / "e2"), "--guidance", "4.5"])
    assert seen == {"base": 4.5, "free": 4.5, "guided": 4.5}
    # one cache: only the CFG-free student's 2 images were sampled again, at 4.5, and they differ
    assert len(list((tmp_path / "cache").glob("*.png"))) == 8
    image = {run: [json.loads(line)["image"] for line in open(tmp_path / run / "details.jsonl")
                   if json.loads(line)["checkpoint"] == "free"][0] for run in ("e1", "e2")}
    assert image["e1"] != image["e2"]
    assert np.abs(np.asarray(Image.open(image["e1"]), float) - np.asarray(Image.open(image["e2"]), float)).max() > 0


def test_negative_student_guidance_is_refused(tiny_pipe_dir, tmp_path):
    with pytest.raises(SystemExit, match="--student_guidance -1"):
        opd_distill.main(["--model", str(tiny_pipe_dir), "--teachers", "count=base", "--student_guidance", "-1",
                          "--out", str(tmp_path / "run")])
