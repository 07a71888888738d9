"""
The shared core of every stage: the flow-matching SDE maths, the rollout loop, and the policy
(one SD3 pipeline with LoRA adapters for the student, the teachers and the anchor).

    from lora import add_student, load_adapter
    from sde_sampler import load_policy, rollout
    policy = load_policy("stabilityai/stable-diffusion-3.5-medium", device="cuda")
    add_student(policy)                                     # trainable LoRA "student"
    load_adapter(policy, "ocr_teacher/", "ocr")              # frozen LoRA named after its task
    out = rollout(policy, prompts, num_steps=10, guidance=4.5, noise_level=0.7, generator=g)
    v_teacher = adapter_velocities(policy, x, sigma, cond, 4.5, ["ocr", "base"])  # per sample

Convention (SD3): sigma = 1 is pure noise, sigma = 0 is data, x_s = (1 - s) x0 + s eps and the
network predicts v = eps - x0. Sampling walks the scheduler's sigmas from 1 down to 0.

Sections, top to bottom: the maths (pure and small, each with its derivation in the docstring);
the SD3 backbone (loading, prompt encoding through a bounded cache, the velocity call, decoding,
the schedule), the only part that knows the model family; the sampling loops, with any adapter
or a mixed batch of them. The adapters themselves (add, save, read, check, load) are lora.py.
(The tiny world's random pipeline is built by tiny.pretrain.build_tiny_pipeline.)
"""

import json
import logging
import math
from contextlib import contextmanager, nullcontext
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

# diffusers' SD3 pipeline imports image processors for IP-adapters, which this code never uses; without
# torchvision (not needed here) transformers then says it falls back to PIL, twice a run. Only that
# message is dropped; every other warning of that logger still shows.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed); falling back" not in record.getMessage())

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
TINY_MODEL = REPO / "assets" / "tiny" / "base"
BASE = "base"  # the adapter name that means "all adapters disabled"


# -----------------------------------------------------------------------------
# maths: pure functions of tensors (the SDE step and its log-prob, the transition KL, CFG, GRPO's
# advantages and clipped surrogate, the flow-matching loss), each checked against torch.distributions or a direct computation

def _per_sample(s, x):
    """A float or (B,) tensor of sigmas, broadcastable against x (B, ...)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *([1] * (x.dim() - 1))) if s.dim() else s


def noise_scale(sigma, sigma_next, noise_level):
    """Flow-GRPO's std_s = a * sqrt(s / (1 - s)). At s = 1 it is infinite, so the authors put the
    next sigma in the denominator there; we do the same."""
    denom = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step(v, x, sigma, sigma_next, noise_level, prev_sample=None, generator=None):
    """One step of the Flow-GRPO SDE from sigma to sigma_next < sigma.

    Returns (prev_sample, log_prob, mean, std): the next state (sampled unless given), the
    Gaussian log-density of it averaged over the non-batch dims (shape (B,)), the transition
    mean and its standard deviation std_s * sqrt(|dt|). noise_level = 0 is the Euler ODE step;
    its log_prob is returned as zeros (a point mass has no density)."""
    v, x = v.float(), x.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = s_next - s
    if noise_level == 0:
        mean = x + dt * v
        return mean, torch.zeros(x.shape[0], device=x.device), mean, torch.zeros_like(s)
    std_s = noise_scale(s, s_next, noise_level)
    mean = x * (1 + std_s ** 2 * dt / (2 * s)) + v * (1 + std_s ** 2 * (1 - s) / (2 * s)) * dt
    std = std_s * torch.sqrt(-dt)
    if prev_sample is None:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = mean + std * z
    prev_sample = prev_sample.float()
    log_prob = (-((prev_sample - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, std


def transition_kl(v_student, v_teacher, sigma, sigma_next, noise_level, weighting="flowgrpo"):
    """KL(student transition || teacher transition) at the same state, shape (B,).

    Both transitions are N(mu, std_s^2 |dt| I), so the KL is |mu_s - mu_T|^2 / (2 std_s^2 |dt|),
    and mu_s - mu_T = (1 + std_s^2 (1 - s) / (2 s)) dt (v_s - v_T): a time-weighted L2 between
    velocities. "exact" is that KL; "flowgrpo" is the authors' normalisation (mean over dims, no
    |dt|), which their learning rates were tuned for: flowgrpo = exact * |dt| / D.

    Both weight the steps very unevenly: the transition noise is largest near sigma = 1, so
    the same velocity error costs ~680x (exact) to ~4,600x (flowgrpo) less at the first of SD3's
    10 shift-3 steps than at the ninth, and the first steps are where layout and counts are decided.
    "velocity" divides each step's KL by that time weight: half the mean squared velocity
    difference, every step alike. Its gradient at a step points the same way as the KL's; only
    the balance between steps changes (it is a reweighted KL, not a KL)."""
    if noise_level <= 0:
        raise ValueError("transition_kl needs noise_level > 0 (the ODE step has no density)")
    diff = v_student.float() - v_teacher.float()
    s, s_next = _per_sample(sigma, diff), _per_sample(sigma_next, diff)
    dt = s_next - s
    std_s = noise_scale(s, s_next, noise_level)
    sq = ((1 + std_s ** 2 * (1 - s) / (2 * s)) * dt * diff) ** 2
    dims = tuple(range(1, diff.dim()))
    if weighting == "exact":
        return (sq / (2 * std_s ** 2 * -dt)).sum(dim=dims)
    if weighting == "flowgrpo":
        return (sq / (2 * std_s ** 2)).mean(dim=dims)
    if weighting == "velocity":
        return (0.5 * diff ** 2).mean(dim=dims)
    raise ValueError(f"unknown kl weighting {weighting!r}; use 'flowgrpo', 'exact' or 'velocity'")


def guide(v_uncond, v_cond, guidance):
    """Classifier-free guidance. Distilled velocities are guided velocities, as the authors do."""
    return v_uncond + guidance * (v_cond - v_uncond)


def group_advantages(rewards, groups, global_std=True, clip=5.0, eps=1e-4):
    """GRPO: (r - mean of its prompt's group) / (std + eps), clipped. std is over the whole batch
    or per group; a group whose images all score the same gets zero advantage, not NaN."""
    adv = torch.zeros_like(rewards)
    std_all = rewards.std() if rewards.numel() > 1 else torch.tensor(0.0)
    for g in groups.unique():
        m = groups == g
        std = std_all if global_std else (rewards[m].std() if m.sum() > 1 else torch.tensor(0.0))
        adv[m] = (rewards[m] - rewards[m].mean()) / (std + eps)
    return adv.clamp(-clip, clip)


def ppo_loss(log_prob, old_log_prob, advantages, clip_range):
    """The clipped surrogate on the per-step ratio (per-dim mean log-probs, Flow-GRPO's
    convention). Returns (loss, fraction of clipped ratios)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ((ratio - 1).abs() > clip_range).float().mean()


def noisy(x0, eps, s):
    """The rectified flow's state between data x0 and noise eps: x_s = (1 - s) x0 + s eps, s per
    sample (SD3's forward process; the sigma of the sampler's steps)."""
    return (1 - _per_sample(s, x0)) * x0 + _per_sample(s, x0) * eps


def flow_matching_loss(v, x0, eps):
    """The rectified-flow loss of velocities v predicted at noisy(x0, eps, s): their target is
    eps - x0 at every s (SD3's pretraining loss; the SFT cold start and the tiny base use it)."""
    return ((v - (eps - x0)) ** 2).mean()


# -----------------------------------------------------------------------------
# SD3: the backbone. Everything that knows the model family is here; a second backbone (FLUX.1, say)
# would be a sibling section with the same names: Policy, resolve_model, load_policy, encode,
# velocity, decode, initial_noise and its schedule (sd3_sigmas)

@dataclass
class Policy:
    pipe: object
    device: torch.device
    dtype: torch.dtype
    resolution: int
    student: str | None = None              # name of the trainable adapter, if any
    t5_tokens: int = 256                    # SD3's max_sequence_length: T5 tokens per prompt
    embeds: OrderedDict = field(default_factory=OrderedDict)  # prompt -> (embeds, pooled) on the CPU, LRU
    cache_bytes: int = 4 << 30              # the embedding cache's bound (SD3.5-M: 2.6 MiB a prompt)
    keep_encoders: bool = False             # text encoders stay on the device (set when prompts overflow)
    full: dict = field(default_factory=dict)  # name -> a frozen full-weight transformer (lora.load_teacher)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def latent_shape(self):
        # A pipeline folder without a VAE is a pixel-space model (the tiny world).
        scale = self.pipe.vae_scale_factor if self.pipe.vae is not None else 1
        c = self.transformer.config.in_channels
        return (c, self.resolution // scale, self.resolution // scale)

    def autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()


def resolve_model(model, preset=None):
    """The pipeline to load: --model wins, then the preset's, then SD3.5-Medium. (parse_config
    only lets through the presets a script defines.)"""
    if model:
        return str(model)
    if preset == "tiny":
        if not (TINY_MODEL / "model_index.json").exists():
            raise FileNotFoundError(f"tiny base not found at {TINY_MODEL}; run `python -m tiny.pretrain`")
        return str(TINY_MODEL)
    return DEFAULT_MODEL


def default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_policy(model=DEFAULT_MODEL, device=None, dtype=None, resolution=None, t5_tokens=256, cache_gb=4.0):
    """Load an SD3 pipeline (hub id or folder). Components stored as null in the folder's
    model_index.json (no T5, or no VAE for a pixel-space model) are passed as None, which
    diffusers requires. The transformer (and VAE) go to the device, frozen; the text encoders
    stay on the CPU and visit the device only to fill the embedding cache. t5_tokens is SD3's
    max_sequence_length; without T5 the pipeline pads with that many zero tokens, which only
    cost compute (the tiny base is trained and sampled with 1)."""
    from diffusers import StableDiffusion3Pipeline
    device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    nulls = {}
    index = Path(model) / "model_index.json"
    if index.exists():
        nulls = {k: None for k, v in json.loads(index.read_text()).items()
                 if isinstance(v, list) and v[0] is None}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype, **nulls)
    except (OSError, ValueError) as e:  # offline, gated, not a pipeline: one line, not a traceback
        hint = (" (SD3.5-Medium is gated: accept its licence on the hub, `huggingface-cli login`, or pass "
                "--model FOLDER with a copy)" if model == DEFAULT_MODEL else "")
        text = str(e).strip().splitlines()
        raise ValueError(f"cannot load the model {model!r}: {type(e).__name__}: {text[0][:200] if text else ''}"
                         f"{hint}") from None
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    pipe.transformer.to(device)
    if pipe.vae is not None:
        pipe.vae.to(device)
    scale = pipe.vae_scale_factor if pipe.vae is not None else 1
    resolution = resolution or pipe.transformer.config.sample_size * scale
    return Policy(pipe=pipe, device=device, dtype=dtype, resolution=resolution, t5_tokens=t5_tokens,
                  cache_bytes=int(cache_gb * 2**30))


def _nbytes(entry):
    return sum(t.untyped_storage().nbytes() for t in entry)


@torch.no_grad()
def _encode_missing(policy, missing):
    """Encode prompts (chunks of 32) into the cache; {prompt: (embeds, pooled)} of them."""
    pipe = policy.pipe
    encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
    for m in encoders:
        m.to(policy.device)
    # diffusers warns of cut prompts once per batch of 32; cache_prompts says it once per run
    log = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    level, _ = log.level, log.setLevel(logging.ERROR)
    new = {}
    try:
        for i in range(0, len(missing), 32):
            chunk = missing[i:i + 32]
            e, _, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None,
                                            do_classifier_free_guidance=False, device=policy.device,
                                            max_sequence_length=policy.t5_tokens)
            for j, text in enumerate(chunk):  # copies: a view would keep the whole chunk alive
                new[text] = (e[j].to("cpu", copy=True), p[j].to("cpu", copy=True))
    finally:
        log.setLevel(level)
    if not policy.keep_encoders:
        for m in encoders:  # dead weight on the accelerator between encodings
            m.to("cpu")
    cache = policy.embeds
    for text, entry in new.items():
        cache[text] = entry
    used = sum(map(_nbytes, cache.values()))
    while used > policy.cache_bytes and len(cache) > 1:  # least recently used out first
        used -= _nbytes(cache.popitem(last=False)[1])
    return new


def cache_prompts(policy, prompts):
    """Before training: encode every prompt a run will use, once, if their embeddings fit in
    policy.cache_bytes (the tiny world's ~1,100 prompts take 10 MB). If not (OPD on ocr +
    geneval: 9,010 prompts, 23 GiB at SD3.5-M's 2.6 MiB), prompts are encoded when a batch needs
    them and the least recently used leave the cache; the text encoders then stay on the device
    (SD3.5-M's: 11 GB in bf16) instead of crossing the bus at every micro-batch. Either way the
    host holds at most cache_bytes of embeddings per process."""
    prompts = sorted(set(prompts) | {""})  # "" is the negative prompt
    cfg, pipe = policy.transformer.config, policy.pipe
    cut = [t for t in prompts if pipe.tokenizer_3 is not None and len(pipe.tokenizer_3(t).input_ids) > policy.t5_tokens]
    if cut:
        print(f"note: {len(cut)} of {len(prompts)} prompts are longer than --t5_tokens {policy.t5_tokens} "
              f"T5 tokens and are cut there, e.g. {cut[0][:60]!r}")
    elem = (pipe.text_encoder or pipe.text_encoder_3).dtype.itemsize
    per_prompt = ((pipe.tokenizer_max_length + policy.t5_tokens) * cfg.joint_attention_dim
                  + cfg.pooled_projection_dim) * elem
    if per_prompt * len(prompts) <= policy.cache_bytes:
        missing = [p for p in prompts if p not in policy.embeds]
        if missing:
            _encode_missing(policy, missing)
        return
    policy.keep_encoders = True
    print(f"note: {len(prompts)} prompts x {per_prompt / 2**20:.2f} MiB of embeddings exceed the "
          f"{policy.cache_bytes / 2**30:.1f} GiB cache (--embed_cache_gb): prompts are encoded when a batch needs "
          f"them, the least recently used leave the cache, and the text encoders stay on {policy.device}")


@torch.no_grad()
def encode(policy, prompts, negative_prompt=""):
    """(embeds, pooled, neg_embeds, neg_pooled) of a batch, on the device, through the bounded
    per-prompt cache (missing prompts are encoded now)."""
    cache = policy.embeds
    wanted = list(dict.fromkeys([*prompts, negative_prompt]))
    got = {p: cache[p] for p in wanted if p in cache}
    for p in got:
        cache.move_to_end(p)
    missing = sorted(p for p in wanted if p not in got)
    if missing:
        got.update(_encode_missing(policy, missing))
    e = torch.stack([got[p][0] for p in prompts]).to(policy.device, policy.dtype)
    p = torch.stack([got[p][1] for p in prompts]).to(policy.device, policy.dtype)
    ne, npool = got[negative_prompt]
    ne = ne.to(policy.device, policy.dtype).expand_as(e)
    npool = npool.to(policy.device, policy.dtype).expand_as(p)
    return e, p, ne, npool


def velocity(policy, x, sigma, cond, guidance, transformer=None):
    """The (guided) velocity of the active adapter at state x (or of another transformer of the
    same config, e.g. a full-weight teacher). cond = encode(...) output; guidance a float or one
    per sample, a (B,) tensor. The uncond and cond halves go through one batched forward, as
    diffusers does (a float guidance of 1 needs the cond half only)."""
    e, p, ne, npool = cond
    t = _per_sample(sigma, x).reshape(-1).expand(x.shape[0]) * 1000
    net = policy.transformer if transformer is None else transformer
    with policy.autocast():
        if not torch.is_tensor(guidance) and guidance == 1.0:
            return net(hidden_states=x.to(policy.dtype), timestep=t, encoder_hidden_states=e,
                       pooled_projections=p, return_dict=False)[0].float()
        out = net(hidden_states=torch.cat([x, x]).to(policy.dtype), timestep=torch.cat([t, t]),
                  encoder_hidden_states=torch.cat([ne, e]), pooled_projections=torch.cat([npool, p]),
                  return_dict=False)[0].float()
    v_uncond, v_cond = out.chunk(2)
    return guide(v_uncond, v_cond, _per_sample(guidance, v_cond) if torch.is_tensor(guidance) else guidance)


@torch.no_grad()
def decode(policy, latents, batch_size=8):
    """Latents -> list of PIL images, batch_size latents per VAE call: the decoder's activations
    grow with its batch (at 512 px a GRPO rank's whole rollout, 96 to 256 latents, would take tens
    of GB at once). Without a VAE the latents are pixels in [-1, 1]."""
    vae, out = policy.pipe.vae, []
    for chunk in latents.split(batch_size):
        if vae is None:
            images = chunk.float()
        else:
            z = chunk.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            images = vae.decode(z, return_dict=False)[0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out += [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
    return out


def initial_noise(policy, seeds):
    """Starting latents with one seed per sample, so a prompt sees the same noise whatever
    batch it lands in and whichever checkpoint samples it."""
    return torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(policy.device)


def sd3_sigmas(scheduler_config, num_steps):
    """The scheduler's sigmas for num_steps steps (shift applied), from ~1 down to a final 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    return sched.sigmas.float().cpu()


# -----------------------------------------------------------------------------
# sampling with any adapter: the loops over the backbone's functions (peft's adapters, not SD3's)

@contextmanager
def using_adapter(policy, name):
    """Run with one adapter active (or BASE: all disabled), then restore the student.
    peft's set_adapter flips requires_grad, so the student must be re-activated afterwards or
    a later backward gives it no gradient."""
    tr = policy.transformer
    loaded = bool(getattr(tr, "peft_config", None))  # diffusers sets it with the first adapter
    if name == BASE:
        if loaded:
            tr.disable_adapters()
    else:
        tr.set_adapter(name)
    try:
        yield
    finally:
        if name == BASE and loaded:
            tr.enable_adapters()
        if policy.student is not None:
            tr.set_adapter(policy.student)


@torch.no_grad()
def adapter_velocities(policy, x, sigma, cond, guidance, names):
    """Guided velocities of frozen adapters at the states x: sample k through adapter names[k]
    (BASE: none), or all through one name. Several names go through ONE forward, as peft's
    mixed-adapter batches: every LoRA layer runs the base on the whole batch and adds each
    adapter's update to its own rows only (a forward pre-hook hands the layers the names, which
    diffusers' transformer does not pass down). CFG doubles the batch, so the names repeat. A
    full-weight teacher (policy.full) is not an adapter: its rows go through its own copy."""
    from peft.tuners.lora import LoraLayer
    names = [names] * x.shape[0] if isinstance(names, str) else list(names)
    if any(n in policy.full for n in names):  # full-weight teachers: a forward of their own copy each
        out = torch.empty_like(x, dtype=torch.float32)
        for group in dict.fromkeys(n if n in policy.full else None for n in names):
            rows = [i for i, n in enumerate(names) if (n if n in policy.full else None) == group]
            part = (x[rows], sigma[rows] if torch.is_tensor(sigma) and sigma.dim() else sigma,
                    tuple(c[rows] for c in cond), guidance[rows] if torch.is_tensor(guidance) else guidance)
            out[rows] = (adapter_velocities(policy, *part, [names[i] for i in rows]) if group is None
                         else velocity(policy, *part, transformer=policy.full[group]))
        return out
    if len(set(names)) == 1:
        with using_adapter(policy, names[0]):
            return velocity(policy, x, sigma, cond, guidance)
    per_row = ["__base__" if n == BASE else n for n in names]

    def hand_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": per_row * (args[0].shape[0] // len(per_row))}

    hooks = [m.register_forward_pre_hook(hand_names, with_kwargs=True)
             for m in policy.transformer.modules() if isinstance(m, LoraLayer)]
    try:
        return velocity(policy, x, sigma, cond, guidance)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def rollout(policy, prompts, num_steps, guidance, noise_level, generator=None, latents=None,
            adapter=None, negative_prompt="", sde_steps=None):
    """Sample a batch with CFG: SDE when noise_level > 0 (on-policy rollouts), ODE when 0 (eval).

    sde_steps = k keeps the noise in the first k steps only and finishes with ODE steps (the
    SDE window of Flow-GRPO-Fast): the steps that are not trained then leave no sampling noise
    in the final image, which matters when the reward reads pixels directly (the tiny world).
    adapter picks the sampling adapter (default: the student if any, else the base), or a
    full-weight model loaded by lora.load_teacher.
    Returns a dict: states (B,T,...) the state before each step, next_states (B,T,...),
    log_probs (B,T), sigmas (T+1,) and latents (B,...) the final sample."""
    cond = encode(policy, prompts, negative_prompt)
    sigmas = sd3_sigmas(policy.pipe.scheduler.config, num_steps)
    if latents is None:
        latents = torch.randn((len(prompts), *policy.latent_shape), generator=generator,
                              device=policy.device if generator is None else generator.device)
    x = latents.to(policy.device, torch.float32)
    adapter = adapter or policy.student or BASE
    states, next_states, log_probs = [], [], []
    for i in range(num_steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        if adapter in policy.full:  # a full-weight model (lora.load_teacher) samples through its own copy
            v = velocity(policy, x, s, cond, guidance, transformer=policy.full[adapter])
        else:
            with using_adapter(policy, adapter):
                v = velocity(policy, x, s, cond, guidance)
        noisy = sde_steps is None or i < sde_steps
        x_next, log_prob, _, _ = sde_step(v, x, s, s_next, noise_level if noisy else 0.0, generator=generator)
        states.append(x)
        next_states.append(x_next)
        log_probs.append(log_prob)
        x = x_next
    return {"states": torch.stack(states, 1), "next_states": torch.stack(next_states, 1),
            "log_probs": torch.stack(log_probs, 1), "sigmas": sigmas, "latents": x}


def rollout_batches(policy, prompts, batch_size, **kwargs):
    """rollout over many prompts in micro-batches of batch_size (starting latents, if given, are
    sliced along), concatenated along the batch. kwargs go to rollout."""
    outs = []
    latents = kwargs.pop("latents", None)
    for i in range(0, len(prompts), batch_size):
        start = None if latents is None else latents[i:i + batch_size]
        outs.append(rollout(policy, prompts[i:i + batch_size], latents=start, **kwargs))
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("states", "next_states", "log_probs", "latents")}
    merged["sigmas"] = outs[0]["sigmas"]
    return merged
