"""Every stage through its command line, WITHOUT --preset, on a random miniature of SD3.5-Medium's
structure (sd35_miniature.py: 16-channel VAE with SD3.5's scaling and shift, CLIP-L/G and T5
encoders, dual attention, RMS qk-norm): the code path a GPU user runs, cut short by flags. The
two end-to-end tests are marked slow (.ci/run runs them after the README's test command)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import merge_coldstart
import opd_distill
import rewards
import sft_coldstart
import teacher_grpo
from tools.sd35_miniature import SD35, build_sd35_miniature
from lora import LORA_TARGETS
from sde_sampler import decode, encode, load_policy

REPO = Path(__file__).resolve().parents[1]
SHORT = dict(resolution=64, t5_tokens=8, num_steps=3, eval_steps=2, group_size=2, prompts_per_step=2,
             batch_size=4, max_steps=2, eval_prompts=2, save_every=1, lora_rank=4, lora_alpha=8)
GRPO = dict(SHORT, updates_per_step=1)


def flags(**kw):
    return [x for k, v in kw.items() for x in ([f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)])]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd35_miniature")
    build_sd35_miniature(d)
    return d


@pytest.fixture
def geneval_models(tmp_path, monkeypatch):
    """GenEval's detector and CLIP as tiny random models (the real ones need the hub)."""
    from test_rewards import tiny_clip, tiny_mask2former
    detector, detector_processor = tiny_mask2former("dog")
    clip, clip_processor = tiny_clip(tmp_path)
    monkeypatch.setitem(rewards.MODELS, "geneval", {"detector": detector, "detector_processor": detector_processor,
                                                    "clip": clip, "clip_processor": clip_processor})


def test_the_miniature_has_sd35_structure_and_decodes_through_its_vae(mini):
    policy = load_policy(str(mini), device="cpu", t5_tokens=8)
    cfg = policy.transformer.config
    assert cfg.qk_norm == "rms_norm" and list(cfg.dual_attention_layers) == [0, 1] and cfg.in_channels == 16
    vae = policy.pipe.vae.config
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (SD35["scaling_factor"],
                                                                           SD35["shift_factor"], 16)
    assert policy.latent_shape == (16, 8, 8) and policy.resolution == 64
    e, p, ne, npool = encode(policy, ["a red dog", "a blue cat"])
    assert e.shape == (2, 77 + 8, 48) and p.shape == (2, 48)  # CLIP tokens + T5 tokens, T5's width
    names = [n for n, _ in policy.transformer.named_modules()]
    assert any(".attn2." in n for n in names)  # the dual-attention blocks' second (image-only) attention
    z = torch.randn(1, *policy.latent_shape)
    want = policy.pipe.vae.decode(z / SD35["scaling_factor"] + SD35["shift_factor"], return_dict=False)[0]
    want = ((want / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert (decode(policy, z)[0].size == (64, 64)) and (torch.from_numpy(want).numpy() == decode(policy, z)[0]).all()


@pytest.mark.slow  # end-to-end runs of every script, like the reproduce smoke tests
def test_every_stage_on_the_miniature(mini, tmp_path, geneval_models, capsys, caplog):
    m = str(mini)
    # stage 1: a teacher with the OCR reward (RapidOCR, offline), then GRPO-Mix on ocr + geneval. A
    # random model's images hold no text, so OCR scores all 0 and a group has no spread: a shared
    # brightness term gives the few steps here a gradient, and the LoRAs something to carry
    shared = dict(shared_reward="brightness:0.5")
    teacher_grpo.main(flags(model=m, reward="ocr", out=tmp_path / "ocr", eval_every=2, eval_tasks="ocr", **shared,
                            **GRPO))
    teacher_grpo.main(flags(model=m, tasks="ocr,geneval", out=tmp_path / "mix", eval_every=0, **shared, **GRPO))
    teacher_grpo.main(flags(model=m, reward="geneval", out=tmp_path / "geneval", eval_every=0, **shared, **GRPO))
    lora = load_file(str(tmp_path / "ocr" / "final" / "pytorch_lora_weights.safetensors"))
    # Flow-GRPO's targets: the joint attention's 8 projections in every block (the last block's text
    # stream is pre-only, no to_add_out), not attn2 beside them (the published SD3.5-M LoRAs lack it too)
    layers = {k.split(".lora_")[0] for k in lora}
    assert len(layers) == 3 * len(LORA_TARGETS) - 1 and not any(".attn2." in k for k in layers)
    evals = [r for r in map(json.loads, open(tmp_path / "ocr" / "metrics.jsonl")) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["eval"]["ocr"]["n"] == 2
    T = [f"ocr={tmp_path / 'ocr' / 'final'}", f"geneval={tmp_path / 'geneval' / 'final'}"]
    # cold starts: exact and svd merges, SFT on the teachers' samples
    for method in ("exact", "svd"):
        merge_coldstart.main(flags(model=m, teachers=T, method=method, out=tmp_path / f"merge_{method}"))
        assert (tmp_path / f"merge_{method}" / "final" / "adapter_model.safetensors").exists()
    sft_coldstart.main(flags(model=m, teachers=T, out=tmp_path / "sft", resolution=64, t5_tokens=8, sample_steps=2,
                             samples_per_task=4, batch_size=4, max_steps=2, probe_samples=2, probe_every=1,
                             save_every=1, lora_rank=4, lora_alpha=8))
    # stage 2 from the merge, the routed teachers' labels and MAR on the base
    opd = flags(model=m, teachers=T, init=tmp_path / "merge_exact" / "final", eval_every=0, beta_mar=0.1, **SHORT)
    opd_distill.main(opd + ["--out", str(tmp_path / "opd")])
    rec = [json.loads(line) for line in open(tmp_path / "opd" / "metrics.jsonl")]
    assert [r["step"] for r in rec] == [1, 2] and set(rec[0]["kl_by_task"]) <= {"ocr", "geneval"}
    assert all(r["kl"] > 0 and r["mar_kl"] > 0 and r["grad_norm"] > 0 for r in rec)
    # interrupted after step 1 and resumed: the weights of the straight run, bit for bit
    opd_distill.main(opd + ["--out", str(tmp_path / "opd_cut"), "--max_steps", "1"])
    opd_distill.main(opd + ["--out", str(tmp_path / "opd_cut"), "--resume"])
    a = load_file(str(tmp_path / "opd" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "opd_cut" / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # eval: every checkpoint on ocr and geneval, VAE-decoded images in the grid
    evaluation.main(flags(model=m, tasks="ocr,geneval", num_prompts=2, resolution=64, t5_tokens=8, eval_steps=2,
                          batch_size=4, out=tmp_path / "eval",
                          ckpt=["base", *T, f"opd={tmp_path / 'opd' / 'final'}", f"sft={tmp_path / 'sft' / 'final'}"]))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results) == ["base", "ocr", "geneval", "opd", "sft"]
    assert all(set(r) == {"ocr", "geneval"} and r["ocr"]["n"] == 2 for r in results.values())
    # every stage's saved LoRA changes the miniature's output, loaded by plain diffusers and by peft
    outputs = {name: _outputs_with(mini, folder) for name, folder in [
        ("ocr", tmp_path / "ocr" / "final"), ("mix", tmp_path / "mix" / "final"),
        ("merge_exact", tmp_path / "merge_exact" / "final"), ("merge_svd", tmp_path / "merge_svd" / "final"),
        ("sft", tmp_path / "sft" / "final"), ("opd", tmp_path / "opd" / "final")]}
    base = _outputs_with(mini, None)[0]
    for name, (by_diffusers, by_peft) in outputs.items():
        assert not torch.equal(by_diffusers, base), name
        torch.testing.assert_close(by_peft, by_diffusers, rtol=1e-4, atol=1e-6, msg=name)
    # prompts longer than --t5_tokens: one note per encoding, not diffusers' warning per batch of 32
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
    assert "longer than --t5_tokens 8 T5 tokens and are cut there" in capsys.readouterr().out


def _outputs_with(pipe_dir, folder):
    """The miniature transformer's output on fixed inputs with the LoRA in `folder` loaded by
    diffusers' load_lora_weights and by peft's PeftModel.from_pretrained (None: the base)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([500.0, 800.0]),
                  encoder_hidden_states=torch.randn(2, 85, 48, generator=g),
                  pooled_projections=torch.randn(2, 48, generator=g), return_dict=False)
    outs = []
    for way in ("diffusers", "peft"):
        pipe = StableDiffusion3Pipeline.from_pretrained(str(pipe_dir))
        if folder is not None and way == "diffusers":
            pipe.load_lora_weights(str(folder))
        net = pipe.transformer if folder is None or way == "diffusers" else \
            PeftModel.from_pretrained(pipe.transformer, str(folder))
        with torch.no_grad():
            outs.append(net(**inputs)[0])
    return outs


@pytest.mark.slow  # end-to-end runs of every script, like the reproduce smoke tests
def test_torchrun_opd_on_the_miniature(mini, tmp_path):
    from conftest import random_teacher
    policy = load_policy(str(mini), device="cpu", t5_tokens=8)
    T = [f"{task}={random_teacher(policy, tmp_path / task, task, seed=k, r=4, alpha=8)}"
         for k, task in enumerate(["ocr", "geneval"])]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           str(REPO / "opd_distill.py"), *flags(model=mini, teachers=T, out=out, eval_every=0,
                                               **{**SHORT, "batch_size": 2})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ranks in sync: 2 ranks hold identical LoRA weights" in res.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


def test_bf16_weights_fp32_student(mini, tmp_path):
    """SD3.5-M runs in bf16 on CUDA; here the same dtype on the CPU: the frozen base and teachers
    in bf16, the student LoRA trained in fp32, labels and loss finite, images decoded by a bf16 VAE."""
    from conftest import random_teacher
    from opd_distill import distill_micro_batch
    from lora import add_student
    from sde_sampler import rollout, sd3_sigmas
    policy = load_policy(str(mini), device="cpu", dtype=torch.bfloat16, t5_tokens=8)
    teacher = random_teacher(policy, tmp_path / "ocr", "ocr", seed=1, r=4, alpha=8)
    from lora import load_adapter
    load_adapter(policy, teacher, "ocr_teacher")
    params = add_student(policy, rank=4, alpha=8)
    assert policy.transformer.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in params)
    cfg = dict(guidance=4.5, noise_level=0.7, kl_weighting="velocity", loss="pathwise", beta_mar=0.1,
               clip_range=1e-4, gamma=0.0)
    kl, mar = distill_micro_batch(policy, ['a sign that says "hello"', "a red dog"], ["ocr_teacher"] * 2, "base",
                                  sd3_sigmas(policy.pipe.scheduler.config, 3), 2, torch.Generator().manual_seed(0),
                                  cfg, 0.5)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.isfinite(kl).all() and (kl > 0).all() and torch.isfinite(mar).all()
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
    out = rollout(policy, ["a red dog"], 2, 4.5, 0.0, generator=torch.Generator().manual_seed(0))
    assert decode(policy, out["latents"])[0].size == (64, 64)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


PER_PROMPT = ((77 + 64) * 48 + 48) * 4  # the miniature's embeddings: (CLIP + T5 tokens) x width + pooled, fp32
PROMPTS = [f"a red dog and {i} blue cats" for i in range(3000)]  # 3000 x 27 kB = 82 MB


def encode_all(pipe_dir, cache_gb):
    """What a training run does with its prompts: cache them up front if they fit, then encode
    batches of 25. Returns (the process's RSS growth, the cache's bytes, the policy)."""
    from sde_sampler import _nbytes, cache_prompts
    policy = load_policy(str(pipe_dir), device="cpu", t5_tokens=64, cache_gb=cache_gb)
    encode(policy, PROMPTS[:1])
    before = _rss()
    cache_prompts(policy, PROMPTS)
    for i in range(0, len(PROMPTS), 25):
        encode(policy, PROMPTS[i:i + 25])
    return _rss() - before, sum(map(_nbytes, policy.embeds.values())), policy


@pytest.mark.slow  # 35-45 s of encoding thousands of prompts: .ci/run runs it after the README's command
def test_embedding_cache_is_bounded_and_so_is_host_memory(mini, capsys):
    """More prompts than --embed_cache_gb holds (OPD on ocr + geneval: 9,010 at 2.6 MiB each):
    encoded when a batch needs them, least recently used out, host memory bounded; the same
    prompts in an unbounded cache grow the process by all their embeddings (the control). RSS
    is measured in fresh processes (this one's heap holds what earlier tests freed)."""
    bound = 100 * PER_PROMPT / 2**30
    _, used, policy = encode_all(mini, bound)
    assert "exceed the 0.0 GiB cache" in capsys.readouterr().out and policy.keep_encoders
    assert len(policy.embeds) <= 101 and used <= policy.cache_bytes
    assert PROMPTS[0] not in policy.embeds  # evicted long ago: encoded again, to the same values
    again = encode(policy, PROMPTS[:1])[0]
    _, used_all, full = encode_all(mini, 1.0)
    assert len(full.embeds) == len(PROMPTS) + 1 and used_all >= len(PROMPTS) * PER_PROMPT
    torch.testing.assert_close(again, encode(full, PROMPTS[:1])[0], rtol=1e-5, atol=1e-6)
    growth = {}
    for gb in (bound, 1.0):
        code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; import test_sd35_shape as t; "
                f"print(t.encode_all({str(mini)!r}, {gb!r})[0])")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        growth[gb] = int(res.stdout.strip().splitlines()[-1])
    assert growth[1.0] > 60e6 and growth[bound] < growth[1.0] / 3, growth
