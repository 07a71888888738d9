"""
Is there a learning signal? Flow-GRPO's gradient from independent rollout batches, compared.

    python -m tools.grpo_snr --preset tiny --reward count                    # the tiny teachers' recipe
    python -m tools.grpo_snr --preset tiny --reward count --probe_prompts 8  # 8 prompts, as in training
    python -m tools.grpo_snr --preset tiny --reward clean --noise_level 0.4  # any teacher_grpo.py flag

A teacher learns only if the gradient of one step points somewhere. This draws --batches
independent rollout batches (prompts_per_step groups of group_size SDE samples each, the groups
cycling over --probe_prompts training prompts, the same prompts in every batch), computes
teacher_grpo.py's loss gradient on a fresh student LoRA for each, and prints the mean cosine
between the gradients of different batches. Unbiased estimates of one gradient agree (cosine
> 0) in proportion to how much the signal outweighs the sampling noise. The control recomputes
every gradient with the advantages shuffled within each group (the same samples, the reward's
information gone): its cosine is the level of no signal. A few minutes of 2 CPU cores, where a
teacher run that answers the same question takes 15.
"""

import itertools
import sys

import torch

import common
import teacher_grpo
from lora import add_student
from prompts import load_prompts, spread
from rewards import get_reward, preload, set_device
from sde_sampler import decode, encode, group_advantages, load_policy, resolve_model, rollout_batches

DEFAULTS = dict(teacher_grpo.DEFAULTS, batches=4, probe_prompts=1)


def grad_vector(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def mean_cosine(vectors):
    pairs = list(itertools.combinations(vectors, 2))
    return sum(torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in pairs) / len(pairs)


def shuffle_within_groups(adv, groups, generator):
    out = adv.clone()
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        out[idx] = adv[idx[torch.randperm(len(idx), generator=generator)]]
    return out


def main(argv=None):
    cfg = common.parse_config(DEFAULTS, teacher_grpo.PRESETS, argv, description=__doc__.split("\n\n")[0])
    with common.startup_errors():
        if not cfg["reward"]:
            raise ValueError("give --reward (the probe measures one teacher's signal)")
        reward = get_reward(cfg["reward"])
        rows = spread(load_prompts(cfg["reward"], "train", cfg["prompts"] or None), cfg["probe_prompts"])
        if cfg["batches"] < 2:
            raise ValueError("--batches must be at least 2 (cosines compare batches)")
        cfg["model"] = resolve_model(cfg["model"], cfg["preset"])
        preload([cfg["reward"]])
    device = common.setup_dist()[2]
    torch.manual_seed(cfg["seed"])
    set_device(device)
    with common.startup_errors():  # a model the hub cannot give: one line
        policy = load_policy(cfg["model"], device=device, resolution=cfg["resolution"], t5_tokens=cfg["t5_tokens"])
    params = add_student(policy, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"])
    trained_steps = int(cfg["num_steps"] * cfg["timestep_fraction"])
    picked = [rows[i % len(rows)] for i in range(cfg["prompts_per_step"])]
    batch_rows = [r for r in picked for _ in range(cfg["group_size"])]
    prompts, metadata = [r["prompt"] for r in batch_rows], [r["metadata"] for r in batch_rows]
    groups = torch.arange(len(picked)).repeat_interleave(cfg["group_size"])
    print(f"{cfg['reward']}: {len(rows)} prompt(s) [{rows[0]['prompt']!r}, ...], {cfg['batches']} batches of "
          f"{len(picked)} groups x {cfg['group_size']}, {trained_steps} trained steps of {cfg['num_steps']}")

    def gradient(traj, adv):
        for p in params:
            p.grad = None
        for i in range(0, len(prompts), cfg["batch_size"]):
            idx = torch.arange(i, min(i + cfg["batch_size"], len(prompts)), device=device)
            cond = encode(policy, prompts[i:i + cfg["batch_size"]])
            for j in range(trained_steps):
                loss, kl, _ = teacher_grpo.step_loss(policy, traj, idx, j, adv[idx], cond, cfg)
                (loss + cfg["beta"] * kl).backward()
        return grad_vector(params)

    grads, controls, spreads, means = [], [], [], []
    for k in range(cfg["batches"]):
        gen = common.step_generator(device, cfg["seed"], k, 0)
        policy.transformer.eval()
        traj = rollout_batches(policy, prompts, cfg["batch_size"], num_steps=cfg["num_steps"], guidance=cfg["guidance"], noise_level=cfg["noise_level"],
                               generator=gen, sde_steps=trained_steps)
        scores = reward(decode(policy, traj["latents"], cfg["batch_size"]), prompts, metadata)[0].float().cpu()
        adv = group_advantages(scores, groups, cfg["global_std"], cfg["adv_clip"])
        policy.transformer.train()
        grads.append(gradient(traj, adv.to(device)))
        shuffled = shuffle_within_groups(adv, groups, common.step_generator("cpu", cfg["seed"], k, 0, "control"))
        controls.append(gradient(traj, shuffled.to(device)))
        means.append(scores.mean().item())
        spreads.append(torch.stack([scores[groups == g].std() for g in groups.unique()]).mean().item())
        print(f"batch {k}: reward {means[-1]:.3f}, within-group std {spreads[-1]:.3f}", flush=True)
    signal, control = mean_cosine(grads), mean_cosine(controls)
    print(f"gradient cosine between batches: {signal:.3f} (control, advantages shuffled: {control:.3f})")
    return {"cosine": signal, "control": control, "reward": sum(means) / len(means),
            "group_std": sum(spreads) / len(spreads)}


if __name__ == "__main__":
    main(sys.argv[1:])
