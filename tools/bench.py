"""
What the pieces cost, in ratios measured within one run (wall-clock on shared machines drifts).

    python -m tools.bench                      # all three parts on the tiny world's base, CPU
    python -m tools.bench --only rollout --model stabilityai/stable-diffusion-3.5-medium --batch 8 --steps 40

1. rollout: our sampling loop against StableDiffusion3Pipeline.__call__ on the same pipeline,
   batch, steps and guidance, both from the same precomputed prompt embeddings, returning latents
   (no decoding). Repeats are interleaved and the median ratio is reported.
2. opd: opd_distill.py against teacher_grpo.py for a few steps on the same prompts, group size,
   steps (the same trained steps), guidance and micro-batch; the ratio of their median per-step
   wall time (the first step is warm-up), the share of each step's wall time spent inside the
   transformer's forwards and backwards (the rest is overhead), and the peak memory of each
   (CUDA: the allocator's peak; CPU, rougher: the process's peak RSS above its RSS at the run's
   start, the peak record restarted for each run on Linux). OPD makes one pass over the trained
   steps: the routed teachers and the anchor in one forward, the student with gradient, its
   backward; it needs no decode or reward and samples nothing after the last trained step.
   GRPO rolls out all steps, decodes and scores, then re-runs the student (and the base, for its
   KL) with gradient on the trained steps. Last, OPD with a CFG-free student (--student_guidance 1):
   its forwards and backward have no unconditional half (6 forward-equivalents per image-step
   against 9), reported against the guided OPD at the same --mar_every.
3. memory: one base with the student, then 1, 2, 3 LoRA teachers added as adapters, then (the
   control) one full-weight teacher, loaded as opd_distill loads one: its own copy of the transformer.
   Reported as the bytes of all distinct tensor storages held by the models, and as the process's
   peak RSS. This part runs first, so that no training run has set the peak already.
4. estimate (only when asked for: --only estimate, minutes): every stage's peak GPU memory
   (weights, trainable state, activations) and FLOPs per step at SD3.5-Medium's and -Large's real
   sizes, 512 px, batch 1-8, with and without gradient checkpointing, worked out on fake tensors
   (estimate.py), then checked against real CPU runs of the tiny base and the SD3.5-shaped
   miniature (the errors are printed).
"""
import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora import add_student, base_weights, load_adapter, load_teacher, save_adapter
from tiny.pretrain import build_tiny_pipeline
from sde_sampler import TINY_MODEL, encode, load_policy, rollout
from tiny.world import SAMPLING, VOCAB_WORDS

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--only", choices=["rollout", "opd", "memory", "estimate"], action="append",
                    help="run only these parts (repeatable); default memory, rollout and opd")
parser.add_argument("--model", default=None, help="pipeline id or folder (default: the tiny base, else a tiny random "
                    "one); sd35-mini / sd35-full: a random pipeline of SD3.5-M's structure, tiny or at its real size")
parser.add_argument("--batch", type=int, default=8, help="rollout: images per batch")
parser.add_argument("--steps", type=int, default=10, help="rollout: ODE steps")
parser.add_argument("--guidance", type=float, default=4.5)
parser.add_argument("--repeats", type=int, default=5, help="rollout: interleaved repeats")
parser.add_argument("--train_steps", type=int, default=4, help="opd: steps of each run; the first is warm-up")
parser.add_argument("--resolution", type=int, default=32, help="opd: image side in pixels (SD3.5-M: 512)")
parser.add_argument("--t5_tokens", type=int, default=SAMPLING["t5_tokens"], help="opd: T5 tokens (SD3.5-M: 256)")
parser.add_argument("--micro_batch", type=int, default=16, help="opd: images per forward (of the 16 per step)")
args = parser.parse_args()
parts = args.only or ["memory", "rollout", "opd"]

torch.manual_seed(0)
tmp = Path(tempfile.mkdtemp())
model = args.model or str(TINY_MODEL)
if args.model is None and not (TINY_MODEL / "model_index.json").exists():
    model = str(tmp / "pipe")
    build_tiny_pipeline(model, words=VOCAB_WORDS)
if args.model in ("sd35-mini", "sd35-full"):
    from tools.sd35_miniature import build_sd35_miniature
    model = str(tmp / args.model)
    build_sd35_miniature(model, full=args.model == "sd35-full")
tiny = args.model is None
load = dict(device="cpu", t5_tokens=SAMPLING["t5_tokens"]) if tiny else dict(t5_tokens=args.t5_tokens)
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")


def storage_bytes(modules):
    """Bytes of the distinct storages behind every parameter and buffer of these modules."""
    seen = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def pipeline_modules(policy):
    names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(policy.pipe, n, None) for n in names) if m is not None]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CLEAR_REFS = Path("/proc/self/clear_refs")


def restart_peak_rss():
    """Start the peak-RSS record again at the current RSS (Linux), so that a training run's peak is
    its own and not an earlier run's; returns the level its peak counts from, in MB. Elsewhere the
    record cannot be reset: a run's figure is then only its growth beyond every earlier peak."""
    if not CLEAR_REFS.exists():
        return peak_rss_mb()
    CLEAR_REFS.write_text("5")
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024


def random_teachers(tasks=("count", "text", "clean")):
    """LoRA folders of the shape a tiny teacher has (r=8); the values do not change the cost."""
    policy = load_policy(model, **load)
    add_student(policy, rank=8, alpha=16)
    out = {}
    for k, task in enumerate(tasks):
        torch.manual_seed(k)
        with torch.no_grad():
            for n, p in policy.transformer.named_parameters():
                if ".student." in n:
                    p.normal_(std=0.02)
        out[task] = save_adapter(policy, "student", tmp / task)
    return out


teachers = random_teachers() if {"memory", "opd"} & set(parts) else {}

if "memory" in parts:
    policy = load_policy(model, **load)
    params = add_student(policy, rank=8, alpha=16)
    student_bytes = sum(p.numel() * p.element_size() for p in params)
    modules = pipeline_modules(policy)
    gpu_mb = lambda: torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")  # noqa: E731
    rows = [("base + student", storage_bytes(modules), peak_rss_mb(), gpu_mb())]
    for k, task in enumerate(teachers):
        load_adapter(policy, teachers[task], task)
        rows.append((f"+ {k + 1} LoRA teacher{'s' if k else ''}", storage_bytes(modules), peak_rss_mb(), gpu_mb()))
    # the control: a fully fine-tuned teacher, loaded as opd_distill loads one (its own frozen copy)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in base_weights(policy.transformer).items()},
              str(tmp / "full.safetensors"))
    load_teacher(policy, tmp / "full.safetensors", "full")
    rows.append(("+ 1 full teacher", storage_bytes(modules + list(policy.full.values())), peak_rss_mb(), gpu_mb()))
    print(f"\n[memory] model {model}; one LoRA adapter (r=8) is {student_bytes / 1e3:.1f} kB")
    print(f"{'models':<20}{'storage bytes':>16}{'added':>14}{'peak RSS MB':>14}{'added':>10}{'GPU MB':>10}")
    for i, (name, b, rss, gpu) in enumerate(rows):
        added = (f"{(b - rows[i - 1][1]) / 1e3:.1f} kB", f"{rss - rows[i - 1][2]:.1f}") if i else ("", "")
        print(f"{name:<20}{b:>16,}{added[0]:>14}{rss:>14.1f}{added[1]:>10}{gpu:>10.0f}")
    del policy

if "rollout" in parts:
    policy = load_policy(model, **load)
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
    print(f"\n[rollout] model {model}; batch {args.batch}, {args.steps} ODE steps, guidance {args.guidance}, "
          f"device {policy.device}")
    print(f"ours {t_ours:.3f}s  diffusers {t_theirs:.3f}s  (last repeat)  max |diff| {diff:.2e}")
    print(f"rollout / diffusers time ratio: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats)")
    del policy

if "opd" in parts:
    from diffusers import SD3Transformer2DModel

    import opd_distill
    import teacher_grpo
    common = dict(model=model, resolution=args.resolution, t5_tokens=args.t5_tokens, num_steps=10, eval_steps=10,
                  guidance=args.guidance, group_size=4, prompts_per_step=4, batch_size=args.micro_batch,
                  max_steps=args.train_steps,
                  timestep_fraction=0.99, eval_every=0, eval_tasks="count,text", save_every=1000, lora_rank=8,
                  lora_alpha=16, seed=0)
    flags = lambda cfg: [x for k, v in cfg.items() for x in (f"--{k}", str(v))]  # noqa: E731
    inside = [0.0]  # seconds inside transformer forwards and backwards (a forward inside a backward counts once)

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t
        return wrapper

    def run(main, argv, out):
        """One training run with the model's time counted; (median step s, share inside the model, peak MB)."""
        forward, backward = SD3Transformer2DModel.forward, torch.Tensor.backward
        SD3Transformer2DModel.forward, torch.Tensor.backward = timed(forward), timed(backward)
        rss0 = restart_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            main(argv)
        finally:
            SD3Transformer2DModel.forward, torch.Tensor.backward = forward, backward
        secs = [json.loads(line)["sec"] for line in open(out / "metrics.jsonl")]
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else peak_rss_mb() - rss0
        return statistics.median(secs[1:] or secs), inside[0] / sum(secs), peak

    grpo = run(teacher_grpo.main, flags({**common, "out": tmp / "grpo", "tasks": "count,text", "updates_per_step": 1,
                                         "beta": 0.04}), tmp / "grpo")
    opd = {}
    for every in (1, opd_distill.DEFAULTS["mar_every"]):  # the anchor KL on every image, then the default
        inside[0] = 0.0
        opd[every] = run(opd_distill.main, flags({**common, "out": tmp / f"opd{every}", "anchor": teachers["clean"],
                                                  "beta_mar": 0.04, "mar_every": every})
                         + ["--teachers", f"count={teachers['count']}", f"text={teachers['text']}"], tmp / f"opd{every}")
    every = opd_distill.DEFAULTS["mar_every"]  # the CFG-free student (--student_guidance 1) at the default
    inside[0] = 0.0
    opd["free"] = run(opd_distill.main, flags({**common, "out": tmp / "opd_free", "anchor": teachers["clean"],
                                               "beta_mar": 0.04, "mar_every": every, "student_guidance": 1.0})
                      + ["--teachers", f"count={teachers['count']}", f"text={teachers['text']}"], tmp / "opd_free")
    memory = "peak GPU memory" if torch.cuda.is_available() else "peak RSS growth"
    print(f"\n[opd] model {model}; {args.train_steps} steps each, median of steps 2..{args.train_steps}; "
          f"9 of 10 steps trained in both")
    rows = [("GRPO", grpo)] + [(f"OPD, anchor KL on 1 image in {k}", r) for k, r in opd.items() if k != "free"]
    rows.append((f"OPD, CFG-free student (--student_guidance 1), anchor on 1 image in {every}", opd["free"]))
    for name, (sec, share, peak) in rows:
        ratio = f"  ratio OPD/GRPO {sec / grpo[0]:.2f}" if name != "GRPO" else ""
        if "CFG-free" in name:
            ratio += f", CFG-free/guided OPD {sec / opd[every][0]:.2f}"
        print(f"{name}: iteration {sec:.2f}s  inside the transformer (forward + backward) {100 * share:.0f}%  "
              f"{memory} {peak:.0f} MB{ratio}")

if "estimate" in parts:
    import estimate
    import opd_distill
    import sft_coldstart
    import teacher_grpo
    from tools.sd35_miniature import build_sd35_miniature
    # the stages' code that estimate.py runs (it imports no stage: the stages import it)
    stages = {"opd": (opd_distill.DEFAULTS, opd_distill.distill_micro_batch),
              "grpo": (teacher_grpo.DEFAULTS, teacher_grpo.step_loss),
              "sft": (sft_coldstart.DEFAULTS, sft_coldstart.flow_matching_loss)}
    start = time.time()
    estimate.report(stages)
    print("\n[estimate] the check: the same steps on real CPU tensors of small pipelines (bf16, CUDA's autocast casts)")
    build_sd35_miniature(tmp / "sd35-mini-check")
    checked = {"tiny base": (model if tiny else str(TINY_MODEL), SAMPLING["t5_tokens"]),
               "SD3.5-M miniature": (str(tmp / "sd35-mini-check"), 8)}
    errors = estimate.validation_report(checked, stages)
    print(f"per-image activation error against the real heap: {min(errors):+.1%} to {max(errors):+.1%}")
    print(f"[estimate] took {time.time() - start:.0f} s")
