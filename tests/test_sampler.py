"""The SDE maths against torch.distributions and Monte Carlo, and the rollout loop."""
from pathlib import Path

import pytest
import torch

from lora import add_student, load_adapter, save_adapter
from sde_sampler import (BASE, adapter_velocities, encode, guide, noise_scale, rollout, rollout_batches,
                         sd3_sigmas, sde_step, transition_kl, using_adapter, velocity)


def _state(b=3, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)


@pytest.mark.parametrize("sigma,sigma_next", [(0.8, 0.6), (1.0, 0.9), (0.3, 0.0)])
def test_log_prob_matches_normal(sigma, sigma_next):
    v, x = _state()
    nxt, log_prob, mean, std = sde_step(v, x, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(1))
    ref = torch.distributions.Normal(mean, std).log_prob(nxt).mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob, ref, rtol=1e-5, atol=1e-5)
    # given prev_sample, the same density comes back and the sample is not redrawn
    again, lp2, _, _ = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=nxt)
    assert torch.equal(again, nxt)
    torch.testing.assert_close(lp2, log_prob)


def test_std_and_sigma_one_uses_next_sigma():
    v, x = _state()
    _, _, _, std = sde_step(v, x, 1.0, 0.9, 0.7)
    expected = 0.7 * (1.0 / (1 - 0.9)) ** 0.5 * 0.1 ** 0.5
    assert abs(std.item() - expected) < 1e-6
    assert torch.isfinite(std).all()


def test_per_sample_sigmas_match_scalar_calls():
    v, x = _state()
    s, s_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.4, 0.0])
    z = torch.randn_like(x)
    nxt = x + 0.1 * z
    _, lp, mean, _ = sde_step(v, x, s, s_next, 0.7, prev_sample=nxt)
    for i in range(3):
        _, lpi, mi, _ = sde_step(v[i:i + 1], x[i:i + 1], s[i].item(), s_next[i].item(), 0.7, prev_sample=nxt[i:i + 1])
        torch.testing.assert_close(lp[i:i + 1], lpi)
        torch.testing.assert_close(mean[i:i + 1], mi)


def test_noise_level_to_zero_is_euler():
    v, x = _state()
    euler = x + (0.55 - 0.7) * v
    ode, lp, _, _ = sde_step(v, x, 0.7, 0.55, 0.0)
    torch.testing.assert_close(ode, euler)
    assert torch.equal(lp, torch.zeros(3))
    _, _, mean_small, _ = sde_step(v, x, 0.7, 0.55, 1e-4)
    torch.testing.assert_close(mean_small, euler, atol=1e-6, rtol=0)
    _, _, mean_big, _ = sde_step(v, x, 0.7, 0.55, 0.7)
    assert (mean_big - euler).abs().max() > 1e-3


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.75), (1.0, 0.93), (0.2, 0.0)])
def test_exact_kl_matches_monte_carlo(sigma, sigma_next):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4)
    v_s, v_t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    kl = transition_kl(v_s, v_t, sigma, sigma_next, 0.7, weighting="exact")
    n = 20000
    xs, vs, vt = x.expand(n, -1, -1, -1), v_s.expand(n, -1, -1, -1), v_t.expand(n, -1, -1, -1)
    nxt, lp_s, _, _ = sde_step(vs, xs, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(3))
    _, lp_t, _, _ = sde_step(vt, xs, sigma, sigma_next, 0.7, prev_sample=nxt)
    mc = ((lp_s - lp_t) * x[0].numel()).mean()  # log_prob is a per-dim mean; the KL is a sum
    assert kl.shape == (1,)
    assert abs(mc.item() - kl.item()) / kl.item() < 0.05


def test_flowgrpo_kl_is_exact_times_dt_over_dim():
    v_s, v_t = _state(seed=5)
    for s, s_next in [(0.9, 0.8), (1.0, 0.95), (0.4, 0.0)]:
        exact = transition_kl(v_s, v_t, s, s_next, 0.7, weighting="exact")
        fg = transition_kl(v_s, v_t, s, s_next, 0.7, weighting="flowgrpo")
        torch.testing.assert_close(fg, exact * (s - s_next) / v_s[0].numel())
    assert torch.equal(transition_kl(v_s, v_s, 0.5, 0.4, 0.7), torch.zeros(3))
    with pytest.raises(ValueError, match="weighting"):
        transition_kl(v_s, v_t, 0.5, 0.4, 0.7, weighting="bogus")


def test_velocity_weighting_weights_every_step_alike():
    """velocity = the KL divided by its step's time weight: the same velocity error costs the
    same at every step, where flowgrpo makes the first of SD3's 10 steps ~1000x cheaper."""
    v_s, v_t = _state(seed=6)
    steps = [(1.0, 0.96), (0.6, 0.46), (0.28, 0.01)]
    for s, s_next in steps:
        vel = transition_kl(v_s, v_t, s, s_next, 0.7, weighting="velocity")
        torch.testing.assert_close(vel, 0.5 * ((v_s - v_t) ** 2).mean(dim=(1, 2, 3)))
        unit = transition_kl(torch.ones_like(v_s), torch.zeros_like(v_s), s, s_next, 0.7, weighting="flowgrpo")
        torch.testing.assert_close(vel, transition_kl(v_s, v_t, s, s_next, 0.7, weighting="flowgrpo") / unit * 0.5)
    cost = {w: [transition_kl(v_s, v_t, s, n, 0.7, weighting=w)[0].item() for s, n in steps]
            for w in ("flowgrpo", "velocity")}
    assert cost["flowgrpo"][2] > 1000 * cost["flowgrpo"][0]
    assert cost["velocity"][0] == cost["velocity"][2]


def test_cfg_and_noise_scale():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert guide(u, c, 4.5).item() == 1 + 4.5 * 2
    assert guide(u, c, 1.0).item() == 3.0
    s = torch.tensor(0.5)
    assert abs(noise_scale(s, torch.tensor(0.4), 0.7).item() - 0.7) < 1e-6


def test_sd3_sigmas_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sig = sd3_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0).config, 10)
    assert sig.shape == (11,) and sig[0] == 1.0 and sig[-1] == 0.0
    assert (sig[1:] < sig[:-1]).all()
    # shift 3 pushes the schedule towards noise: the middle sigma is well above the linear 0.55
    assert sig[5] > 0.7


def test_rollout_shapes_and_determinism(policy):
    prompts = ["a red circle", "a blue square"]
    a = rollout(policy, prompts, 4, 4.5, 0.7, generator=torch.Generator().manual_seed(0))
    b = rollout(policy, prompts, 4, 4.5, 0.7, generator=torch.Generator().manual_seed(0))
    c = rollout(policy, prompts, 4, 4.5, 0.7, generator=torch.Generator().manual_seed(1))
    assert a["states"].shape == (2, 4, 3, 32, 32) and a["next_states"].shape == (2, 4, 3, 32, 32)
    assert a["log_probs"].shape == (2, 4) and a["sigmas"].shape == (5,)
    assert torch.equal(a["states"][:, 1:], a["next_states"][:, :-1])
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["log_probs"], b["log_probs"])
    assert not torch.equal(a["latents"], c["latents"])
    # the recorded log-probs are those of the recorded transitions
    cond = encode(policy, prompts)
    with torch.no_grad():
        v = velocity(policy, a["states"][:, 2], a["sigmas"][2].item(), cond, 4.5)
    _, lp, _, _ = sde_step(v, a["states"][:, 2], a["sigmas"][2].item(), a["sigmas"][3].item(), 0.7,
                           prev_sample=a["next_states"][:, 2])
    torch.testing.assert_close(lp, a["log_probs"][:, 2])


def test_rollout_batches_slices_given_latents(policy):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    start = torch.randn((3, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    whole = rollout(policy, prompts, 3, 4.5, 0.0, latents=start)
    parts = rollout_batches(policy, prompts, 2, num_steps=3, guidance=4.5, noise_level=0.0, latents=start)
    torch.testing.assert_close(parts["latents"], whole["latents"])
    torch.testing.assert_close(parts["states"][:, 0], start)


def test_sde_window_ends_with_ode_steps(policy):
    """sde_steps=k: noise in the first k steps only; the rest are exactly the ODE from there."""
    prompts = ["a red circle", "a blue square"]
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    win = rollout(policy, prompts, 4, 4.5, 0.7, latents=x0, generator=torch.Generator().manual_seed(1), sde_steps=2)
    full = rollout(policy, prompts, 4, 4.5, 0.7, latents=x0, generator=torch.Generator().manual_seed(1))
    assert (win["log_probs"][:, :2] != 0).all() and (win["log_probs"][:, 2:] == 0).all()
    torch.testing.assert_close(win["states"][:, :3], full["states"][:, :3])
    cond = encode(policy, prompts)
    x = win["states"][:, 2]
    for j in (2, 3):
        with torch.no_grad():
            v = velocity(policy, x, win["sigmas"][j].item(), cond, 4.5)
        x = x + (win["sigmas"][j + 1] - win["sigmas"][j]) * v
    torch.testing.assert_close(win["latents"], x)
    assert not torch.allclose(win["latents"], full["latents"])


def test_guidance_one_is_conditional_only(policy):
    prompts = ["a red circle", "a blue square"]
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = rollout(policy, prompts, 3, 1.0, 0.0, latents=x0)
    e, p, _, _ = encode(policy, prompts)
    x, sig = x0.clone(), out["sigmas"]
    with torch.no_grad():
        for i in range(3):
            v = policy.transformer(hidden_states=x, timestep=torch.full((2,), sig[i].item() * 1000),
                                   encoder_hidden_states=e, pooled_projections=p).sample
            x = x + (sig[i + 1] - sig[i]) * v
    torch.testing.assert_close(out["latents"], x, rtol=1e-5, atol=1e-5)
    guided = rollout(policy, prompts, 3, 4.5, 0.0, latents=x0)
    assert (guided["latents"] - x).abs().max() > 1e-3


def test_ode_rollout_matches_diffusers_pipeline(policy):
    prompts = ["a red circle", "a blue square"]
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = rollout(policy, prompts, 5, 4.5, 0.0, latents=x0)["latents"]
    e, p, ne, npool = encode(policy, prompts)
    ref = policy.pipe(prompt_embeds=e, pooled_prompt_embeds=p, negative_prompt_embeds=ne,
                      negative_pooled_prompt_embeds=npool, latents=x0.clone(), num_inference_steps=5,
                      guidance_scale=4.5, height=32 * policy.pipe.vae_scale_factor,
                      width=32 * policy.pipe.vae_scale_factor, output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_mixed_adapter_batch_equals_separate_forwards(policy, tmp_path):
    """adapter_velocities: sample k through adapter names[k] in ONE forward (peft's mixed-adapter
    batches, CFG included) gives each adapter's own velocity, and leaves the student active."""
    params = add_student(policy, rank=4, alpha=8)
    torch.manual_seed(0)
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    save_adapter(policy, "student", tmp_path / "t")
    load_adapter(policy, tmp_path / "t", "count")
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B.student" in n:
                p.mul_(-1)  # the student's delta is now minus the "count" teacher's
    prompts = ["a red circle", "a blue square", "a red square", "a red circle"]
    names = ["count", BASE, "count", BASE]
    out = rollout(policy, prompts, 3, 4.5, 0.7, generator=torch.Generator().manual_seed(0))
    cond = encode(policy, prompts)
    states, sig = out["states"], out["sigmas"]
    calls = []
    hook = policy.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for t in range(3):
            calls.clear()
            mixed = adapter_velocities(policy, states[:, t], sig[t].item(), cond, 4.5, names)
            assert len(calls) == 1  # one forward for both adapters
            with using_adapter(policy, "count"):
                v_count = velocity(policy, states[:, t], sig[t].item(), cond, 4.5)
            with using_adapter(policy, BASE):
                v_base = velocity(policy, states[:, t], sig[t].item(), cond, 4.5)
            v_student = velocity(policy, states[:, t], sig[t].item(), cond, 4.5)
            torch.testing.assert_close(mixed[[0, 2]], v_count[[0, 2]], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mixed[[1, 3]], v_base[[1, 3]], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(adapter_velocities(policy, states[:, t], sig[t].item(), cond, 4.5, BASE), v_base)
            assert (v_student - v_count).abs().max() > 1e-4 and (v_count - v_base).abs().max() > 1e-4
    hook.remove()
    # the labels left the student active and trainable
    assert all(p.requires_grad for p in params)


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_torchvision_fallback_notice_is_silenced_and_other_warnings_are_not():
    import subprocess
    import sys
    code = ("import sde_sampler\nfrom diffusers import StableDiffusion3Pipeline\nimport logging\n"
            "logging.getLogger('transformers.utils.import_utils').warning('a real warning')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "requires torchvision" not in res.stderr and "a real warning" in res.stderr
