"""
Cold start by SFT: ODE samples of every teacher on its own task's training prompts, then a fresh
student LoRA trained on them with the flow-matching loss. The result is the --init of
opd_distill.py. (Merging the teachers' LoRAs instead is merge_coldstart.py: no sampling, no
training, no GPU. SFT is a training stage, so it is a script of its own, with its own
checkpoints and --resume.)

    python sft_coldstart.py --preset tiny --teachers count=runs/count/final text=runs/text/final --out runs/sft
    torchrun --nproc_per_node=2 sft_coldstart.py --preset tiny --teachers ... --out runs/sft
    torchrun --nproc_per_node=8 sft_coldstart.py --teachers ocr=PATH geneval=PATH --out runs/sft   # SD3.5-M
    python opd_distill.py --preset tiny --init runs/sft/final --out runs/opd_from_sft

The teachers' samples are cached in --out (one file per rank, keyed by everything that changes a
sample), so a resumed run trains on the same set. metrics.jsonl holds the training loss and a
probe: the flow-matching loss on fixed samples, noise and sigmas, whose curve shows learning
rather than the sampling noise of the batches.
"""

import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import estimate
from lora import is_full_weights, load_teacher, read_lora
from prompts import load_prompts
from sde_sampler import encode, flow_matching_loss, initial_noise, noisy, rollout, velocity
from tiny.world import SAMPLING as TINY

# -----------------------------------------------------------------------------
# defaults: SD3.5-Medium; --preset tiny swaps in the tiny world
DEFAULTS = dict(
    model="",                 # hub id or pipeline folder; empty: SD3.5-Medium (or the preset's base)
    teachers=[],              # task=LORA or a bare LORA path (its task: the file/folder name)
    out="runs/sft",
    resolution=512,
    t5_tokens=256,            # T5 tokens per prompt (max_sequence_length); the tiny base has no T5 and uses 1
    embed_cache_gb=4.0,       # host RAM for prompt embeddings per process (SD3.5-M: 2.6 MiB a prompt)
    samples_per_task=1000,    # teacher samples per task, on that task's train prompts (cycled if fewer)
    sample_steps=40,          # ODE steps per teacher sample (the eval setting: the teachers' best images)
    guidance=4.5,             # CFG when sampling the teachers and in the student's training forward
    batch_size=8,             # samples per forward pass, per rank (sampling and training)
    gradient_checkpointing=False,  # recompute activations in the backward: ~1/3 more compute, less memory
    lr=1e-4,
    weight_decay=1e-4,
    max_grad_norm=1.0,
    lora_rank=32,             # the student's LoRA (Flow-GRPO's shape)
    lora_alpha=64,
    logit_mean=0.0,           # training sigmas s = sigmoid(N(logit_mean, logit_std)), SD3's logit-normal
    logit_std=1.0,
    max_steps=1000,
    probe_every=100,          # fixed-noise flow-matching loss on held samples (0: only at start and end)
    probe_samples=32,         # per rank
    save_every=100,
    seed=0,
    wandb="",                 # a W&B project: every metrics.jsonl record is logged there too
)
PRESETS = {
    "tiny": dict(resolution=TINY["resolution"], t5_tokens=TINY["t5_tokens"], sample_steps=TINY["eval_steps"],
                 guidance=TINY["guidance"], samples_per_task=128, batch_size=16, lr=1e-3, lora_rank=8, lora_alpha=16,
                 max_steps=300, probe_every=50, probe_samples=32, save_every=100),
}


# -----------------------------------------------------------------------------
# the maths and the teachers' samples

def sample_key(cfg):
    """What the cached teacher samples depend on: a cache with another key is sampled again."""
    return {k: cfg[k] for k in ("model", "teachers", "samples_per_task", "sample_steps", "guidance", "resolution",
                                "t5_tokens", "seed")}


def teacher_samples(policy, cfg, names, rows, rank, world, cache):
    """ODE samples (latents) of every teacher on its own task's train prompts, this rank's share.
    Each sample has its own noise stream (of --seed and its global index), so the set does not
    depend on the batch size or the number of ranks; it is cached in --out, keyed by everything that changes it."""
    key = sample_key(cfg)
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            print(f"rank {rank}: {len(saved['prompts'])} teacher samples from {cache}")
            return saved["prompts"], saved["latents"]
    plan = []
    for n in names:
        order = list(rows[n])
        random.Random(cfg["seed"]).shuffle(order)
        plan += [(n, order[i % len(order)]["prompt"]) for i in range(cfg["samples_per_task"])]
    mine = list(range(rank, len(plan), world))
    prompts, latents = [], []
    policy.transformer.eval()
    bar = tqdm(total=len(mine), disable=rank != 0, desc="teacher samples")
    for n in names:  # one adapter at a time: routing by task
        idx = [i for i in mine if plan[i][0] == n]
        for j in range(0, len(idx), cfg["batch_size"]):
            chunk = idx[j:j + cfg["batch_size"]]
            batch = [plan[i][1] for i in chunk]
            x = initial_noise(policy, [common.stream_seed("sample", cfg["seed"], i) for i in chunk])
            latents.append(rollout(policy, batch, cfg["sample_steps"], cfg["guidance"], 0.0, latents=x,
                                   adapter=n)["latents"].float().cpu())
            prompts += batch
            bar.update(len(chunk))
    bar.close()
    latents = torch.cat(latents)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"key": key, "prompts": prompts, "latents": latents}, tmp)
    tmp.replace(cache)
    return prompts, latents


def fm_batch(n, batch_size, shape, generator, logit_mean, logit_std, idx=None):
    """Indices, noise and logit-normal sigmas of one training (or probe) batch."""
    idx = torch.randint(n, (batch_size,), generator=generator) if idx is None else idx
    eps = torch.randn((len(idx), *shape), generator=generator)
    s = torch.sigmoid(logit_mean + logit_std * torch.randn(len(idx), generator=generator))
    return idx, eps, s


# The student is trained and used with CFG: its *guided* velocity v_u + w (v_c - v_u) is fit to
# the teachers' samples, which were themselves drawn with CFG. The guided velocity is what
# sampling and opd_distill.py use (distilled velocities are guided ones), so its flow-matching
# minimiser reproduces the teachers' sample distribution under the same guidance. Training the
# conditional velocity alone would fit guided samples and then be guided once more at sampling.
# The price: the gradient reaches the unconditional half scaled by (1 - w), -3.5 at w = 4.5, so
# that half moves against the error and 3.5x as hard; the guided sum is what is fit, not each half.
def sft_loss(policy, prompts, latents, idx, eps, s, cfg):
    """The flow-matching loss of the student's guided velocity on the teachers' samples idx, at
    noise eps and sigmas s (an fm_batch)."""
    x0, eps, s = latents[idx].to(policy.device), eps.to(policy.device), s.to(policy.device)
    v = velocity(policy, noisy(x0, eps, s), s, encode(policy, [prompts[i] for i in idx]), cfg["guidance"])
    return flow_matching_loss(v, x0, eps)


@torch.no_grad()
def log_probe(policy, prompts, latents, probe, cfg, out, step):
    """The probe: the loss on fixed samples (spread over the tasks), noise and sigmas, so that its
    curve shows learning rather than the sampling noise of the training batches."""
    b, n = cfg["batch_size"], len(probe[0])
    total = sum(sft_loss(policy, prompts, latents, *(t[i:i + b] for t in probe), cfg).item() * len(probe[0][i:i + b])
                for i in range(0, n, b))
    value = common.all_mean(total / n).item()
    if common.is_rank0():
        common.log_metrics(out, {"step": step, "probe_loss": value})
        tqdm.write(f"step {step}: probe flow-matching loss {value:.4f}")


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(DEFAULTS, PRESETS, argv, description=__doc__.split("\n\n")[0])
    rank, world, device = common.setup_dist()
    with common.startup_errors():
        teachers = common.parse_teachers(cfg["teachers"])
        if not teachers:
            raise ValueError("no teachers: pass --teachers TASK=LORA ...")
        if cfg["samples_per_task"] < 1 or cfg["batch_size"] < 1:
            raise ValueError("--samples_per_task and --batch_size must be positive")
        for source in teachers.values():  # every LoRA readable before the pipeline loads; its layers are checked on loading
            if not is_full_weights(source):
                read_lora(source)
        rows = {n: load_prompts(n, "train") for n in teachers}
        out, resume_from = common.prepare_run(cfg)
        estimate.check_device("sft", cfg, device, flow_matching_loss, world)  # the memory it needs, before it loads
        policy = common.load_base(cfg, device)
        for n, source in teachers.items():  # a LoRA, or full weights sampled through their own copy
            load_teacher(policy, source, n)
        params, optimizer, _, step = common.start_training(policy, cfg, resume_from, keep_ema=False)
    common.open_run(
        out, cfg, *(f"teacher {n}: {source}" for n, source in teachers.items()),
        f"sft: {len(teachers)} teachers x {cfg['samples_per_task']} ODE samples ({cfg['sample_steps']} steps, "
        f"guidance {cfg['guidance']}) over {world} rank(s); then {cfg['max_steps']} steps x {cfg['batch_size']} "
        f"samples per rank = {cfg['batch_size'] * world} per step, student LoRA r={cfg['lora_rank']} "
        f"alpha={cfg['lora_alpha']}")
    prompts, latents = teacher_samples(policy, cfg, list(teachers), rows, rank, world,
                                       out / f"sft_samples.{rank}-of-{world}.pt")
    n_probe = min(cfg["probe_samples"], len(prompts))
    probe = fm_batch(len(prompts), n_probe, latents.shape[1:], common.step_generator("cpu", cfg["seed"], 0, 0, "probe"),
                     cfg["logit_mean"], cfg["logit_std"], idx=torch.linspace(0, len(prompts) - 1, n_probe).long())

    if step == 0:
        log_probe(policy, prompts, latents, probe, cfg, out, 0)
    policy.transformer.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=rank != 0, desc="sft")
    while step < cfg["max_steps"]:
        t0 = time.time()
        gen = common.step_generator("cpu", cfg["seed"], step, rank)
        batch = fm_batch(len(prompts), cfg["batch_size"], latents.shape[1:], gen, cfg["logit_mean"], cfg["logit_std"])
        loss = sft_loss(policy, prompts, latents, *batch, cfg)
        loss.backward()
        grad_norm = common.optimizer_update(params, optimizer, None, cfg)
        step += 1
        record = {"step": step, "loss": common.all_mean(loss.item()).item(), "grad_norm": grad_norm,
                  "sec": time.time() - t0}
        common.log_step(out, record, bar, loss=".4f")
        if (cfg["probe_every"] and step % cfg["probe_every"] == 0) or step == cfg["max_steps"]:
            log_probe(policy, prompts, latents, probe, cfg, out, step)
        common.after_step(policy, params, optimizer, None, cfg, out, step)
    bar.close()
    common.finish_run(policy, params, out, cfg)  # final/, "done", and the process group closed


if __name__ == "__main__":
    main(sys.argv[1:])
