"""
Stage 0 of the tiny world: pretrain its base from scratch, then sample and score it.

    python -m tiny.pretrain --out assets/tiny/base --steps 4600 --seed 0     # the shipped base, ~18 min on 2 cores
    python -m tiny.pretrain --out runs/base --steps 4600 --snapshots 4000    # also keep step 4000

Flow matching (rectified flow, logit-normal timesteps, 10% prompt dropout for CFG, AdamW, EMA)
on renders of every task's train prompts (tinyworld.render). The text encoders are random too, so
they train with the transformer. Like web data, the pictures of the last stretch are not all
faithful: from step flaw_from on, a share flaw_rate of them carry their task's flaw, which no
prompt mentions, so the base draws them often and a teacher can learn not to. (Flawed pictures
from step 0 cost the base its glyphs and counts, and then GRPO had nothing to build on.)

Writes the pipeline folder (fp16), {out}_scores.json (every task's test score by the shared
eval, scoring.evaluate, with the share of samples that show their task's flaw, and the command
that regenerates the folder) and {out}_grid.png (64 test samples).
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import scoring
from sde_sampler import flow_matching_loss, noisy
from tiny.world import (CHARSET, EVAL_BATCH, SAMPLING, TASKS, VOCAB_WORDS, clean_reward, prompt_set,
                       sample_training_batch, shows_flaw)

# -----------------------------------------------------------------------------
# defaults

# build_tiny_pipeline's size arguments for the base
BASE_MODEL = dict(patch_size=4, num_layers=6, heads=4, head_dim=32, text_dim=32, text_layers=2, max_tokens=32)
PRETRAIN = dict(
    steps=4600,         # about 18 minutes of 2 CPU cores (docs/tinyworld.md)
    batch_size=32,
    lr=1e-3,            # AdamW, constant after the warmup, so a run of N steps is a prefix of a longer one
    warmup=50,
    weight_decay=0.01,
    grad_clip=1.0,
    dropout=0.1,        # share of prompts replaced by "", the negative prompt of our CFG
    flaw_rate=0.4,      # share of renders drawn with their task's flaw (render(..., flawed=True))...
    flaw_from=4000,     # ...from this step on; before it every render is faithful (see pretrain)
    ema=0.99,           # the saved weights are this EMA of the trained ones
    seed=0,
)


# -----------------------------------------------------------------------------
# the tiny pipeline: a random StableDiffusion3Pipeline of the tiny world's shape (the tests use it
# untrained, at their own sizes; pretrain() trains the base from it)

def _clip_vocab(words):
    """A byte-level BPE vocabulary in CLIP's format, with merges that make each given word one
    token: CLIPTokenizer needs vocab.json and merges.txt, and the hub is out of reach."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars]
    merges, seen = [], set(vocab)
    for w in dict.fromkeys(w.lower() for w in words if w.isalpha() and len(w) > 1):
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merged = toks[0] + toks[1]
            if merged not in seen:
                merges.append(f"{toks[0]} {toks[1]}")
                vocab.append(merged)
                seen.add(merged)
            toks = [merged] + toks[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def build_tiny_pipeline(out_dir=None, words=(), seed=0, size=32, patch_size=2, num_layers=4,
                        heads=4, head_dim=32, text_dim=32, text_layers=2, max_tokens=32):
    """A randomly initialised StableDiffusion3Pipeline small enough for a CPU: pixel space
    (no VAE, 3 channels), two tiny CLIP text encoders, no T5. Saved with save_pretrained when
    out_dir is given, so it loads like any pipeline folder (via load_policy)."""
    import tempfile
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    vocab, merges = _clip_vocab(words)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
        tokenizer = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                                  model_max_length=max_tokens)
    text_cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=text_dim, intermediate_size=2 * text_dim,
                              num_hidden_layers=text_layers, num_attention_heads=2,
                              max_position_embeddings=max_tokens, projection_dim=text_dim,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    transformer = SD3Transformer2DModel(
        sample_size=size, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * text_dim,
        pos_embed_max_size=size // patch_size)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=CLIPTextModelWithProjection(text_cfg), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_cfg), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    if out_dir is not None:
        pipe.save_pretrained(out_dir)
    return pipe


def new_base(seed, **model):
    """A randomly initialised tiny pipeline whose tokenizer knows every prompt word and character.
    The transformer gets DiT's adaLN-zero initialisation (every block starts as the identity,
    the output at zero), which trains several times faster than diffusers' default init."""
    pipe = build_tiny_pipeline(None, words=VOCAB_WORDS + list(CHARSET), seed=seed,
                               **{**BASE_MODEL, **model})
    tr = pipe.transformer
    zero = [m.linear for m in tr.modules() if type(m).__name__.startswith(("AdaLayerNorm", "SD35AdaLayerNorm"))]
    for layer in zero + [tr.proj_out]:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return pipe


def embed_prompts(pipe, prompts):
    """Prompt embeddings exactly as sde_sampler.encode computes them (the same encode_prompt call),
    but with gradients, so the text encoders train with the transformer."""
    e, _, p, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                    do_classifier_free_guidance=False, device=pipe.transformer.device,
                                    max_sequence_length=SAMPLING["t5_tokens"])
    return e, p


def pretrain_loss(pipe, prompts, images, generator, dropout):
    """The rectified-flow loss (sde_sampler.flow_matching_loss) on a batch of uint8 renders, at
    logit-normal s (SD3's training density), timestep s * 1000, each prompt dropped (for CFG) at
    rate `dropout`."""
    x0 = images.float() / 127.5 - 1
    b = x0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    drop = torch.rand(b, generator=generator) < dropout
    e, p = embed_prompts(pipe, ["" if d else t for t, d in zip(prompts, drop.tolist())])
    v = pipe.transformer(hidden_states=noisy(x0, eps, s), timestep=s * 1000,
                         encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]
    return flow_matching_loss(v, x0, eps)


def pretrain(out, steps, batch_size, lr, seed, model=None, warmup=PRETRAIN["warmup"],
             weight_decay=PRETRAIN["weight_decay"], grad_clip=PRETRAIN["grad_clip"],
             dropout=PRETRAIN["dropout"], ema=PRETRAIN["ema"], flaw_rate=PRETRAIN["flaw_rate"],
             flaw_from=PRETRAIN["flaw_from"], snapshots=(), progress=True):
    """Train a tiny base from scratch on renders of every task's train prompts and save its EMA
    weights (fp16) as a diffusers pipeline folder at `out` (None: don't save). The text encoders
    are random too, so they train jointly. Deterministic for the seed. Returns (pipe, losses);
    the pipe holds the saved weights. After each step N in `snapshots` the EMA weights also go
    to `{out}_step{N}`: the same folder as a run with steps=N (the lr is constant after warmup),
    which is how one run picks how early to stop. Renders are faithful before step flaw_from and
    flawed at flaw_rate from it on."""
    from tqdm import tqdm
    pipe = new_base(seed, **(model or {}))
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    averaged = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup)))
    rows = [r for t in TASKS for r in prompt_set(t, "train")]
    g = torch.Generator().manual_seed(seed)
    losses, avg = [], None
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for step in bar:
        rate = flaw_rate if step >= flaw_from else 0.0
        picked, images = sample_training_batch(rows, batch_size, seed=[seed, step], flaw_rate=rate)
        images = torch.from_numpy(images)
        loss = pretrain_loss(pipe, [r["prompt"] for r in picked], images, g, dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))  # short memory early, while weights move fast
        with torch.no_grad():
            for a, p in zip(averaged, params):
                a.lerp_(p, 1 - decay)
        losses.append(loss.item())
        avg = losses[-1] if avg is None else 0.95 * avg + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{avg:.4f}")
        if out is not None and step + 1 in snapshots and step + 1 < steps:
            trained = [p.detach().clone() for p in params]
            _save_weights(pipe, params, averaged, f"{out}_step{step + 1}")
            _load_weights(params, trained)
    for m in modules:
        m.eval()
    _load_weights(params, averaged)
    if out is not None:
        _save_weights(pipe, params, averaged, out)
    return pipe, losses


@torch.no_grad()
def _load_weights(params, values):
    for p, v in zip(params, values):
        p.copy_(v)


def _save_weights(pipe, params, values, path):
    """Save the pipeline holding `values` in fp16 (half the folder; load_policy reads it back in
    fp32, and so does the pipe left behind, which holds the rounded weights)."""
    _load_weights(params, values)
    pipe.to(torch.float16).save_pretrained(path)
    pipe.to(torch.float32)


def report(folder, record, pipe=None, eval_steps=SAMPLING["eval_steps"]):
    """Sample and score the base saved in `folder` on every test prompt (one image each, row i
    from seed i, by the same scoring.evaluate as every stage's periodic eval); write
    {folder}_grid.png and {folder}_scores.json (the scores added to `record`). `pipe`, the
    pipeline in memory that was saved there, if given, must embed prompts as the loaded folder
    does (fp16 storage aside)."""
    from sde_sampler import encode, load_policy
    policy = load_policy(str(folder), device="cpu", t5_tokens=SAMPLING["t5_tokens"])
    rows = [r for t in TASKS for r in prompt_set(t, "test")]
    if pipe is not None:
        probe = [r["prompt"] for t in TASKS for r in prompt_set(t, "test")[:4]] + [""]
        with torch.no_grad():
            want = embed_prompts(pipe, probe)
        got = encode(policy, probe)[:2]
        assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(got, want)), "encode != training embeddings"
    summary, images, details = scoring.evaluate(policy, rows, eval_steps, SAMPLING["guidance"], EVAL_BATCH)
    scores = {}
    for task, s in summary.items():
        flawed = [shows_flaw(task, im, d) for im, d in zip(images, details) if d["task"] == task]
        scores[task] = {"mean": round(s["mean"], 4), "strict": round(s["strict"], 4), "n": s["n"],
                        "flawed": round(float(np.mean(flawed)), 4)}
    clean, info = clean_reward(images, None, None)  # the anchor's view of every task's pictures
    scores["clean_all_tasks"] = {"mean": round(float(clean.mean()), 4),
                                 "strict": round(float(np.mean([x["strict"] for x in info])), 4), "n": len(images)}
    per_task = {"count": 24, "text": 24, "clean": 16}  # the grid: 3 rows of count, 3 of text, 2 of clean
    shown = [im for task, n in per_task.items() for im in [im for r, im in zip(rows, images) if r["task"] == task][:n]]
    scoring.image_grid(shown, cols=8, min_size=2 * shown[0].width).save(f"{folder}_grid.png")
    Path(f"{folder}_scores.json").write_text(json.dumps({**record, "scores": scores}, indent=2) + "\n")
    for task, s in scores.items():
        flawed = f"  flawed {s['flawed']:.2f}" if "flawed" in s else ""
        print(f"{task:16s} mean {s['mean']:.3f}  strict {s['strict']:.3f}  (n={s['n']}){flawed}")
    print(f"wrote {folder}_grid.png and {folder}_scores.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the tiny base, then sample and score it.")
    parser.add_argument("--out", default="assets/tiny/base")
    for k in ("steps", "batch_size", "lr", "seed", "flaw_rate", "flaw_from"):
        parser.add_argument(f"--{k}", type=type(PRETRAIN[k]), default=PRETRAIN[k])
    parser.add_argument("--eval_steps", type=int, default=SAMPLING["eval_steps"],
                        help="ODE steps of the report's samples (not of the weights)")
    parser.add_argument("--snapshots", default="", help="also save and score the EMA weights after these "
                        "steps (comma-separated), to {out}_stepN; each equals a run with --steps N")
    args = parser.parse_args(argv)
    # the budget the base is sized for is 2 CPU cores; OMP_NUM_THREADS=1 lets two runs share them
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    snapshots = sorted(int(n) for n in args.snapshots.split(",") if n)
    out = Path(args.out)
    rows = sum(len(prompt_set(t, "train")) for t in TASKS)
    print(f"pretraining {out}: {args.steps} steps x batch {args.batch_size} = "
          f"{args.steps * args.batch_size} renders of {rows} train prompts, lr {args.lr}, seed {args.seed}")
    t0 = time.time()
    pipe, losses = pretrain(out, args.steps, args.batch_size, args.lr, args.seed, flaw_rate=args.flaw_rate,
                            flaw_from=args.flaw_from, snapshots=snapshots)
    train_s = time.time() - t0
    n_params = sum(p.numel() for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                   for p in m.parameters())

    def command(steps):
        changed = [f" --{k} {getattr(args, k)}" for k in ("batch_size", "lr", "flaw_rate", "flaw_from")
                   if getattr(args, k) != PRETRAIN[k]]
        return f"python -m tiny.pretrain --out {args.out} --steps {steps} --seed {args.seed}" + "".join(changed)

    record = {"pretrain": {**PRETRAIN, **vars(args)}, "model": BASE_MODEL, "params": n_params,
              "sampling": {**SAMPLING, "eval_steps": args.eval_steps}}
    for n in snapshots:
        if n < args.steps:
            print(f"snapshot after {n} steps:")
            report(f"{out}_step{n}", {**record, "command": command(n),
                                      "final_loss": round(float(np.mean(losses[n - 50:n])), 4)}, eval_steps=args.eval_steps)
    report(out, {**record, "command": command(args.steps), "pretrain_seconds": round(train_s),
                 "final_loss": round(float(np.mean(losses[-50:])), 4)}, pipe, args.eval_steps)
    print(f"pretraining {train_s:.0f} s, total wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
