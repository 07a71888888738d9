"""
Cold start for the student: merge the teachers' LoRAs into one, or fine-tune a fresh LoRA on the
teachers' own samples (SFT). The result is the --init of opd_distill.py.

    python merge_coldstart.py --preset tiny --teachers count=runs/count/final text=runs/text/final --out runs/merge
    python merge_coldstart.py --preset tiny --teachers runs/count/final runs/text/final --method svd --rank 8 --out runs/svd
    python merge_coldstart.py --preset tiny --teachers count=runs/count/final text=runs/text/final --method sft --out runs/sft
    torchrun --nproc_per_node=2 merge_coldstart.py --preset tiny --teachers ... --method sft --out runs/sft
    python merge_coldstart.py --teachers ocr=ocr_teacher/ geneval=geneval_teacher/ --out runs/merge   # SD3.5-Medium
    python opd_distill.py --preset tiny --teachers ... --init runs/merge/final --out runs/opd

A teacher LoRA k adds delta_k = s_k B_k A_k to every adapted Linear, s_k = alpha_k / r_k (per
layer, from its rank/alpha patterns). The merge rules:

- exact (default): delta = sum_k w_k delta_k, represented exactly as one LoRA of rank sum_k r_k by
  stacking the factors: B = [w_1 s_1 B_1, ..., w_K s_K B_K], A = [A_1; ...; A_K].
- svd: that delta, truncated to rank --rank per layer (the best rank-r approximation).
- ties: TIES merging (trim, elect sign, disjoint mean) of the deltas, refactored to rank --rank.
- average: element-wise average of the A's and of the B's, as the authors' script does. Not a
  merge of the deltas (B_avg A_avg has cross terms B_j A_k), kept for comparison.
- sft: ODE samples of every teacher on its own task's training prompts, then a fresh student LoRA
  trained on them with the flow-matching loss.

Every run writes --out/final/ (a LoRA folder that StableDiffusion3Pipeline.load_lora_weights and
opd_distill.py --init take; its weights file is also linked into --out itself), config.json,
metrics.jsonl and merge_report.json: the relative Frobenius error of the result's delta against
the exact weighted delta, per layer and overall.
"""

import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import common
from prompts import load_prompts
from sde_sampler import (add_student, check_lora_fits, encode, initial_noise, load_adapter, load_policy,
                         read_lora, resolve_model, rollout, save_lora, velocity)
from tinyworld import SAMPLING as TINY

# -----------------------------------------------------------------------------
# defaults: SD3.5-Medium; --preset tiny swaps in the tiny world
DEFAULTS = dict(
    model="",                 # hub id or pipeline folder; empty: SD3.5-Medium (or the preset's base)
    teachers=[],              # task=LORA or a bare LORA path (its task: the file/folder name)
    weights="",               # w_k, comma-separated in teacher order; empty: 1/K each (sft: the report's only)
    method="exact",           # exact | svd | ties | average | sft
    out="runs/merge",
    rank=0,                   # svd/ties: output rank per layer; 0: the largest teacher rank
    density=0.2,              # ties: fraction of each teacher's delta entries kept (TIES paper: 20%)
    # sft only
    resolution=512,
    t5_tokens=256,  # T5 tokens per prompt (max_sequence_length); the tiny base has no T5 and uses 1
    samples_per_task=1000,    # teacher samples per task, on that task's train prompts (cycled if fewer)
    sample_steps=40,          # ODE steps per teacher sample (the eval setting: the teachers' best images)
    guidance=4.5,             # CFG when sampling the teachers and in the student's training forward
    batch_size=8,             # samples per forward pass, per rank (sampling and training)
    lr=1e-4,
    weight_decay=1e-4,
    max_grad_norm=1.0,
    lora_rank=32,             # the SFT student's LoRA (Flow-GRPO's shape)
    lora_alpha=64,
    logit_mean=0.0,           # training sigmas s = sigmoid(N(logit_mean, logit_std)), SD3's logit-normal
    logit_std=1.0,
    max_steps=1000,
    probe_every=100,          # fixed-noise flow-matching loss on held samples (0: only at start and end)
    probe_samples=32,         # per rank
    save_every=100,
    seed=0,
)
PRESETS = {
    "tiny": dict(resolution=TINY["resolution"], t5_tokens=TINY["t5_tokens"], sample_steps=TINY["eval_steps"],
                 guidance=TINY["guidance"], samples_per_task=128, batch_size=16, lr=1e-3, lora_rank=8, lora_alpha=16,
                 max_steps=300, probe_every=50, probe_samples=32, save_every=100),
}
METHODS = ("exact", "svd", "ties", "average", "sft")


# -----------------------------------------------------------------------------
# the maths: a teacher is {module: (B, A, s)}, adding s * B @ A to that Linear; a merge result is
# {module: (B, A)} adding B @ A (every scale folded into B)

def layer_scale(lora_kwargs, module, rank):
    """alpha / r of one layer, as peft computes it: alpha_pattern before lora_alpha, rsLoRA's sqrt."""
    from peft.utils.other import get_pattern_key
    pattern = lora_kwargs.get("alpha_pattern") or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), module), lora_kwargs["lora_alpha"])
    return alpha / math.sqrt(rank) if lora_kwargs.get("use_rslora") else alpha / rank


def lora_factors(state, lora_kwargs):
    """read_lora's output -> {module: (B, A, s)} in float64: the layer adds s * B @ A."""
    out = {}
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            m = key[: -len(".lora_A.weight")]
            a, b = state[key].double(), state[m + ".lora_B.weight"].double()
            out[m] = (b, a, layer_scale(lora_kwargs, m, a.shape[0]))
    return out


def exact_merge(teachers, weights):
    """sum_k w_k s_k B_k A_k as one LoRA: the factors stacked along the rank, no approximation.
    Layers some teachers lack stack only the others'."""
    merged = {}
    for m in sorted(set().union(*teachers)):
        parts = [(w * t[m][2] * t[m][0], t[m][1]) for t, w in zip(teachers, weights) if m in t]
        merged[m] = (torch.cat([b for b, _ in parts], 1), torch.cat([a for _, a in parts], 0))
    return merged


def factorize(delta, rank):
    """The best rank-`rank` factors of a matrix (Eckart-Young), split evenly: B = U sqrt(S), A = sqrt(S) V^T."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def low_rank(b, a, rank):
    """factorize(b @ a, rank) without forming b @ a: QR both factors, SVD the small core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    cb, ca = factorize(rb @ ra.T, rank)
    return qb @ cb, ca @ qa.T


def svd_merge(teachers, weights, rank):
    return {m: low_rank(b, a, rank) for m, (b, a) in exact_merge(teachers, weights).items()}


def ties_delta(deltas, weights, density):
    """TIES (Yadav et al. 2023) on one layer's teacher deltas: keep each delta's top `density`
    fraction of entries by magnitude, elect every entry's sign by the weighted sum of the trimmed
    deltas, and take the w-weighted mean of the entries that agree with it, scaled by sum(w) (TIES'
    lambda). With density 1 and no sign conflict this is the exact weighted sum."""
    trimmed = []
    for d in deltas:
        keep = max(1, round(density * d.numel()))
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        mask[d.abs().flatten().topk(keep).indices] = True
        trimmed.append(d * mask.view_as(d))
    t = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=t.dtype).view(-1, 1, 1)
    sign = torch.sign((w * t).sum(0))
    agree = w * ((torch.sign(t) == sign) & (t != 0))
    mass = agree.sum(0)
    return torch.where(mass > 0, (agree * t).sum(0) / mass.clamp_min(1e-30), 0.0) * w.sum()


def ties_merge(teachers, weights, density, rank):
    return {m: factorize(ties_delta([t[m][2] * t[m][0] @ t[m][1] for t in teachers], weights, density), rank)
            for m in sorted(teachers[0])}


def average_merge(teachers, weights):
    """The authors' rule: A = sum_k w_k A_k, B = sum_k w_k s_k B_k (each teacher's scale folded into its
    B: their script exactly when the teachers share alpha/r). Needs equal ranks per layer."""
    return {m: (sum(w * t[m][2] * t[m][0] for t, w in zip(teachers, weights)),
                sum(w * t[m][1] for t, w in zip(teachers, weights))) for m in sorted(teachers[0])}


def relative_errors(merged, reference):
    """||delta - delta_ref||_F / ||delta_ref||_F per layer and overall (a layer missing on one side
    counts as a zero delta there)."""
    per_layer, num, den = {}, 0.0, 0.0
    for m in sorted(set(merged) | set(reference)):
        d = merged[m][0] @ merged[m][1] if m in merged else 0.0
        ref = reference[m][0] @ reference[m][1] if m in reference else torch.zeros_like(d)
        diff, norm = float(torch.linalg.norm(d - ref)) ** 2, float(torch.linalg.norm(ref)) ** 2
        per_layer[m] = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
        num, den = num + diff, den + norm
    overall = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return overall, per_layer


# -----------------------------------------------------------------------------
# setup helpers

def parse_weights(text, k):
    if not text:
        return [1.0 / k] * k
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers, one per teacher") from None
    if len(weights) != k:
        raise ValueError(f"--weights has {len(weights)} values for {k} teachers")
    return weights


def base_skeleton(model):
    """The base transformer built on the meta device: every Linear's shape, no weights loaded."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    try:
        config = SD3Transformer2DModel.load_config(model, subfolder="transformer")
    except OSError as e:
        raise FileNotFoundError(f"{model}: no SD3 transformer config found ({str(e).splitlines()[0]})") from None
    with init_empty_weights():
        return SD3Transformer2DModel.from_config(config)


def check_same_layers(names, sources, teachers):
    """The merge rules combine layer by layer: every teacher must adapt the same layers."""
    first = set(teachers[0])
    for name, source, t in zip(names[1:], sources[1:], teachers[1:]):
        if set(t) != first:
            layer = sorted(first ^ set(t))[0]
            where = names[0] if layer in first else name
            raise ValueError(f"{source}: teachers {names[0]!r} and {name!r} adapt different layers: layer {layer} "
                             f"is only in {where!r}")


def check_equal_ranks(names, teachers):
    for m in sorted(teachers[0]):
        ranks = {n: t[m][1].shape[0] for n, t in zip(names, teachers)}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"--method average needs equal ranks: layer {m} has ranks {ranks}; use exact or svd")


def lora_folder_state(merged, scale):
    """{module: (B, A)} -> (state dict, LoraConfig dict) of a LoRA with alpha/r = scale on every layer;
    per-layer ranks go into rank_pattern (with a matching alpha_pattern), so ranks may differ."""
    from peft import LoraConfig
    ranks = {m: a.shape[0] for m, (_, a) in merged.items()}
    alpha = {k: int(scale * k) if float(scale * k).is_integer() else scale * k for k in set(ranks.values())}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    cfg = LoraConfig(r=r, lora_alpha=alpha[r], target_modules=sorted(ranks), rank_pattern=pattern,
                     alpha_pattern={m: alpha[k] for m, k in pattern.items()}).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    state = {}
    for m, (b, a) in merged.items():
        state[f"{m}.lora_A.weight"] = a.float().contiguous()
        state[f"{m}.lora_B.weight"] = (b / scale).float().contiguous()
    return state, cfg


def link_final(out):
    """--out itself loads as the LoRA too: its weights file is a hard link to final/'s (a copy where
    links are not possible)."""
    import shutil
    src, dst = Path(out) / "final" / "pytorch_lora_weights.safetensors", Path(out) / "pytorch_lora_weights.safetensors"
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(DEFAULTS, PRESETS, argv, description=__doc__.split("\n\n")[0])
    rank, world, device = common.setup_dist()
    master = rank == 0
    method = cfg["method"]
    with common.startup_errors():
        if method not in METHODS:
            raise ValueError(f"unknown --method {method!r}; valid methods: {', '.join(METHODS)}")
        specs = common.parse_teachers(cfg["teachers"])
        if not specs:
            raise ValueError("no teachers: pass --teachers TASK=LORA ...")
        names, sources = list(specs), list(specs.values())
        weights = parse_weights(cfg["weights"], len(specs))
        if method == "ties" and (min(weights) <= 0 or not 0 < cfg["density"] <= 1):
            raise ValueError("--method ties needs positive --weights and 0 < --density <= 1")
        loras = [read_lora(s) for s in sources]
        cfg["model"] = resolve_model(cfg["model"], cfg["preset"])
        skeleton = base_skeleton(cfg["model"])
        for (state, _), source in zip(loras, sources):
            check_lora_fits(skeleton, state, source)
        teachers = [lora_factors(state, kw) for state, kw in loras]
        if method != "sft":  # SFT only samples the teachers, each as its own adapter
            check_same_layers(names, sources, teachers)
        if method == "average":
            check_equal_ranks(names, teachers)
        if method == "sft":
            if cfg["samples_per_task"] < 1 or cfg["batch_size"] < 1:
                raise ValueError("--samples_per_task and --batch_size must be positive")
            rows = {n: load_prompts(n, "train") for n in names}
            resume_from = common.prepare_out(cfg["out"], cfg["resume"])
    rank_out = cfg["rank"] or max(a.shape[0] for t in teachers for _, a, _ in t.values())
    out = Path(cfg["out"])
    if master:
        out.mkdir(parents=True, exist_ok=True)
        common.write_json(out / "config.json", cfg)
        for n, s, t, (_, kw), w in zip(names, sources, teachers, loras, weights):
            print(f"teacher {n}: {s} | {len(t)} layers, rank(s) {sorted({a.shape[0] for _, a, _ in t.values()})}, "
                  f"alpha {kw['lora_alpha']}{' (rsLoRA)' if kw.get('use_rslora') else ''} | weight {w:g}")

    if method == "sft":
        sft(cfg, names, sources, rows, resume_from, rank, world, device)
    if not master:
        common.cleanup_dist()
        return
    reference = exact_merge(teachers, weights)
    if method == "sft":
        merged = {m: (s * b, a) for m, (b, a, s) in lora_factors(*read_lora(out / "final")).items()}
    elif method == "exact":
        merged = reference
    elif method == "svd":
        merged = svd_merge(teachers, weights, rank_out)
    elif method == "ties":
        merged = ties_merge(teachers, weights, cfg["density"], rank_out)
    else:
        merged = average_merge(teachers, weights)
    error, per_layer = relative_errors(merged, reference)
    ranks = dict(sorted(Counter(a.shape[0] for _, a in merged.values()).items()))
    report = {"method": method, "reference": "exact weighted delta sum_k w_k (alpha_k / r_k) B_k A_k",
              "teachers": {n: {"source": str(s), "weight": w} for n, s, w in zip(names, sources, weights)},
              "layers_per_rank": {str(k): v for k, v in ranks.items()}, "rel_error": error,
              "rel_error_per_layer": per_layer, **({"density": cfg["density"]} if method == "ties" else {})}
    common.write_json(out / "merge_report.json", report)
    if method == "sft":
        common.write_json(out / "final" / "merge_report.json", report)
    else:
        # the output's alpha/r: the teachers' own when they all share one (r=32, alpha=64 stacked twice
        # gives r=64, alpha=128), so a student trained on from it keeps the step size it was tuned for
        scales = {s for t in teachers for _, _, s in t.values()}
        state, lora_cfg = lora_folder_state(merged, scales.pop() if len(scales) == 1 else 1.0)
        save_lora(state, lora_cfg, out / "final", {"config.json": cfg, "merge_report.json": report})
        common.log_metrics(out, {"method": method, "rel_error": error, "layers": len(merged),
                                 "layers_per_rank": report["layers_per_rank"]})
    link_final(out)
    print(f"{method}: {len(merged)} layers (layers per rank {ranks}), relative error against the exact "
          f"weighted delta {error:.3e}")
    print(f"done: {out / 'final'}")
    common.cleanup_dist()


# -----------------------------------------------------------------------------
# SFT: the teachers' ODE samples, then the flow-matching loss on a fresh student

def noisy(x0, eps, s):
    """x_s = (1 - s) x0 + s eps, s per sample."""
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * eps


def flow_matching_loss(v, x0, eps):
    """The plain rectified-flow loss: the velocity's target is eps - x0."""
    return ((v - (eps - x0)) ** 2).mean()


def sample_key(cfg):
    """What the cached teacher samples depend on: a cache with another key is sampled again."""
    return {k: cfg[k] for k in ("model", "teachers", "samples_per_task", "sample_steps", "guidance", "resolution",
                                "t5_tokens", "seed")}


def teacher_samples(policy, cfg, names, rows, rank, world, cache):
    """ODE samples (latents) of every teacher on its own task's train prompts, this rank's share.
    Each sample has its own seed (seed + its global index), so the set does not depend on the batch
    size; it is cached in --out, keyed by everything that changes it."""
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
            x = initial_noise(policy, [cfg["seed"] + i for i in chunk])
            latents.append(rollout(policy, batch, cfg["sample_steps"], cfg["guidance"], 0.0, latents=x,
                                   adapter=n)["latents"].float().cpu())
            prompts += batch
            bar.update(len(chunk))
    bar.close()
    latents = torch.cat(latents)
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


def sft(cfg, names, sources, rows, resume_from, rank, world, device):
    master = rank == 0
    out = Path(cfg["out"])
    torch.manual_seed(cfg["seed"])  # the student's initial A: the same on every rank
    policy = load_policy(cfg["model"], device=device, resolution=cfg["resolution"], t5_tokens=cfg["t5_tokens"])
    with common.startup_errors():
        for n, s in zip(names, sources):
            load_adapter(policy, s, n)
    if resume_from is not None:
        params = add_student(policy, init=resume_from)
    else:
        params = add_student(policy, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"])
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = 0
    if resume_from is not None:
        state = common.load_training_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if master:
            print(f"resumed from {resume_from} at step {step}")
    if master:
        print(f"sft: {len(names)} teachers x {cfg['samples_per_task']} ODE samples ({cfg['sample_steps']} steps, "
              f"guidance {cfg['guidance']}) over {world} rank(s); then {cfg['max_steps']} steps x {cfg['batch_size']} "
              f"samples per rank = {cfg['batch_size'] * world} per step, student LoRA r={cfg['lora_rank']} "
              f"alpha={cfg['lora_alpha']}")
    prompts, latents = teacher_samples(policy, cfg, names, rows, rank, world,
                                       out / f"sft_samples.{rank}-of-{world}.pt")
    shape = latents.shape[1:]

    # The student is trained and used with CFG: its *guided* velocity v_u + w (v_c - v_u) is fit to
    # the teachers' samples, which were themselves drawn with CFG. The guided velocity is what
    # sampling and opd_distill.py use (distilled velocities are guided ones), so its flow-matching
    # minimiser reproduces the teachers' sample distribution under the same guidance. Training the
    # conditional velocity alone would fit guided samples and then be guided once more at sampling.
    def loss_on(idx, eps, s):
        x0 = latents[idx].to(device)
        eps = eps.to(device)
        v = velocity(policy, noisy(x0, eps, s.to(device)), s.to(device), encode(policy, [prompts[i] for i in idx]),
                     cfg["guidance"])
        return flow_matching_loss(v, x0, eps)

    # the probe: the loss on fixed samples (spread over the tasks), noise and sigmas, so that its
    # curve shows learning rather than the sampling noise of the training batches
    n_probe = min(cfg["probe_samples"], len(prompts))
    probe = fm_batch(len(prompts), n_probe, shape, torch.Generator().manual_seed(cfg["seed"] + 7), cfg["logit_mean"],
                     cfg["logit_std"], idx=torch.linspace(0, len(prompts) - 1, n_probe).long())

    @torch.no_grad()
    def probe_loss():
        b = cfg["batch_size"]
        total = sum(loss_on(*(t[i:i + b] for t in probe)).item() * len(probe[0][i:i + b]) for i in range(0, n_probe, b))
        return common.all_mean(total / n_probe).item()

    def log_probe(step):
        value = probe_loss()
        if master:
            common.log_metrics(out, {"step": step, "probe_loss": value})
            tqdm.write(f"step {step}: probe flow-matching loss {value:.4f}")

    if step == 0:
        log_probe(0)
    policy.transformer.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc="sft")
    while step < cfg["max_steps"]:
        t0 = time.time()
        gen = common.step_generator("cpu", cfg["seed"], step, rank)
        loss = loss_on(*fm_batch(len(prompts), cfg["batch_size"], shape, gen, cfg["logit_mean"], cfg["logit_std"]))
        loss.backward()
        common.sync_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"]).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": common.all_mean(loss.item()).item(), "grad_norm": grad_norm,
                  "sec": time.time() - t0}
        if master:
            common.log_metrics(out, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
        if (cfg["probe_every"] and step % cfg["probe_every"] == 0) or step == cfg["max_steps"]:
            log_probe(step)
        if master and (step % cfg["save_every"] == 0 or step == cfg["max_steps"]):
            common.save_checkpoint(policy, out, step, {"step": step, "optimizer": optimizer.state_dict()}, cfg)
        common.barrier()
    bar.close()
    common.finish_run(policy, params, out, cfg)

if __name__ == "__main__":
    main(sys.argv[1:])
