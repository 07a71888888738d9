"""
Stage 2: multi-teacher on-policy distillation (Flow-OPD) with Manifold Anchor Regularization.

    python opd_distill.py --preset tiny                                   # the shipped tiny teachers, a fresh student
    python opd_distill.py --preset tiny --init assets/tiny/merge --max_steps 60 --out runs/opd_merge   # from their merge
    python opd_distill.py --preset tiny --teachers count=runs/count/final text=runs/text/final \\
        --anchor runs/clean/final --init runs/merge/final --out runs/opd
    torchrun --nproc_per_node=2 opd_distill.py --preset tiny --out runs/opd_ddp
    torchrun --nproc_per_node=8 opd_distill.py --teachers ocr=PATH geneval=PATH --out runs/opd   # SD3.5-M

The student samples its own SDE trajectories. Every prompt carries a task tag and is routed to
that task's teacher. With one optimizer update per rollout the rollout's student is the student
being trained, and each step's target is known at the state itself, so a step is ONE pass over
each micro-batch (distill_micro_batch): at every trained SDE step, the routed teachers' and the
anchor's guided velocities at the current state (no_grad, one forward for all of them), the
student's velocity with gradient at the same state (guided at --student_guidance), the step's
loss and its backward, then the next state sampled from the detached student velocity:

    loss = mean over trained steps t of  KL(student(x_t) || teacher_task(x_t))       (--loss pathwise)
           + beta_mar * KL(student(x_t) || anchor(x_t))                               (MAR)

with KL the transition KL of sde_sampler.transition_kl: a time-weighted L2 between velocities.
The MAR term is labelled on every --mar_every-th image of a prompt's group and counted that many
times: a prompt's images are i.i.d., so the expected loss is the same, for fewer anchor forwards.
This equals rolling out first and re-running the student on the stored states (tested), with
one student forward per state fewer, and no step after the last trained one is sampled at all.
No VAE decode and no reward model run during training; they belong to eval.

A CFG-free student (--student_guidance 1, guidance distillation as in Meng et al. 2023): the
labels stay guided, the student's velocity is its conditional one alone, so it learns to give
in one forward what its teachers give in two. It rolls out at guidance 1 too (on-policy: the
states are those it will sample), records its guidance in its config.json, and eval.py samples
it there.

Why "pathwise": the authors' code builds an advantage -KL(student || teacher) per step but does
not detach it, so what trains is grad KL. The LLM-style estimator (--loss pg) instead uses the
sampled action's log-ratio as a detached per-step reward through the clipped surrogate; it has
the same expected gradient (checked in the tests) and more variance. With one update per
rollout the old log-prob comes from the same forward, so the ratio is exactly 1 and
--clip_range never acts: pg is REINFORCE with a per-step reward and no baseline (a per-group
baseline would cut its variance; not done here). --loss both adds the two.
With --gamma 0 each step's reward is known at that step, so pg stays one pass; with --gamma > 0
the returns-to-go need the later steps' rewards, so the pg term takes a second pass over the
stored states of the micro-batch (the student is unchanged in between).
"""

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import estimate
import scoring
from lora import load_teacher
from prompts import held_out_note, load_prompts
from sde_sampler import (BASE, adapter_velocities, cache_prompts, encode, ppo_loss, sd3_sigmas, sde_step,
                         transition_kl, velocity)
from tiny.world import SAMPLING as TINY

# -----------------------------------------------------------------------------
# defaults: SD3.5-Medium and the paper's settings; --preset tiny swaps in the tiny world
DEFAULTS = dict(
    model="",                  # hub id or pipeline folder; empty: SD3.5-Medium (or the preset's base)
    teachers=[],               # TASK=PATH ... (or a path named after its task: ocr.pt); TASK=base: the base model
    anchor="",                 # MAR anchor LoRA (e.g. an aesthetic/PickScore teacher); empty: the base
    init="",                   # the student's initial LoRA (merge_coldstart's or sft_coldstart's); empty: fresh
    prompts=[],                # TASK=FILE ...: a task's prompts from a file or split folder; others built in
    out="runs/opd",
    resolution=512,
    t5_tokens=256,  # T5 tokens per prompt (max_sequence_length); the tiny base has no T5 and uses 1
    embed_cache_gb=4.0,        # host RAM for prompt embeddings per process (SD3.5-M: 2.6 MiB a prompt)
    num_steps=10,              # SDE steps per rollout
    eval_steps=40,
    guidance=4.5,              # CFG of the teachers' and the anchor's labels (and of the student, below)
    teacher_guidance="",       # TASK=G,...,anchor=G: CFG of those labels instead (DiffusionOPD: geneval=1)
    student_guidance=0.0,      # the student's CFG in its rollout and its loss; 0: --guidance. 1: a CFG-free
                               # student, its conditional velocity alone learning the guided labels: 6 forwards
                               # per image-step instead of 9, and it samples at 1, half its teachers' cost
    teacher_rank=0,            # full-weight teachers: 0 = own frozen copy each; R = a rank-R LoRA of the delta
    noise_level=0.7,
    group_size=16,             # images per prompt
    prompts_per_step=16,       # prompts per optimizer step over all ranks
    balance_tags=False,        # draw every task, and every tag within it, equally often
    batch_size=8,              # images per forward, per rank
    gradient_checkpointing=False,  # recompute activations in the backward: ~1/3 more compute, less memory
    timestep_fraction=0.99,    # train the first int(num_steps * 0.99) steps
    loss="pathwise",           # pathwise | pg | both
    gamma=0.0,                 # pg only: discount of the returns-to-go (0: each step its own KL)
    clip_range=1e-4,           # pg only: PPO clip of the per-step ratio
    # flowgrpo (the authors' normalisation) | exact (the true KL) | velocity (every step alike). SD3.5-M
    # keeps flowgrpo, the weighting of the published teachers' and students' learning rates; on the tiny
    # world velocity was what let counts transfer. If kl_by_step shows the first steps' KL not falling,
    # try velocity (its loss is ~11x flowgrpo's for equal errors at every step of SD3's 10-step schedule:
    # AdamW does not mind the scale, --max_grad_norm may).
    kl_weighting="flowgrpo",
    beta_mar=0.04,             # weight of the anchor KL
    mar_every=2,               # the anchor KL on every 2nd image of a group, counted twice: the same expected
                               # loss (a prompt's images are i.i.d.) for half the anchor's label forwards
    routing="mixed",           # mixed: every batch mixes tasks | alternate: one task per epoch, in turn
    epochs_per_task="",        # alternate routing: "ocr=1,geneval=3" (default 1 each)
    lr=1e-4,
    weight_decay=1e-4,
    max_grad_norm=1.0,
    lora_rank=32,              # for a fresh student (no --init)
    lora_alpha=64,
    ema_decay=0.9,
    max_steps=500,
    eval_every=50,
    eval_tasks="",             # empty: the teachers' tasks
    metrics="",                # quality metrics on every eval image too: imagereward,hps,aesthetic,clipscore,pickscore
    eval_prompts=64,
    eval_images=1,             # images per eval prompt, each from its own noise (the tiny preset: 4)
    save_every=50,
    seed=0,
    wandb="",                  # a W&B project: every metrics.jsonl record is logged there too
)
TINY_ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
PRESETS = {
    # The tiny recipe (docs/recipe.md; tiny/recipe.sh measures each change alone):
    # - velocity weighting: under flowgrpo the first SDE steps, where layout and counts are decided,
    #   weigh ~5000x less than the late ones, and the student never took the count teacher's lead;
    # - the base as MAR anchor at beta_mar 0.5, and only the teachers' prompts (count, text): the clean
    #   teacher, the old anchor, reward-hacks clean by drawing less (its count is 0.09), so pulling towards
    #   it cost count; routing clean prompts to the base (the previous preset) taught the base's poor
    #   one-object drawing (count 0.358 < the init's 0.403) and routing them to the init lost clean
    #   (0.309); MAR at 0.5 on the count and text prompts alone keeps clean above the init (0.410);
    # - 4 images on each of 32 prompts per task at the periodic evals, with standard errors: one
    #   image per prompt moved the scores by 0.07-0.11 between evals of an unchanged student;
    # - a fresh student and 20 steps: from the base it reaches the teachers on count and text by step 20
    #   (+0.15 and +0.32, 5 and 8 standard errors), so the quickstart shows the method work in minutes
    #   (evals at steps 0 and 20 only, then the teachers': about 8 min on 2 CPU cores); the merge cold
    #   start is --init assets/tiny/merge (60 steps: --max_steps 60).
    "tiny": dict(TINY, group_size=4, prompts_per_step=8, batch_size=16, balance_tags=True,
                 lr=1e-3, lora_rank=8, lora_alpha=16, max_steps=20, eval_every=20, eval_prompts=32, eval_images=4,
                 save_every=10, ema_decay=0.8, eval_tasks="count,text,clean", kl_weighting="velocity",
                 teachers=[f"count={TINY_ASSETS / 'count'}", f"text={TINY_ASSETS / 'text'}"],
                 anchor="", beta_mar=0.5, init=""),
}


# -----------------------------------------------------------------------------
# the OPD maths: per-step KLs on fixed rollout states, and the policy-gradient variant

def kl_scale(sigma, sigma_next, dims, noise_level, weighting):
    """log-probs are per-dimension means, whose expected log-ratio is the exact KL / dims; this
    turns one into the units of transition_kl's weighting (exact: dims; flowgrpo: |dt|; velocity:
    dims over the step's time weight), read off the KL of a unit velocity difference."""
    unit, zero = torch.ones(len(sigma), dims), torch.zeros(len(sigma), dims)
    ratio = (transition_kl(unit, zero, sigma, sigma_next, noise_level, weighting)
             / transition_kl(unit, zero, sigma, sigma_next, noise_level, "exact"))
    return ratio * dims


def returns_to_go(rewards, gamma):
    """(B, T) per-step rewards -> discounted sums of the rewards from each step on."""
    out = torch.zeros_like(rewards)
    acc = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        acc = rewards[:, t] + gamma * acc
        out[:, t] = acc
    return out


def pg_reward(log_prob, lp_teacher, sigma, sigma_next, dims, cfg):
    """The LLM-style OPD reward of the sampled action, r_t = -(log pi_s - log pi_T) in
    transition_kl's units (so E[r_t] = -KL_t), detached. The surrogate uses Flow-GRPO's
    per-dim-mean ratio, whose gradient is 1/D of the full log-prob's, hence the factor D: the
    expected gradient then equals the pathwise one. Shape (B,)."""
    scale = kl_scale(torch.tensor([sigma]), torch.tensor([sigma_next]), dims, cfg["noise_level"], cfg["kl_weighting"])
    return (-(log_prob - lp_teacher) * scale.to(log_prob) * dims).detach()


def opd_loss(v, x, x_next, sigma, sigma_next, v_teacher, cfg, old_log_prob=None, adv=None, v_anchor=None,
             mar_rows=None):
    """The loss of one trained step for a micro-batch, given the student's velocity v (with
    gradient) at the states x and the labels there. The pg surrogate is added when adv (this
    step's advantages) is given. v_anchor: the anchor's velocity at the images mar_rows (None:
    all), each of which stands for cfg["mar_every"] images of its prompt in the MAR mean.
    Returns (loss, kl, mar) with kl and mar the per-sample KLs to the routed teacher and to the
    anchor (detached for logging)."""
    kl = transition_kl(v, v_teacher, sigma, sigma_next, cfg["noise_level"], cfg["kl_weighting"])
    loss = kl.mean() if cfg["loss"] in ("pathwise", "both") else torch.zeros((), device=v.device)
    if adv is not None:
        _, log_prob, _, _ = sde_step(v, x, sigma, sigma_next, cfg["noise_level"], prev_sample=x_next)
        loss = loss + ppo_loss(log_prob, old_log_prob, adv, cfg["clip_range"])[0]
    mar = torch.zeros(0, device=v.device)
    if v_anchor is not None and cfg["beta_mar"]:
        v_mar = v if mar_rows is None else v[mar_rows]
        mar = transition_kl(v_mar, v_anchor, sigma, sigma_next, cfg["noise_level"], cfg["kl_weighting"])
        loss = loss + cfg["beta_mar"] * mar.sum() * (1 if mar_rows is None else cfg["mar_every"]) / len(v)
    return loss, kl.detach(), mar.detach()


def task_schedule(step, sizes, prompts_per_step, epochs_per_task):
    """Alternate routing: the task whose prompts step `step` draws. Task k holds the stage for
    epochs_per_task[k] passes over its sizes[k] prompts, then the next task, in a cycle."""
    spans = [(t, max(1, round(epochs_per_task.get(t, 1) * n / prompts_per_step))) for t, n in sizes.items()]
    pos = step % sum(n for _, n in spans)
    for t, n in spans:
        if pos < n:
            return t
        pos -= n
    raise AssertionError("unreachable")


def parse_label_guidance(spec, tasks, default):
    """"geneval=1,ocr=4.5,anchor=3" -> {task: CFG scale} for every teacher's task and "anchor",
    the ones not named at the rollout's `default`. A teacher trained or best sampled at another
    guidance gives its labels there (DiffusionOPD labels its GenEval teacher at CFG 1)."""
    out = {t: default for t in [*tasks, "anchor"]}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in out:
            raise ValueError(f"--teacher_guidance {item!r}: {name!r} is neither a teacher's task "
                             f"({', '.join(tasks)}) nor anchor")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--teacher_guidance {item!r}: the scale must be a number") from None
    return out


# -----------------------------------------------------------------------------
# one OPD step on one micro-batch: rollout, routed labels, MAR, loss and backward in one pass

def distill_micro_batch(policy, prompts, routed, anchor, sigmas, trained_steps, generator, cfg, weight,
                        label_guidance=None, mar_rows=None):
    """Sample the student's SDE trajectories of `prompts` over the trained steps and accumulate
    weight * (the step losses) into the student's .grad, state by state. routed: each prompt's
    teacher adapter; anchor: the MAR adapter (BASE for the base); mar_rows: the images that
    carry the anchor KL (None: all). label_guidance: the CFG scale of each label row (the routed
    teachers', then the anchor's); None: --guidance. The student's own velocity is guided at
    --student_guidance (0: --guidance; 1: its conditional velocity alone). Returns the per-sample
    KLs to the routed teacher, (B, trained_steps), and to the anchor, (len(mar_rows), trained_steps)."""
    bs, student_guidance = len(prompts), cfg.get("student_guidance") or cfg["guidance"]
    cond = encode(policy, prompts)
    anchored = (list(range(bs)) if mar_rows is None else list(mar_rows)) if cfg["beta_mar"] else []
    names = routed + [anchor] * len(anchored)  # one label forward: the routed teachers, then the anchor
    rows = list(range(bs)) + anchored          # the label rows' images
    if label_guidance is None:
        label_guidance = cfg["guidance"]
    else:
        label_guidance = torch.tensor(label_guidance[:len(names)], device=policy.device)
    label_cond = tuple(c[rows] for c in cond)
    x = torch.randn((bs, *policy.latent_shape), generator=generator, device=generator.device).to(policy.device)
    kls, mars, replay = [], [], []
    for j in range(trained_steps):
        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        labels = adapter_velocities(policy, x[rows], s, label_cond, label_guidance, names)  # no_grad
        v_teacher, v_anchor = labels[:bs], (labels[bs:] if anchored else None)
        v = velocity(policy, x, s, cond, student_guidance)                                # the student
        x_next, log_prob, _, _ = sde_step(v.detach(), x, s, s_next, cfg["noise_level"], generator=generator)
        adv = None
        if cfg["loss"] != "pathwise":
            lp_teacher = sde_step(v_teacher, x, s, s_next, cfg["noise_level"], prev_sample=x_next)[1]
            adv = pg_reward(log_prob, lp_teacher, s, s_next, x[0].numel(), cfg)
            if cfg["gamma"]:  # the return needs later rewards: the pg term waits for the second pass
                replay.append((x, x_next, log_prob, adv))
                adv = None
        loss, kl, mar = opd_loss(v, x, x_next, s, s_next, v_teacher, cfg, log_prob, adv, v_anchor, mar_rows)
        if loss.requires_grad:  # pg with gamma > 0 and no anchor rows here: nothing to train until the second pass
            (loss * weight).backward()
        kls.append(kl)
        mars.append(mar)
        x = x_next
    if replay:  # --loss pg/both with gamma > 0: returns-to-go through the surrogate, a second pass
        returns = returns_to_go(torch.stack([adv for *_, adv in replay], 1), cfg["gamma"])
        for j, (x, x_next, old_log_prob, _) in enumerate(replay):
            s, s_next = sigmas[j].item(), sigmas[j + 1].item()
            v = velocity(policy, x, s, cond, student_guidance)
            log_prob = sde_step(v, x, s, s_next, cfg["noise_level"], prev_sample=x_next)[1]
            (ppo_loss(log_prob, old_log_prob, returns[:, j], cfg["clip_range"])[0] * weight).backward()
    return torch.stack(kls, 1), torch.stack(mars, 1)


# -----------------------------------------------------------------------------

def check_flags(cfg):
    """The flags that need no model, checked before anything loads: (teachers {task: path},
    each label's guidance {task or "anchor": CFG}, alternate routing's epochs per task)."""
    teachers = common.parse_teachers(cfg["teachers"])
    if not teachers:
        raise ValueError("no teachers: pass --teachers TASK=PATH ...")
    if cfg["loss"] not in ("pathwise", "pg", "both"):
        raise ValueError(f"unknown --loss {cfg['loss']!r}; use pathwise, pg or both")
    if cfg["routing"] not in ("mixed", "alternate"):
        raise ValueError(f"unknown --routing {cfg['routing']!r}; use mixed or alternate")
    epochs = {t: float(e) for t, _, e in (s.partition("=") for s in cfg["epochs_per_task"].split(",") if s)}
    if set(epochs) - set(teachers):
        raise ValueError(f"--epochs_per_task names tasks without a teacher: {sorted(set(epochs) - set(teachers))}")
    if cfg["student_guidance"] < 0:
        raise ValueError(f"--student_guidance {cfg['student_guidance']:g}: use 0 (the --guidance) or a CFG scale > 0")
    if cfg["mar_every"] < 1 or cfg["group_size"] % cfg["mar_every"]:
        raise ValueError(f"--mar_every {cfg['mar_every']} must be >= 1 and divide --group_size "
                         f"{cfg['group_size']}, so that every prompt's images share the anchor KL alike")
    return teachers, parse_label_guidance(cfg["teacher_guidance"], list(teachers), cfg["guidance"]), epochs


def main(argv=None):
    cfg = common.parse_config(DEFAULTS, PRESETS, argv, description=__doc__.split("\n\n")[0])
    rank, world, device = common.setup_dist()
    with common.startup_errors():
        teachers, label_guidance, epochs = check_flags(cfg)
        files = common.parse_prompt_files(cfg["prompts"], list(teachers))
        train_rows = {t: load_prompts(t, "train", files.get(t)) for t in teachers}
        eval_tasks, eval_rows = scoring.eval_set(cfg["eval_tasks"] or ",".join(teachers), cfg["eval_prompts"], files)
        prompts_per_rank, images_per_rank, micro = common.batch_plan(cfg, world)
        out, resume_from = common.prepare_run(cfg, rewards=(
            eval_tasks + scoring.metric_names(cfg["metrics"]) if cfg["eval_every"] else []))
        estimate.check_device("opd", cfg, device, distill_micro_batch, world)  # the memory it needs, before it loads
        policy = common.load_base(cfg, device)
        # one base in memory; teachers (or TASK=base: the base itself), anchor and student are adapters on it
        routes = {task: BASE if path == BASE else load_teacher(policy, path, task, cfg["teacher_rank"])
                  for task, path in teachers.items()}
        anchor = load_teacher(policy, cfg["anchor"], "anchor", cfg["teacher_rank"]) if cfg["anchor"] else BASE
        params, optimizer, ema, step = common.start_training(policy, cfg, resume_from, init=cfg["init"] or None)
    trained_steps = int(cfg["num_steps"] * cfg["timestep_fraction"])
    sigmas = sd3_sigmas(policy.pipe.scheduler.config, cfg["num_steps"])
    all_rows = [r for rows in train_rows.values() for r in rows]
    cache_prompts(policy, [r["prompt"] for r in all_rows + eval_rows])
    common.open_run(
        out, cfg, f"train prompts: {', '.join(f'{t} {len(r)}' for t, r in train_rows.items())}",
        *map(held_out_note, files.values()),
        f"teachers {teachers} | anchor {cfg['anchor'] or 'base'} (beta_mar {cfg['beta_mar']}, on 1 image in "
        f"{cfg['mar_every']}) | init {resume_from or cfg['init'] or 'fresh LoRA'} | loss {cfg['loss']} | "
        f"routing {cfg['routing']} | label guidance " + ", ".join(f"{k} {v:g}" for k, v in label_guidance.items())
        + f", student {cfg['student_guidance'] or cfg['guidance']:g}",
        f"per step: {cfg['prompts_per_step']} prompts x group {cfg['group_size']} over {world} rank(s); per rank "
        f"{images_per_rank} images in {micro} micro-batches of {cfg['batch_size']}; {trained_steps} of "
        f"{cfg['num_steps']} steps trained; {sum(p.numel() for p in params)} trainable")

    if cfg["eval_every"] and step == 0:
        scoring.eval_and_log(policy, ema, params, eval_rows, cfg, out, 0)
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=rank != 0, desc="opd")
    while step < cfg["max_steps"]:
        t0 = time.time()
        rows = all_rows if cfg["routing"] == "mixed" else train_rows[task_schedule(
            step, {t: len(r) for t, r in train_rows.items()}, cfg["prompts_per_step"], epochs)]
        picked = common.sample_rows(rows, prompts_per_rank, cfg["seed"], step, rank, cfg["balance_tags"])
        batch_rows = [r for r in picked for _ in range(cfg["group_size"])]
        gen = common.step_generator(device, cfg["seed"], step, rank)

        # one pass per micro-batch: the student's rollout, the routed teachers' and the anchor's labels at
        # its states, the per-step loss and its backward; then one optimizer update on the summed gradient
        policy.transformer.train()
        task_ids = torch.tensor([list(teachers).index(r["task"]) for r in batch_rows])
        kl_sum, mar_sum = torch.zeros(len(teachers), trained_steps), torch.zeros(trained_steps)
        for m in range(micro):
            idx = list(range(m * cfg["batch_size"], (m + 1) * cfg["batch_size"]))
            rows_m = [batch_rows[i] for i in idx]
            mar_rows = [k for k, i in enumerate(idx) if i % cfg["mar_every"] == 0]  # i: the image's place in the step
            row_guidance = ([label_guidance[r["task"]] for r in rows_m] + [label_guidance["anchor"]] * len(mar_rows)
                            if cfg["teacher_guidance"] else None)
            kl, mar = distill_micro_batch(policy, [r["prompt"] for r in rows_m], [routes[r["task"]] for r in rows_m],
                                          anchor, sigmas, trained_steps, gen, cfg, 1 / (micro * trained_steps),
                                          row_guidance, mar_rows)
            kl_sum.index_add_(0, task_ids[idx], kl.cpu())
            mar_sum += mar.sum(0).cpu()
        grad_norm = common.optimizer_update(params, optimizer, ema, cfg)
        step += 1

        # per task and per trajectory step: the KL to the teacher (it must fall) and the MAR KL
        kl_cnt = common.all_mean(torch.bincount(task_ids, minlength=len(teachers)).float())
        kl_tab = common.all_mean(kl_sum).float() / kl_cnt.clamp(min=1e-9)[:, None]
        mar_tab = common.all_mean(mar_sum).float() / (images_per_rank // cfg["mar_every"])
        seen = [t for k, t in enumerate(teachers) if kl_cnt[k] > 0]
        record = {"step": step, "kl": kl_tab[kl_cnt > 0].mean().item(), "mar_kl": mar_tab.mean().item(),
                  "grad_norm": grad_norm, "sec": time.time() - t0,
                  "kl_by_task": {t: kl_tab[list(teachers).index(t)].mean().item() for t in seen},
                  "kl_by_step": {t: [round(v, 6) for v in kl_tab[list(teachers).index(t)].tolist()] for t in seen},
                  "mar_by_step": [round(v, 6) for v in mar_tab.tolist()]}
        common.log_step(out, record, bar, kl=".3e", mar_kl=".2e")
        if cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["max_steps"]):
            scoring.eval_and_log(policy, ema, params, eval_rows, cfg, out, step)
        common.after_step(policy, params, optimizer, ema, cfg, out, step)
    bar.close()
    if cfg["eval_every"]:  # the verdict: the student beside where it started and its teachers, same prompts and noise
        scoring.final_table(policy, eval_rows, cfg, out, {f"teacher {t}": (a, label_guidance[t]) for t, a in routes.items()})
    common.finish_run(policy, params, out, cfg, ema)


if __name__ == "__main__":
    main(sys.argv[1:])
