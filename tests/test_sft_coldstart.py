"""SFT cold start: the routed teachers' samples, learning them against the start, resume, the cache key."""
import json

import torch

import common
import sft_coldstart
from prompts import load_prompts
from sde_sampler import initial_noise, rollout


def _sft(pipe_dir, out, teachers, **over):
    cfg = dict(resolution=32, samples_per_task=2, sample_steps=2, guidance=1.0, batch_size=4,
               lr=1e-2, lora_rank=4, lora_alpha=4, max_steps=6, probe_every=0, probe_samples=4, save_every=3)
    cfg.update(over)
    args = ["--model", str(pipe_dir), "--out", str(out), "--teachers", *teachers]
    for k, v in cfg.items():
        args += [f"--{k}", str(v)]
    sft_coldstart.main(args)
    return [r["probe_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "probe_loss" in r]


def test_sft_samples_the_routed_teachers_and_learns_them(policy, tiny_pipe_dir, tmp_path, teachers):
    out, args = tmp_path / "sft", [f"count={teachers[0]}", f"text={teachers[1]}"]
    _sft(tiny_pipe_dir, out, args)
    cache = out / "sft_samples.0-of-1.pt"
    samples = torch.load(cache, weights_only=True)
    # each task's train prompts sampled (ODE) by that task's teacher, one noise stream per sample
    for i, task in enumerate(["count", "count", "text", "text"]):
        assert samples["prompts"][i] in [r["prompt"] for r in load_prompts(task, "train")]
        x = initial_noise(policy, [common.stream_seed("sample", 0, i)])
        want = rollout(policy, [samples["prompts"][i]], 2, 1.0, 0.0, latents=x, adapter=task)["latents"]
        assert (samples["latents"][i] - want[0]).abs().max() < 1e-4
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists() and (out / "checkpoint-000006").exists()
    # resume: continues from the newest checkpoint, reuses the cached samples, and the fixed-noise
    # flow-matching loss on the teachers' samples has gone down from the start
    mtime = cache.stat().st_mtime_ns
    probes = _sft(tiny_pipe_dir, out, args + ["--resume"], max_steps=12)
    assert cache.stat().st_mtime_ns == mtime
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 13))
    assert probes[-1] < probes[0] - 0.01, probes


def test_sft_samples_a_full_weight_teacher_through_its_own_copy(tiny_pipe_dir, tmp_path, teachers):
    """--teachers count=FULL.safetensors: its samples are those of the fine-tuned model itself."""
    from sde_sampler import load_policy
    from test_lora import _full_teacher
    truth = load_policy(str(tiny_pipe_dir), device="cpu")
    state = _full_teacher(truth, tmp_path / "count.safetensors")
    truth.transformer.load_state_dict(state)
    out = tmp_path / "sft"
    _sft(tiny_pipe_dir, out, [f"count={tmp_path / 'count.safetensors'}", f"text={teachers[1]}"], max_steps=1)
    samples = torch.load(out / "sft_samples.0-of-1.pt", weights_only=True)
    for i in range(2):  # the count samples
        want = rollout(truth, [samples["prompts"][i]], 2, 1.0, 0.0, latents=initial_noise(truth, [common.stream_seed("sample", 0, i)]))["latents"]
        assert (samples["latents"][i] - want[0]).abs().max() < 1e-4


def test_sft_sample_cache_key_holds_everything_that_changes_a_sample():
    from sft_coldstart import DEFAULTS, sample_key
    key = sample_key(DEFAULTS)
    for k, other in [("t5_tokens", 77), ("guidance", 1.0), ("resolution", 256), ("seed", 1), ("model", "x")]:
        assert sample_key({**DEFAULTS, k: other}) != key, k
    assert sample_key({**DEFAULTS, "lr": 0.5}) == key  # training settings do not change the samples
