"""
What an OPD iteration costs against a GRPO iteration, and what a teacher costs in memory.

    python bench_opd.py                  # the tiny world's base (a tiny random pipeline if not built)

1. Time: opd_distill.py and teacher_grpo.py for a few steps on the same prompts, group size,
   steps, guidance and micro-batch; the ratio of their median per-step wall time (the first step
   is dropped as warm-up). OPD rolls out with the student plus the routed teacher plus the anchor
   (3 forwards a step) and needs no decode or reward; GRPO rolls out with the student plus the
   base for its KL, then decodes and scores.
2. Memory: one base with the student, then 1, 2, 3 LoRA teachers added as adapters. Reported as
   the bytes of all distinct tensor storages held by the pipeline's models, and as the process's
   peak RSS. A teacher as an adapter should add about its own bytes; a full-weight teacher would
   add a whole transformer.
"""
import json
import resource
import statistics
import tempfile
from pathlib import Path

import torch

import opd_distill
import teacher_grpo
from sde_sampler import TINY_MODEL, add_student, build_tiny_pipeline, load_adapter, load_policy, save_adapter
from tinyworld import SAMPLING, VOCAB_WORDS

STEPS = 4  # per run; the first is warm-up
tmp = Path(tempfile.mkdtemp())
model = str(TINY_MODEL)
if not (TINY_MODEL / "model_index.json").exists():
    model = str(tmp / "pipe")
    build_tiny_pipeline(model, words=VOCAB_WORDS)


def storage_bytes(policy):
    """Bytes of the distinct storages behind every parameter and buffer of the pipeline's models."""
    seen = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(policy.pipe, name, None)
        for t in [] if module is None else [*module.parameters(), *module.buffers()]:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# teachers: random LoRAs of the shape a tiny teacher has (the values do not change the cost)
policy = load_policy(model, device="cpu", t5_tokens=SAMPLING["t5_tokens"])
add_student(policy, rank=8, alpha=16)
teachers = {}
for k, task in enumerate(["count", "text", "clean"]):
    torch.manual_seed(k)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if ".student." in n:
                p.normal_(std=0.02)
    teachers[task] = save_adapter(policy, "student", tmp / task)
del policy

# 1. time per iteration
common = dict(model=model, resolution=32, t5_tokens=SAMPLING["t5_tokens"], num_steps=10, eval_steps=10, guidance=4.5,
              group_size=4, prompts_per_step=4, batch_size=16, max_steps=STEPS, eval_every=0, save_every=1000, lora_rank=8, lora_alpha=16, seed=0)
args = lambda cfg: [x for k, v in cfg.items() for x in (f"--{k}", str(v))]  # noqa: E731


def step_seconds(out):
    secs = [json.loads(line)["sec"] for line in open(out / "metrics.jsonl")]
    return statistics.median(secs[1:])


teacher_grpo.main(args({**common, "out": tmp / "grpo", "tasks": "count,text", "updates_per_step": 1, "beta": 0.04}))
opd_distill.main(args({**common, "out": tmp / "opd", "anchor": teachers["clean"], "beta_mar": 0.04})
                 + ["--teachers", f"count={teachers['count']}", f"text={teachers['text']}"])
t_grpo, t_opd = step_seconds(tmp / "grpo"), step_seconds(tmp / "opd")

# 2. memory as teachers are added
policy = load_policy(model, device="cpu", t5_tokens=SAMPLING["t5_tokens"])
params = add_student(policy, rank=8, alpha=16)
student_bytes = sum(p.numel() * p.element_size() for p in params)
transformer_bytes = sum(p.numel() * p.element_size() for p in policy.transformer.parameters()) - student_bytes
rows = [("base + student", storage_bytes(policy), peak_rss_mb())]
for k, task in enumerate(teachers):
    load_adapter(policy, teachers[task], task)
    rows.append((f"+ {k + 1} teacher{'s' if k else ''}", storage_bytes(policy), peak_rss_mb()))

print(f"\nmodel {model}; {STEPS} steps each, median of steps 2..{STEPS}")
print(f"GRPO iteration {t_grpo:.2f}s  OPD iteration {t_opd:.2f}s  ratio OPD/GRPO {t_opd / t_grpo:.2f}")
print(f"\nadapter (one LoRA, r=8) {student_bytes / 1e3:.1f} kB; transformer without adapters "
      f"{transformer_bytes / 1e6:.2f} MB (what a full-weight teacher copy would add)")
print(f"{'models':<16}{'storage bytes':>16}{'added':>12}{'peak RSS MB':>14}")
for i, (name, b, rss) in enumerate(rows):
    added = f"{(b - rows[i - 1][1]) / 1e3:.1f} kB" if i else ""
    print(f"{name:<16}{b:>16,}{added:>12}{rss:>14.0f}")
