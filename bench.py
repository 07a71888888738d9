"""
Rollout speed against diffusers' own sampler, on the same pipeline, batch, steps and guidance.

    python bench.py                      # a tiny random pipeline, CPU
    python bench.py --model stabilityai/stable-diffusion-3.5-medium --batch 8 --steps 40

Both sides get the same precomputed prompt embeddings and return latents (no decoding), so the
ratio is the overhead of our loop (adapter switching, bookkeeping of states and log-probs)
over StableDiffusion3Pipeline.__call__. Repeats are interleaved and the median ratio reported,
because wall-clock on shared machines drifts.
"""
import argparse
import statistics
import tempfile
import time

import torch

from sde_sampler import build_tiny_pipeline, encode, load_policy, rollout

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="pipeline id or folder (default: a tiny random one)")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--guidance", type=float, default=4.5)
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()

torch.manual_seed(0)
tmp = None
if args.model is None:
    tmp = tempfile.TemporaryDirectory()
    build_tiny_pipeline(tmp.name, words=["a", "red", "circle"])
policy = load_policy(args.model or tmp.name)
prompts = ["a red circle"] * args.batch
e, p, ne, npool = encode(policy, prompts)
scale = policy.pipe.vae_scale_factor
x0 = torch.randn((args.batch, *policy.latent_shape), generator=torch.Generator().manual_seed(0)).to(policy.device)


def sync():
    if policy.device.type == "cuda":
        torch.cuda.synchronize()


def ours():
    return rollout(policy, prompts, args.steps, args.guidance, 0.0, latents=x0)["latents"]


def theirs():
    return policy.pipe(prompt_embeds=e, pooled_prompt_embeds=p, negative_prompt_embeds=ne,
                       negative_pooled_prompt_embeds=npool, latents=x0.clone(), num_inference_steps=args.steps,
                       guidance_scale=args.guidance, height=policy.latent_shape[1] * scale,
                       width=policy.latent_shape[2] * scale, output_type="latent").images


def timed(fn):
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        out = fn()
    sync()
    return time.perf_counter() - t, out


timed(ours), timed(theirs)  # warm-up
ratios = []
for _ in range(args.repeats):
    t_ours, a = timed(ours)
    t_theirs, b = timed(theirs)
    ratios.append(t_ours / t_theirs)
diff = (a.float() - b.float()).abs().max().item()
print(f"batch {args.batch}, {args.steps} ODE steps, guidance {args.guidance}, device {policy.device}")
print(f"ours {t_ours:.3f}s  diffusers {t_theirs:.3f}s  (last repeat)  max |diff| {diff:.2e}")
print(f"rollout / diffusers time ratio: median {statistics.median(ratios):.3f} "
      f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats)")
