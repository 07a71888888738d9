"""
Stage 1: Flow-GRPO. One reward makes a teacher; several tasks make the GRPO-Mix baseline.

    python teacher_grpo.py --preset tiny --reward count --out runs/count            # a tiny teacher
    python teacher_grpo.py --preset tiny --tasks count,text --shared_reward clean:0.2 --out runs/mix
    torchrun --nproc_per_node=2 teacher_grpo.py --preset tiny --reward text --out runs/text
    torchrun --nproc_per_node=8 teacher_grpo.py --reward ocr --out runs/ocr          # SD3.5-Medium

Each step: every rank samples its prompts, G images per prompt by SDE rollouts with CFG (SDE
over the trained steps, ODE after them, so no sampling noise is left in the scored image;
recording the per-step log-probs, and the base model's velocities at the visited states for the
KL term), scores them with each prompt's own task reward, and turns the scores into group
advantages. Then the student LoRA is trained on the first int(num_steps * timestep_fraction)
steps of every trajectory with the PPO clipped loss on the per-step log-prob ratio plus
beta * KL(student || base). Gradients are averaged over ranks once per optimizer update.
"""

import sys
import time

import torch
from tqdm import tqdm

import common
import estimate
import scoring
from prompts import held_out_note, load_prompts
from rewards import get_reward, parse_reward_spec
from sde_sampler import (BASE, adapter_velocities, cache_prompts, decode, encode, group_advantages, ppo_loss,
                         rollout_batches, sde_step, transition_kl, velocity)
from tiny.world import SAMPLING as TINY

# -----------------------------------------------------------------------------
# defaults: SD3.5-Medium with the Flow-GRPO authors' settings; --preset tiny swaps in the tiny world
DEFAULTS = dict(
    model="",                 # hub id or pipeline folder; empty: SD3.5-Medium (or the preset's base)
    reward="",                # a teacher: one reward; its name is also the task whose prompts are used
    tasks="",                 # GRPO-Mix: "ocr,geneval", each prompt scored by its own task's reward
    shared_reward="",         # added to every prompt's reward, e.g. "pickscore:0.2"
    prompts="",               # a prompt file for --reward (Flow-GRPO's formats); empty: the built-in set
    out="runs/teacher",
    resolution=512,
    t5_tokens=256,  # T5 tokens per prompt (max_sequence_length); the tiny base has no T5 and uses 1
    embed_cache_gb=4.0,       # host RAM for prompt embeddings per process (SD3.5-M: 2.6 MiB a prompt)
    num_steps=10,             # SDE steps per rollout
    eval_steps=40,            # ODE steps for evaluation
    guidance=4.5,             # CFG in rollouts and in every training forward
    noise_level=0.7,          # a in std_s = a * sqrt(s / (1 - s))
    group_size=16,            # images per prompt: the GRPO group
    prompts_per_step=48,      # prompts per step over all ranks (48 x 16 = 768 images)
    balance_tags=False,       # draw every task, and every tag within it, equally often (authors: uniform)
    batch_size=8,             # images per forward pass, per rank (the micro-batch)
    gradient_checkpointing=False,  # recompute activations in the backward: ~1/3 more compute, less memory
    updates_per_step=2,       # optimizer updates per batch of rollouts (later ones are off-policy)
    timestep_fraction=0.99,   # train the first int(num_steps * 0.99) = 9 of 10 steps
    clip_range=1e-4,          # PPO ratio clip
    adv_clip=5.0,
    global_std=True,          # normalise advantages by the std over the whole batch (authors' configs)
    beta=0.04,                # weight of KL(student || base), the base being the adapter disabled
    kl_weighting="flowgrpo",  # "flowgrpo" (authors') or "exact"
    lr=3e-4,
    weight_decay=1e-4,
    max_grad_norm=1.0,
    lora_rank=32,
    lora_alpha=64,
    ema_decay=0.9,            # EMA of the LoRA weights, used for eval and the final checkpoint
    max_steps=1000,
    eval_every=50,            # 0 disables periodic eval
    eval_tasks="ocr,geneval", # every task is scored at eval, not only the trained one (the seesaw)
    metrics="",               # quality metrics on every eval image too: imagereward,hps,aesthetic,clipscore,pickscore
    eval_prompts=64,          # test prompts per task at eval, evenly spaced over the set
    eval_images=1,            # images per eval prompt, each from its own noise
    save_every=50,
    seed=0,
    wandb="",                 # a W&B project: every metrics.jsonl record is logged there too
)
PRESETS = {
    # Flow-GRPO-Fast's trick: train only the first half of the steps (layout is decided early),
    # and spend what that saves on more prompts per step, since most tiny groups have no spread.
    # Tags balanced: 300 of the 336 count prompts are two-object or position ones, where the base
    # scores ~0.05 and groups rarely spread; with uniform draws the count teacher got worse.
    "tiny": dict(TINY, group_size=8, prompts_per_step=8, timestep_fraction=0.5, balance_tags=True,
                 batch_size=16, updates_per_step=1, lr=2e-3, lora_rank=8, lora_alpha=16, max_steps=80,
                 eval_every=20, eval_tasks="count,text,clean", eval_prompts=32, save_every=20, ema_decay=0.8),
}


# -----------------------------------------------------------------------------
# the maths of a GRPO step

def step_loss(policy, traj, idx, j, adv, cond, cfg):
    """PPO loss, KL to the base (0 when beta is 0) and clip fraction at step j of the rollouts
    idx, recomputing the student's velocity with gradients; adv holds those rollouts' advantages.
    The base's velocity (the KL's reference) is taken here, at the trained states only."""
    s, s_next = traj["sigmas"][j].item(), traj["sigmas"][j + 1].item()
    x = traj["states"][idx, j]
    v_ref = adapter_velocities(policy, x, s, cond, cfg["guidance"], BASE) if cfg["beta"] else None
    v = velocity(policy, x, s, cond, cfg["guidance"])
    _, log_prob, _, _ = sde_step(v, x, s, s_next, cfg["noise_level"], prev_sample=traj["next_states"][idx, j])
    loss, clipfrac = ppo_loss(log_prob, traj["log_probs"][idx, j], adv, cfg["clip_range"])
    kl = (transition_kl(v, v_ref, s, s_next, cfg["noise_level"], cfg["kl_weighting"]).mean()
          if cfg["beta"] else torch.zeros((), device=x.device))
    return loss, kl, clipfrac


# -----------------------------------------------------------------------------

def task_rewards(images, rows, rewards, shared=None):
    """Each image's reward, by its own task's reward (rewards: {task: reward function}) plus the
    shared reward on every image where there is one: a float tensor on the CPU."""
    scores = torch.zeros(len(rows))
    for t, reward in rewards.items():
        idx = [i for i, r in enumerate(rows) if r["task"] == t]
        if idx:
            scores[idx] = reward([images[i] for i in idx], [rows[i]["prompt"] for i in idx],
                                 [rows[i]["metadata"] for i in idx])[0].float().cpu()
    if shared is not None:
        scores += shared(images, [r["prompt"] for r in rows], [r["metadata"] for r in rows])[0].float().cpu()
    return scores


def main(argv=None):
    cfg = common.parse_config(DEFAULTS, PRESETS, argv, description=__doc__.split("\n\n")[0])
    rank, world, device = common.setup_dist()
    with common.startup_errors():
        if bool(cfg["reward"]) == bool(cfg["tasks"]):
            raise ValueError("give exactly one of --reward (a teacher) or --tasks (GRPO-Mix)")
        tasks = [cfg["reward"]] if cfg["reward"] else [t.strip() for t in cfg["tasks"].split(",") if t.strip()]
        rewards = {t: get_reward(t) for t in tasks}
        shared = parse_reward_spec(cfg["shared_reward"]) if cfg["shared_reward"] else None
        if cfg["prompts"] and len(tasks) > 1:
            raise ValueError("--prompts is for a single --reward; GRPO-Mix uses each task's built-in set")
        train_rows = [r for t in tasks for r in load_prompts(t, "train", cfg["prompts"] or None)]
        eval_tasks, eval_rows = scoring.eval_set(cfg["eval_tasks"], cfg["eval_prompts"],
                                                 {cfg["reward"]: cfg["prompts"]} if cfg["prompts"] else {})
        prompts_per_rank, images_per_rank, micro = common.batch_plan(cfg, world)
        if micro % cfg["updates_per_step"]:
            raise ValueError(f"--updates_per_step {cfg['updates_per_step']} does not divide the {micro} micro-batches")
        if cfg["group_size"] < 2:
            raise ValueError("--group_size must be at least 2 (advantages compare images of one prompt)")
        out, resume_from = common.prepare_run(cfg, rewards=[
            *tasks, cfg["shared_reward"], *(eval_tasks + scoring.metric_names(cfg["metrics"]) if cfg["eval_every"] else [])])
        estimate.check_device("grpo", cfg, device, step_loss, world)  # the memory it needs, before it loads
        policy = common.load_base(cfg, device)
        cache_prompts(policy, [r["prompt"] for r in train_rows + eval_rows])
        params, optimizer, ema, step = common.start_training(policy, cfg, resume_from)
    trained_steps = int(cfg["num_steps"] * cfg["timestep_fraction"])
    per_update = micro // cfg["updates_per_step"]
    common.open_run(
        out, cfg, f"tasks {tasks} | {len(train_rows)} train prompts | eval {eval_tasks} x {cfg['eval_prompts']}",
        held_out_note(cfg["prompts"]),
        f"per step: {cfg['prompts_per_step']} prompts x group {cfg['group_size']} over {world} rank(s); per rank "
        f"{images_per_rank} images in {micro} micro-batches of {cfg['batch_size']}; {cfg['updates_per_step']} "
        f"optimizer update(s) x {trained_steps} trained steps of {cfg['num_steps']}")

    if cfg["eval_every"] and step == 0:
        scoring.eval_and_log(policy, ema, params, eval_rows, cfg, out, 0)
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=rank != 0, desc="grpo")
    while step < cfg["max_steps"]:
        t0 = time.time()
        gen = common.step_generator(device, cfg["seed"], step, rank)
        picked = common.sample_rows(train_rows, prompts_per_rank, cfg["seed"], step, rank, cfg["balance_tags"])
        batch_rows = [r for r in picked for _ in range(cfg["group_size"])]
        groups = torch.arange(prompts_per_rank).repeat_interleave(cfg["group_size"])

        # rollouts: SDE samples of the current student (SDE over the trained steps, ODE after)
        policy.transformer.eval()
        traj = rollout_batches(policy, [r["prompt"] for r in batch_rows], cfg["batch_size"],
                               num_steps=cfg["num_steps"], guidance=cfg["guidance"], noise_level=cfg["noise_level"],
                               generator=gen, sde_steps=trained_steps)

        # rewards: each image by its own task's reward (+ the shared one), then group advantages
        scores = task_rewards(decode(policy, traj["latents"], cfg["batch_size"]), batch_rows, rewards, shared)
        all_scores = torch.cat([torch.as_tensor(s) for s in common.all_gather_objects(scores)])
        all_groups = torch.cat([g + k * prompts_per_rank for k, g in enumerate(common.all_gather_objects(groups))])
        adv = group_advantages(all_scores, all_groups, cfg["global_std"], cfg["adv_clip"])
        adv = adv[rank * images_per_rank:(rank + 1) * images_per_rank].to(device)

        # training: PPO on the per-step log-prob ratio + beta * KL to the base, over trained steps
        policy.transformer.train()
        order = torch.randperm(images_per_rank, generator=common.step_generator("cpu", cfg["seed"], step, rank, "shuffle"))
        stats = {"policy_loss": 0.0, "kl": 0.0, "clipfrac": 0.0}  # summed as tensors: no .item() wait per step
        n = cfg["updates_per_step"] * per_update * trained_steps
        for u in range(cfg["updates_per_step"]):
            for m in range(u * per_update, (u + 1) * per_update):
                idx = order[m * cfg["batch_size"]:(m + 1) * cfg["batch_size"]]
                cond = encode(policy, [batch_rows[i]["prompt"] for i in idx.tolist()])
                idx = idx.to(device)
                for j in range(trained_steps):
                    loss, kl, clipfrac = step_loss(policy, traj, idx, j, adv[idx], cond, cfg)
                    ((loss + cfg["beta"] * kl) / (per_update * trained_steps)).backward()
                    for k, v in zip(stats, (loss, kl, clipfrac)):
                        stats[k] += v.detach() / n
            grad_norm = common.optimizer_update(params, optimizer, ema, cfg)
        step += 1

        record = {"step": step, "reward": common.all_mean(scores.mean()).item(), "grad_norm": grad_norm,
                  **{k: common.all_mean(v).item() for k, v in stats.items()}, "sec": time.time() - t0}
        for t in tasks:
            m = [i for i, r in enumerate(batch_rows) if r["task"] == t]
            record[f"reward_{t}"] = common.all_mean(scores[m].mean() if m else float("nan")).item()
        common.log_step(out, record, bar, reward=".3f", kl=".2e")
        if cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["max_steps"]):
            scoring.eval_and_log(policy, ema, params, eval_rows, cfg, out, step)
        common.after_step(policy, params, optimizer, ema, cfg, out, step)
    bar.close()
    common.finish_run(policy, params, out, cfg, ema)


if __name__ == "__main__":
    main(sys.argv[1:])
