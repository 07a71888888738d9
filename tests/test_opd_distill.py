"""Flow-OPD: the estimators (pathwise = literal KL; pg unbiased for it), a self-teacher gives zero
loss, torchrun, resume, and start-up errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import opd_distill
from opd_distill import distill_micro_batch, kl_scale, opd_loss, pg_reward, returns_to_go, task_schedule
from tiny.pretrain import build_tiny_pipeline
from lora import add_student, load_adapter, save_adapter
from sde_sampler import encode, load_policy, rollout, sd3_sigmas, sde_step, transition_kl, using_adapter, velocity

REPO = Path(__file__).resolve().parents[1]
CFG = dict(noise_level=0.7, kl_weighting="exact", loss="pathwise", beta_mar=0.0, clip_range=1e-4, gamma=0.0)


def _lora(policy, folder, seed, std=0.05):
    """A random LoRA saved as a teacher folder (the student adapter is re-randomised)."""
    params = add_student(policy, rank=4, alpha=4) if policy.student is None else \
        [p for n, p in policy.transformer.named_parameters() if ".student." in n]
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(std=std)
    save_adapter(policy, "student", folder)
    return params


def _grads(params):
    return torch.cat([p.grad.reshape(-1).clone() for p in params])


def test_returns_to_go_and_schedule():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.equal(returns_to_go(r, 0.0), r)
    torch.testing.assert_close(returns_to_go(r, 0.5), torch.tensor([[1 + 1 + 1.0, 2 + 2.0, 4.0]]))
    sizes = {"ocr": 16, "geneval": 16}
    seq = [task_schedule(s, sizes, 8, {"ocr": 1, "geneval": 3}) for s in range(16)]
    assert seq == ["ocr"] * 2 + ["geneval"] * 6 + ["ocr"] * 2 + ["geneval"] * 6


@pytest.mark.parametrize("weighting", ["exact", "flowgrpo", "velocity"])
def test_pg_reward_is_the_kl_in_each_weightings_units(weighting):
    """kl_scale turns the sampled per-dim log-ratio into transition_kl's units: its mean over
    many actions is the KL of that weighting, at an early and a late step (a control: the
    unscaled log-ratio is not, except where the weighting's scale is 1)."""
    torch.manual_seed(0)
    x, v_s, v_t = torch.randn(3, 1, 3, 4, 4).unbind(0)
    n, dims = 40000, x[0].numel()
    for s, s_next in [(1.0, 0.96), (0.46, 0.28)]:
        xs, vs, vt = (a.expand(n, -1, -1, -1) for a in (x, v_s, v_t))
        nxt, lp_s, _, _ = sde_step(vs, xs, s, s_next, 0.7, generator=torch.Generator().manual_seed(1))
        _, lp_t, _, _ = sde_step(vt, xs, s, s_next, 0.7, prev_sample=nxt)
        scale = kl_scale(torch.tensor([s]), torch.tensor([s_next]), dims, 0.7, weighting)
        kl = transition_kl(v_s, v_t, s, s_next, 0.7, weighting).item()
        assert abs(((lp_s - lp_t) * scale).mean().item() - kl) < 0.05 * kl
        if abs(scale.item() - 1) > 0.5:
            assert abs((lp_s - lp_t).mean().item() - kl) > 0.3 * kl


def test_pathwise_is_the_literal_kl_and_pg_is_unbiased_for_it(policy, tmp_path):
    _lora(policy, tmp_path / "teacher", seed=1)
    load_adapter(policy, tmp_path / "teacher", "count")
    params = _lora(policy, tmp_path / "unused", seed=2)
    prompt, n, j = "a red circle", 1024, 3
    out = rollout(policy, [prompt], 6, 1.0, 0.7, generator=torch.Generator().manual_seed(0))
    x = out["states"][:, j].expand(n, -1, -1, -1).contiguous()
    s, s_next = out["sigmas"][j].item(), out["sigmas"][j + 1].item()
    cond = encode(policy, [prompt])
    # every sample shares the one state, so one forward gives every sample's velocity (expanded)
    with torch.no_grad():
        with using_adapter(policy, "count"):
            v_t = velocity(policy, x[:1], s, cond, 1.0).expand(n, -1, -1, -1)
        v0 = velocity(policy, x[:1], s, cond, 1.0).expand(n, -1, -1, -1)
    # the sampled actions: many draws of the student's transition from that state
    x_next, lp_old, _, _ = sde_step(v0, x, s, s_next, 0.7, generator=torch.Generator().manual_seed(5))
    lp_t = sde_step(v_t, x, s, s_next, 0.7, prev_sample=x_next)[1]

    # pathwise: the loss is the literal KL and its gradient is autograd's on transition_kl
    v = velocity(policy, x[:8], s, encode(policy, [prompt] * 8), 1.0)
    loss, kl, _ = opd_loss(v, x[:8], x_next[:8], s, s_next, v_t[:8], CFG)
    per_sample = transition_kl(v, v_t[:8], s, s_next, 0.7, "exact")
    literal = per_sample.mean()
    assert torch.equal(loss, literal) and torch.equal(kl, per_sample.detach())
    g_loss = torch.autograd.grad(loss, params, retain_graph=True)
    g_lit = torch.autograd.grad(literal, params)
    assert all(torch.equal(a, b) for a, b in zip(g_loss, g_lit))

    # pg over many sampled actions vs pathwise at the same state
    grads = {}
    for mode in ("pathwise", "pg"):
        cfg = {**CFG, "loss": mode}
        adv = pg_reward(lp_old, lp_t, s, s_next, x[0].numel(), cfg) if mode == "pg" else None
        for p in params:
            p.grad = None
        v = velocity(policy, x[:1], s, cond, 1.0).expand(n, -1, -1, -1)
        loss, _, _ = opd_loss(v, x, x_next, s, s_next, v_t, cfg, lp_old, adv)
        loss.backward()
        grads[mode] = _grads(params)
    cos = torch.nn.functional.cosine_similarity(grads["pathwise"], grads["pg"], dim=0).item()
    ratio = (grads["pg"].norm() / grads["pathwise"].norm()).item()
    assert cos >= 0.9, cos
    assert 0.7 < ratio < 1.4, ratio  # same scale too: pg is unbiased for the same objective


def _two_pass(policy, prompts, routed, anchor, num_steps, trained, seed, cfg, weight, mar_weight=None):
    """The OPD step as the code did it before one pass, as the reference: roll out first (no_grad),
    then each adapter's labels at the stored states by its own forward, then the student again
    with gradient on every trained state. mar_weight: each image's weight in the MAR mean (None:
    1 each), written out here as the reference for --mar_every. Returns the per-sample KLs (B, trained)."""
    out = rollout(policy, prompts, num_steps, cfg["guidance"], 0.7, generator=torch.Generator().manual_seed(seed),
                  sde_steps=trained)
    cond, sig, kls, rewards = encode(policy, prompts), out["sigmas"], [], []
    for j in range(trained):
        s, s_next, x, x_next = sig[j].item(), sig[j + 1].item(), out["states"][:, j], out["next_states"][:, j]
        v_t = torch.empty_like(x)
        with torch.no_grad():
            for name in set(routed):
                k = [i for i, n in enumerate(routed) if n == name]
                with using_adapter(policy, name):
                    v_t[k] = velocity(policy, x[k], s, tuple(c[k] for c in cond), cfg["guidance"])
            with using_adapter(policy, anchor):
                v_a = velocity(policy, x, s, cond, cfg["guidance"])
        v = velocity(policy, x, s, cond, cfg["guidance"])
        adv = None
        if cfg["loss"] != "pathwise":
            adv = pg_reward(out["log_probs"][:, j], sde_step(v_t, x, s, s_next, 0.7, prev_sample=x_next)[1], s, s_next,
                            x[0].numel(), cfg)
            rewards.append(adv)
        loss, kl, _ = opd_loss(v, x, x_next, s, s_next, v_t, cfg, out["log_probs"][:, j],
                               None if cfg["gamma"] else adv, v_a if mar_weight is None else None)
        if mar_weight is not None:
            mar = transition_kl(v, v_a, s, s_next, cfg["noise_level"], cfg["kl_weighting"])
            loss = loss + cfg["beta_mar"] * (mar_weight * mar).mean()
        (loss * weight).backward()
        kls.append(kl)
    if cfg["gamma"] and rewards:
        returns = returns_to_go(torch.stack(rewards, 1), cfg["gamma"])
        for j in range(trained):
            s, s_next, x = sig[j].item(), sig[j + 1].item(), out["states"][:, j]
            lp = sde_step(velocity(policy, x, s, cond, cfg["guidance"]), x, s, s_next, 0.7,
                          prev_sample=out["next_states"][:, j])[1]
            (opd_distill.ppo_loss(lp, out["log_probs"][:, j], returns[:, j], 1e-4)[0] * weight).backward()
    return torch.stack(kls, 1)


@pytest.mark.parametrize("loss,gamma,mar_every", [("pathwise", 0.0, 1), ("pg", 0.0, 1), ("both", 0.5, 1),
                                                   ("pathwise", 0.0, 2)])
def test_one_pass_gradient_equals_the_two_pass_gradient(policy, tmp_path, loss, gamma, mar_every):
    """distill_micro_batch (labels and loss at the state just visited, backward before the next
    state) gives the gradient of rolling out first and re-running the student, to float rounding:
    same seed, same states, routed teachers and a LoRA anchor in one mixed-adapter forward. With
    --mar_every 2 the anchor labels only images 0 and 2, each counted twice in the MAR mean."""
    for k, name in enumerate(["count", "text", "anchor"]):
        _lora(policy, tmp_path / name, seed=10 + k, std=0.1)
        load_adapter(policy, tmp_path / name, name)
    params = _lora(policy, tmp_path / "init", seed=20, std=0.05)
    cfg = {**CFG, "loss": loss, "gamma": gamma, "beta_mar": 0.3, "guidance": 4.5, "kl_weighting": "velocity",
           "mar_every": mar_every}
    prompts = ["a red circle", "two blue squares", 'the text "ab"', "a green triangle"]
    routed = ["count", "count", "text", "count"]
    mar_rows = None if mar_every == 1 else [0, 2]
    mar_weight = None if mar_every == 1 else torch.tensor([2.0, 0.0, 2.0, 0.0])
    grads, kls, mars = {}, {}, None
    for way in ("two", "one"):
        for p in params:
            p.grad = None
        if way == "two":
            kls[way] = _two_pass(policy, prompts, routed, "anchor", 4, 3, 7, cfg, 0.25, mar_weight)
        else:
            sig = sd3_sigmas(policy.pipe.scheduler.config, 4)
            kls[way], mars = distill_micro_batch(policy, prompts, routed, "anchor", sig, 3,
                                                 torch.Generator().manual_seed(7), cfg, 0.25, mar_rows=mar_rows)
        grads[way] = _grads(params)
    assert grads["two"].abs().max() > 0 and mars.shape == (4 if mar_rows is None else 2, 3)
    torch.testing.assert_close(kls["one"], kls["two"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads["one"], grads["two"], rtol=1e-4, atol=1e-7)


def test_per_teacher_guidance_in_one_forward(policy, tmp_path):
    """--teacher_guidance: label rows at different CFG scales in one mixed-adapter forward equal
    each adapter's velocity at its own scale; the rollout's guidance everywhere is the default path."""
    from sde_sampler import adapter_velocities
    for k, name in enumerate(["count", "text"]):
        _lora(policy, tmp_path / name, seed=30 + k, std=0.1)
        load_adapter(policy, tmp_path / name, name)
    cond = encode(policy, ["a red circle", 'the text "ab"', "two blue squares"])
    x = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    names, scales = ["count", "text", "count"], [1.0, 4.5, 3.0]
    with torch.no_grad():
        got = adapter_velocities(policy, x, 0.6, cond, torch.tensor(scales), names)
        for i, (n, g) in enumerate(zip(names, scales)):
            with using_adapter(policy, n):
                one = velocity(policy, x[i:i + 1], 0.6, tuple(c[i:i + 1] for c in cond), g)
            torch.testing.assert_close(got[i:i + 1], one, rtol=1e-4, atol=1e-5)
        same = adapter_velocities(policy, x, 0.6, cond, torch.tensor([4.5] * 3), names)
        torch.testing.assert_close(same, adapter_velocities(policy, x, 0.6, cond, 4.5, names), rtol=1e-5, atol=1e-6)
    assert (got[0] - same[0]).abs().max() > 1e-3  # the scale matters (the control)
    assert opd_distill.parse_label_guidance("text=1, anchor=2", ["count", "text"], 4.5) == \
        {"count": 4.5, "text": 1.0, "anchor": 2.0}


def _args(pipe_dir, out, teachers, **over):
    cfg = dict(model=str(pipe_dir), out=str(out), resolution=32, num_steps=3, eval_steps=3, group_size=2,
               prompts_per_step=2, batch_size=4, lr=1e-3, max_steps=2, eval_every=0, eval_tasks="count,text",
               eval_prompts=2, save_every=1, beta_mar=0.04, seed=0, lora_rank=4, lora_alpha=4)
    cfg.update(over)
    args = [x for k, v in cfg.items() for x in (f"--{k}", str(v))]
    return args + ["--teachers", *teachers]


def test_self_teacher_gives_zero_loss_and_gradient(tiny_pipe_dir, tmp_path):
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=3)
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "run", [f"count={tmp_path / 'count'}"], beta_mar=0.0,
                           init=tmp_path / "count", max_steps=1))
    rec = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][0]
    assert rec["kl"] == 0.0 and rec["grad_norm"] == 0.0
    # a different teacher gives a positive KL and a gradient (the control)
    _lora(pol, tmp_path / "other", seed=4)
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "run2", [f"count={tmp_path / 'other'}"], beta_mar=0.0,
                           init=tmp_path / "count", max_steps=1))
    rec = [json.loads(line) for line in open(tmp_path / "run2" / "metrics.jsonl")][0]
    assert rec["kl"] > 0 and rec["grad_norm"] > 0
    # the self-teacher labelled at another guidance than the student's is another target
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "run3", [f"count={tmp_path / 'count'}"], beta_mar=0.0,
                           init=tmp_path / "count", max_steps=1, teacher_guidance="count=1"))
    rec = [json.loads(line) for line in open(tmp_path / "run3" / "metrics.jsonl")][0]
    assert rec["kl"] > 0 and rec["grad_norm"] > 0
    assert set(rec["kl_by_step"]["count"]) and len(rec["kl_by_step"]["count"]) == 2


@pytest.mark.slow  # 4 s: .ci/run runs it after the README's command (tests/test_lora.py loads full-weight teachers)
def test_full_weight_teachers_through_the_command_line(tiny_pipe_dir, tmp_path, capsys):
    """--teachers count=FULL.safetensors text=LORA: the full-weight teacher as its own copy, and
    with --teacher_rank 2 as a LoRA of its delta; both give labels, and the two agree."""
    from test_lora import _full_teacher
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _full_teacher(pol, tmp_path / "count.safetensors")
    _lora(pol, tmp_path / "text", seed=6, std=0.1)
    teachers = [f"count={tmp_path / 'count.safetensors'}", f"text={tmp_path / 'text'}"]
    kl = {}
    for rank in (0, 2):
        out = tmp_path / f"r{rank}"
        opd_distill.main(_args(tiny_pipe_dir, out, teachers, max_steps=1, prompts_per_step=4, batch_size=8,
                               teacher_rank=rank, kl_weighting="exact"))
        kl[rank] = json.loads(open(out / "metrics.jsonl").readline())["kl_by_task"]
    log = capsys.readouterr().out
    assert "teacher count: full weights, its own frozen copy of the transformer" in log
    assert "teacher count: full weights -> rank-2 LoRA of the delta on 3 layers" in log
    assert set(kl[0]) == {"count", "text"} and kl[0]["count"] > 0
    assert kl[2]["count"] == pytest.approx(kl[0]["count"], rel=1e-3) and kl[2]["text"] == kl[0]["text"]


@pytest.mark.slow  # 12 s: .ci/run runs it after the README's command (tests/test_scale.py resumes OPD bit for bit)
def test_two_teachers_logging_and_resume(tiny_pipe_dir, tmp_path):
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=5, std=0.1)
    _lora(pol, tmp_path / "text", seed=6, std=0.1)
    teachers = [f"count={tmp_path / 'count'}", f"text={tmp_path / 'text'}"]
    run = dict(max_steps=4, lr=1e-3, save_every=2, prompts_per_step=4, batch_size=8, kl_weighting="exact")
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "a", teachers, **run))
    rec = json.loads(open(tmp_path / "a" / "metrics.jsonl").readline())
    assert set(rec["kl_by_task"]) <= {"count", "text"} and len(next(iter(rec["kl_by_step"].values()))) == 2
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "a", teachers, **{**run, "max_steps": 6}) + ["--resume"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # continued at step 5, not 1
    # a run killed after step 6 had logged steps past its last checkpoint (4): a resume logs them once
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "kl": 1.0}) + "\n")
    shutil.rmtree(tmp_path / "a" / "final")
    shutil.rmtree(tmp_path / "a" / "checkpoint-000006")
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "a", teachers, **{**run, "max_steps": 6}) + ["--resume"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert steps == list(range(1, 7))


def test_periodic_eval_reports_its_noise_and_the_change_since_step_0(tiny_pipe_dir, tmp_path, capsys):
    """eval_images per prompt, a standard error beside each score, and from the second eval on
    the paired change since the first (same prompts and noise) with its own standard error."""
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=5, std=0.1)
    out = tmp_path / "ev"
    opd_distill.main(_args(tiny_pipe_dir, out, [f"count={tmp_path / 'count'}"], max_steps=1, eval_every=1,
                           eval_images=2, eval_prompts=3, lr=1e-2, eval_tasks="count,clean"))
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 1]
    first, second = evals[0]["eval"]["count"], evals[1]["eval"]["count"]
    assert first["n"] == 6 and first["se"] > 0 and "change" not in first
    assert second["since_step"] == 0 and second["change_se"] >= 0
    ref = json.loads((out / "samples" / "scores_step_000000.json").read_text())["count"]
    now = json.loads((out / "samples" / "scores_step_000001.json").read_text())["count"]
    assert len(ref) == 3 and second["change"] == pytest.approx(sum(now[i] - ref[i] for i in ref) / 3)
    printed = capsys.readouterr().out
    assert "(change " in printed
    # the run ends with the student beside its start and its teacher, sampled from the same prompts and noise
    table = (out / "final_table.md").read_text()
    assert table.strip() in printed
    teacher = json.loads((out / "samples" / "scores_teacher_count.json").read_text())
    start = json.loads((out / "samples" / "scores_step_000000.json").read_text())
    assert teacher["count"].keys() == ref.keys() and teacher["clean"] != start["clean"]  # the teacher's own images
    lines = {line.split(" | ")[0]: line for line in table.splitlines()}
    assert f"{second['change']:+.3f}" in lines["| student − start (step 0: the base)"]
    assert f"{sum(now[i] - teacher['count'][i] for i in ref) / 3:+.3f}" in lines["| student − teacher count"]
    # resumed after its last step, the run prints the same table without sampling the teacher again
    cached = (out / "samples" / "scores_teacher_count.json").stat().st_mtime_ns
    opd_distill.main(_args(tiny_pipe_dir, out, [f"count={tmp_path / 'count'}"], max_steps=1, eval_every=1,
                           eval_images=2, eval_prompts=3, lr=1e-2, eval_tasks="count,clean") + ["--resume"])
    assert (out / "samples" / "scores_teacher_count.json").stat().st_mtime_ns == cached
    assert table.strip() in capsys.readouterr().out


def test_side_by_side_marks_changes_beyond_two_standard_errors():
    from scoring import side_by_side
    start = {"count": {0: 0.2, 1: 0.4, 2: 0.6}}
    student = {"count": {0: 0.5, 1: 0.7, 2: 0.8}}      # +0.267, every prompt up: beyond two standard errors
    teacher = {"count": {0: 0.6, 1: 0.6, 2: 0.7}}      # +0.033 ± 0.067: within
    table = side_by_side(student, start, {"teacher count": teacher}, {"student": "student", "start": "start"})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "0.667 ±0.088" in rows["student"] and "0.400 ±0.115" in rows["start"]
    assert "**+0.267 ±0.033**" in rows["student − start"]
    assert "+0.033 ±0.067 |" in rows["student − teacher count"] and "**" not in rows["student − teacher count"]


def test_paired_change_and_standard_error():
    from scoring import paired_change, standard_error
    ref = {0: 0.2, 1: 0.5, 2: 0.9}
    assert paired_change(ref, ref) == (0.0, 0.0)
    change, se = paired_change({0: 0.3, 1: 0.6, 2: 1.0}, ref)
    assert change == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-7)
    change, se = paired_change({0: 0.4, 1: 0.5, 2: 0.9}, ref)
    assert change == pytest.approx(0.2 / 3) and se == pytest.approx(standard_error(torch.tensor([0.2, 0.0, 0.0])))
    assert standard_error(torch.tensor([1.0, 3.0])) == pytest.approx(2 ** 0.5 / 2 ** 0.5)


def test_bad_inputs(tiny_pipe_dir, tmp_path):
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=5)
    ok = f"count={tmp_path / 'count'}"
    with pytest.raises(SystemExit, match="missing_dir: LoRA checkpoint not found"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok, f"text={tmp_path / 'missing_dir'}"]))
    with pytest.raises(SystemExit, match="no built-in prompts for task 'nonsense'"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok, f"nonsense={tmp_path / 'count'}"]))
    with pytest.raises(SystemExit, match=r"--teacher_guidance 'ocr=1': 'ocr' is neither a teacher's task \(count\) nor anchor"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok], teacher_guidance="ocr=1"))
    with pytest.raises(SystemExit, match=r"--teacher_guidance 'count=x': the scale must be a number"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok], teacher_guidance="count=x"))
    with pytest.raises(SystemExit, match=r"--mar_every 3 must be >= 1 and divide --group_size 2"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok], mar_every=3))
    with pytest.raises(SystemExit, match="task 'count' has two teachers"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok, ok]))
    other_dir = tmp_path / "other_base"
    build_tiny_pipeline(other_dir, seed=1, num_layers=2, head_dim=16)
    other = load_policy(str(other_dir), device="cpu")
    _lora(other, tmp_path / "text", seed=1)
    with pytest.raises(SystemExit, match=r"text: layer transformer_blocks\.0\.attn\.\S+ has LoRA shape"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", [ok, f"text={tmp_path / 'text'}"]))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing ran


def test_prompt_files(tiny_pipe_dir, tmp_path, capsys):
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=5)
    _lora(pol, tmp_path / "text", seed=6)
    teachers = [f"count={tmp_path / 'count'}", f"text={tmp_path / 'text'}"]
    (tmp_path / "mine.txt").write_text("two red circles\n\nthree blue squares\n")
    opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r", teachers, max_steps=1)
                     + ["--prompts", f"count={tmp_path / 'mine.txt'}"])
    out = capsys.readouterr().out
    assert "train prompts: count 2, text 400" in out
    assert out.count("is one file, so the periodic evals score training prompts") == 1  # count's, not text's
    with pytest.raises(SystemExit, match="bad --prompts 'clean=.*'; use TASK=FILE with TASK one of count, text"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r2", teachers) + ["--prompts", f"clean={tmp_path / 'mine.txt'}"])
    with pytest.raises(SystemExit, match="No such file or directory: '.*nope.txt'"):
        opd_distill.main(_args(tiny_pipe_dir, tmp_path / "r3", teachers) + ["--prompts", f"text={tmp_path / 'nope.txt'}"])


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_torchrun_two_ranks(tiny_pipe_dir, tmp_path):
    pol = load_policy(str(tiny_pipe_dir), device="cpu")
    _lora(pol, tmp_path / "count", seed=5, std=0.1)
    _lora(pol, tmp_path / "text", seed=6, std=0.1)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(REPO / "opd_distill.py"),
           *_args(tiny_pipe_dir, out, [f"count={tmp_path / 'count'}", f"text={tmp_path / 'text'}"],
                 save_every=100, batch_size=2, eval_every=2, eval_prompts=1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ranks in sync: 2 ranks hold identical LoRA weights" in res.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2, 2]  # evals at 0 and 2
    # the final table's teacher evals are sharded over the ranks too, and rank 0 alone writes and prints
    table = (out / "final_table.md").read_text()
    assert res.stdout.count(table.strip()) == 1 and "| student − teacher text |" in table


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_quickstart_preset_runs_on_shipped_assets(tmp_path, capsys):
    """The README quickstart (`opd_distill.py --preset tiny`) on the shipped base and teachers,
    cut to one step and 2 eval prompts a task with 2 ODE steps: a fresh student, routing, both
    teachers, the anchor, a saved final LoRA and the final table with both teachers; then the
    README's eval command of its result, and docs/results.md's eval of three seeds from the merge,
    as written there, cut to 2 prompts, 2 ODE steps and 1 image."""
    import re
    import shlex
    import eval as evaluation
    out = tmp_path / "opd"
    opd_distill.main(["--preset", "tiny", "--out", str(out), "--max_steps", "1", "--eval_prompts", "2",
                      "--eval_steps", "2", "--prompts_per_step", "2", "--batch_size", "8"])
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kl"' in line][-1]
    # a fresh student (its LoRA's B is zero) is the base at its first step: no KL to the base anchor yet
    assert record["step"] == 1 and record["kl"] > 0 and record["mar_kl"] == 0
    assert json.loads((out / "config.json").read_text())["init"] == ""
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()
    table = (out / "final_table.md").read_text()
    assert "| start (step 0: the base) |" in table and "| student − teacher text |" in table
    assert table.strip() in capsys.readouterr().out
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")
    # the cold start one flag away, as written there, cut to one step
    line = re.search(r"^ +(python opd_distill\.py --preset tiny --init assets/tiny/merge .*)$", readme, re.M).group(1)
    args = shlex.split(line)[2:]
    args[args.index("--out") + 1] = str(tmp_path / "opd_merge")
    opd_distill.main(args + ["--max_steps", "1", "--eval_every", "0", "--prompts_per_step", "2", "--batch_size", "8"])
    assert json.loads((tmp_path / "opd_merge" / "config.json").read_text())["init"] == "assets/tiny/merge"
    line = re.search(r"^ +(python eval\.py --preset tiny --ckpt base .*opd=runs/opd/final.*)$", readme, re.M).group(1)
    args = [a.replace("runs/opd/final", str(out / "final")) for a in shlex.split(line)[2:]]
    args[args.index("--out") + 1] = str(tmp_path / "eval_opd")
    evaluation.main(args + ["--num_prompts", "2", "--eval_steps", "2", "--images_per_prompt", "1"])
    results = json.loads((tmp_path / "eval_opd" / "results.json").read_text())
    assert list(results) == ["base", "count", "text", "opd"] and set(results["opd"]) >= {"count", "text"}
    assert set(results["opd"]["count"]["vs"]) == {"ckpt", "change", "se"}  # --vs base, as written there
    # the three seeds' command, each seed's folder standing in for the one run here
    results_md = (REPO / "docs" / "results.md").read_text().replace("\\\n", " ")
    line = re.search(r"^ +(python eval\.py --preset tiny --ckpt merge=assets/tiny/merge --ckpt opd@s0=.*)$",
                     results_md, re.M).group(1)
    args = [re.sub(r"runs/opd_merge(_s\d)?/final", str(out / "final"), a) for a in shlex.split(line)[2:]]
    args[args.index("--out") + 1] = str(tmp_path / "eval_seeds")
    evaluation.main(args + ["--num_prompts", "2", "--eval_steps", "2", "--images_per_prompt", "1"])
    table = (tmp_path / "eval_seeds" / "results.md").read_text()
    assert "| opd (3 seeds) |" in table and "| opd (3 seeds), mean [min, max] |" in table
    # and docs/results.md's eval of the quickstart's three seeds against the base
    line = re.search(r"^ +(python eval\.py --preset tiny --ckpt base count=.*opd@s0=runs/opd/final.*)$",
                     results_md, re.M).group(1)
    args = [re.sub(r"runs/opd(_s\d)?/final", str(out / "final"), a) for a in shlex.split(line)[2:]]
    args[args.index("--out") + 1] = str(tmp_path / "eval_quickstart")
    evaluation.main(args + ["--num_prompts", "2", "--eval_steps", "2", "--images_per_prompt", "1"])
    table = (tmp_path / "eval_quickstart" / "results.md").read_text()
    assert "| opd (3 seeds), mean [min, max] |" in table and "Change against `base`" in table
