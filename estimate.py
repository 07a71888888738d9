"""
What one training step of each stage costs on an accelerator, worked out on a CPU without one:
the peak memory, split into frozen weights, trainable state and activations, and the FLOPs, at
a model's real config (SD3.5-Medium, SD3.5-Large) and any batch size, with and without gradient
checkpointing.

    python -m tools.bench --only estimate                      # the table of docs/benchmarks.md
    estimate.startup_check("opd", cfg, model, free_bytes, distill_micro_batch, world)   # a stage, on CUDA

How. The stages' own code runs one trained SDE step (opd_distill.distill_micro_batch over one
step; teacher_grpo.step_loss and its backward; sft_coldstart's loss; a rollout step's velocity;
the VAE decode of one chunk) on models made of fake tensors (FakeTensorMode: shapes, dtypes,
strides, no data), built from their configs on the meta device: nothing is allocated, and the
2.2 B parameters of SD3.5-M cost seconds. A TorchDispatchMode (Counter) sees every op, adds the
bytes of each storage an op creates, takes them off when the storage dies (a weakref finalizer),
and keeps the peak per phase (the label forward without gradient, the student's forward and
backward, the VAE); it also adds up the FLOPs of matmuls, convolutions and attention with
torch.utils.flop_counter's formulas. Weights and trainable state are counted from the parameters.

What is modelled as on CUDA: frozen weights in bf16, the student LoRA in fp32, and the
transformer's forward under torch.autocast("cuda", bf16). A CPU-only torch cannot run autograd on
fake CUDA tensors (it wants a CUDA device guard), so the tensors are fake CPU ones and
cuda_autocast() casts at the ops CUDA's autocast casts at, to the same dtypes (checkpointing
recomputes under it too). Attention: fake CPU tensors take the fused CPU flash kernel, which,
like CUDA's flash and efficient kernels, saves the output and a logsumexp; no tokens x tokens
matrix is allocated (Counter.attention_matrices would count one, and the report says so). Not
modelled: the CUDA caching allocator's rounding and fragmentation (reserved exceeds allocated by
a few percent: hence the spare the fits ask for), cuBLAS workspaces, the CUDA context, kernels'
internal scratch, and autograd's graph, which lives in host memory on CUDA.

Activation memory is affine in the batch: it is measured at batch 1 and 2 and extrapolated, each
phase on its own line (OPD's label forward in its own images: the batch plus the anchor's); FLOPs
are linear in it. validate() runs the same steps on real CPU tensors of small pipelines and
compares with the real heap's growth (tests/test_estimate.py, tools/bench.py --only estimate).

Layout: the stages import this module (startup_check), so it imports no stage. Their code comes
in as arguments: a unit takes the stage's function (opd_step: opd_distill.distill_micro_batch;
grpo_train_step: teacher_grpo.step_loss; sft_step: sft_coldstart.flow_matching_loss), and the
table and the check take `stages`, {"opd"|"grpo"|"sft": (the stage's DEFAULTS, that function)},
which a tool or a test builds (tools/bench.py, tests/test_estimate.py)."""
import logging
import math
import weakref
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


GIB = 2 ** 30
H100_BF16 = 989e12          # H100 SXM dense bf16 peak, FLOP/s
MFU = 0.40                  # the fraction of it a step is assumed to reach
SPARE = 0.15                # a setting "fits" when its estimated peak leaves this fraction of the memory free

# SD3.5's VAE latent: 16 channels, with its scaling and shift factors
SD35 = dict(scaling_factor=1.5305, shift_factor=0.0609, latent_channels=16)

# SD3.5-Medium's transformer (its config.json on the hub); the miniature keeps the keys, not the sizes
SD35_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")

SD35_MEDIUM = dict(SD35_TRANSFORMER)
# SD3.5-Large's transformer/config.json: 38 blocks of 38 heads x 64 = 2432, no dual attention
SD35_LARGE = dict(SD35_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, dual_attention_layers=())
# SD3.5's VAE (both sizes; sd35_miniature builds the same at full size): 16 latent channels, 8x down
SD35_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, **SD35)


# -----------------------------------------------------------------------------
# counting: live storages and FLOPs (a dispatch mode), and CUDA's autocast on CPU tensors (a function mode)

def _flop_formulas():
    """torch's FLOP formulas, plus the CPU flash attention kernel's (the op fake CPU tensors take),
    which flop_counter does not list: the same count as CUDA's flash kernel."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    return {**fc.flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: fc.sdpa_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: fc.sdpa_backward_flop}


# a softmax over a (batch, heads, tokens, tokens) tensor is the math attention kernel's
_SOFTMAX = {torch.ops.aten._softmax, torch.ops.aten._safe_softmax}


class Counter(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while it is active and that are still alive,
    their peak per phase, and FLOPs per phase. Storages that existed before (weights, gradients,
    the inputs: `known`) are not counted. `phase` is set from outside (forward pre-hooks).
    heap: a function giving the process's heap bytes in use, read after every op: its peak growth
    is an independent measurement of real CPU tensors (heap_meter)."""

    def __init__(self, known=(), heap=None):
        super().__init__()
        self.heap, self.heap0 = heap, heap() if heap else 0
        self.heap_peak = 0
        self.known = {t.untyped_storage()._cdata: t for t in known}  # kept alive: their addresses stay theirs
        self.sizes, self.live, self.phase = {}, 0, "other"
        self.peak, self.flops = {}, {}
        self.attention_matrices = 0  # (q tokens x k tokens) tensors: the math attention kernel was taken
        self.formulas = _flop_formulas()

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.known and key not in self.sizes:
                    self.sizes[key] = st.nbytes()
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, key)
        packet = func._overloadpacket
        if packet in self.formulas:
            self.flops[self.phase] = self.flops.get(self.phase, 0) + self.formulas[packet](*args, **kwargs, out_val=out)
        if packet in _SOFTMAX and out.dim() == 4 and out.shape[-1] == out.shape[-2] > 64:
            self.attention_matrices += 1
        self.peak[self.phase] = max(self.peak.get(self.phase, 0), self.live)
        if self.heap:
            self.heap_peak = max(self.heap_peak, self.heap() - self.heap0)
        return out


def heap_meter():
    """Bytes the C heap holds (glibc's mallinfo2: in use plus mmapped chunks), where torch's CPU
    allocator takes tensor memory from; None where there is no glibc."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
    except (OSError, AttributeError):
        return None

    def used():
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return used


def _cast_floats(args, kwargs, dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
            return x.to(dtype)
        return x
    return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}


# CUDA autocast's lists (aten/src/ATen/autocast_mode.cpp) as the Python entry points SD3, peft and
# the losses reach: these ops cast their inputs to bf16, ...
_LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.scaled_dot_product_attention, torch.matmul,
          torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
          torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.einsum}
# ... these to fp32 (and their fp32 results stay so until a bf16 op casts them back), ...
_FP32 = {F.layer_norm, F.group_norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.rsqrt,
         torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, F.mse_loss, F.softplus}
# ... and these compute in fp32 (dtype=float32) without a copy of their input
_FP32_OUT = {F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax, torch.log_softmax, torch.sum,
             torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum}


class _CudaAutocast(TorchFunctionMode):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args, kwargs = _cast_floats(args, kwargs, self.dtype)
        elif func in _FP32:
            args, kwargs = _cast_floats(args, kwargs, torch.float32)
        elif func in _FP32_OUT and "dtype" not in kwargs and args[0].dtype in (torch.bfloat16, torch.float16):
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


def cuda_autocast(dtype=torch.bfloat16):
    """torch.autocast("cuda", dtype) for tensors on any device: the same casts at the same ops, so
    that the saved activations have CUDA's dtypes. A function mode sits above autograd, as
    autocast does, so the casts are part of the graph. (Autocast's cache of the casts of
    trainable weights is not kept: each use casts again, which costs the same bytes.)"""
    return _CudaAutocast(dtype) if dtype != torch.float32 else nullcontext()


# -----------------------------------------------------------------------------
# the models: fake ones from a config, with the adapters and copies a stage holds

def _to_fake(module, mode):
    """Replace every meta parameter and buffer by a fake CPU tensor of the same shape and dtype."""
    def fake(t):
        if t.is_meta:
            with mode:
                return torch.empty(t.shape, dtype=t.dtype, device="cpu")
        return mode.from_tensor(t)
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = fake(b)
    return module


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_params(transformer, name):
    return [p for n, p in transformer.named_parameters() if f".{name}." in n]


def add_adapters(policy, rank=32, alpha=64, teachers=(), anchor=None):
    """The LoRAs of a stage, as lora.add_student and lora.load_adapter leave them: frozen teachers
    (and a LoRA anchor) in the model's dtype, then the trainable student in fp32, active."""
    from lora import _add_adapter, lora_config
    tr = policy.transformer
    for name in [*teachers, *([anchor] if anchor else [])]:
        _add_adapter(tr, lora_config(rank, alpha), name)
        for p in adapter_params(tr, name):
            p.data = p.data.to(policy.dtype)
            p.requires_grad_(False)
    _add_adapter(tr, lora_config(rank, alpha), "student")
    for p in adapter_params(tr, "student"):
        p.data = p.data.float()
        p.requires_grad_(True)
    policy.student = "student"
    tr.set_adapter("student")


def fake_policy(transformer_config, vae_config=None, resolution=512, t5_tokens=256, clip_tokens=77, rank=32,
                alpha=64, teachers=(), anchor=None, full_teacher=None, dtype=torch.bfloat16):
    """(policy, mode): a sde_sampler.Policy whose transformer (with the stage's adapters), VAE and
    full-weight teacher copy (full_teacher: its name) are fake tensors in `mode`; its prompt
    cache holds fake embeddings of clip_tokens + t5_tokens tokens for prompts "p0".."p15" and ""."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sde_sampler import Policy
    mode = FakeTensorMode()

    def build(cls, config):
        # .to(dtype) makes diffusers suggest from_pretrained's torch_dtype, which a model without
        # weights has no use for: that one message is held back
        log = logging.getLogger("diffusers.models.modeling_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with torch.device("meta"):
                return cls.from_config(config).to(dtype).requires_grad_(False)
        finally:
            log.setLevel(level)
    tr = build(SD3Transformer2DModel, transformer_config)
    vae = build(AutoencoderKL, vae_config) if vae_config else None
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae else 1  # as StableDiffusion3Pipeline's
    pipe = SimpleNamespace(transformer=tr, vae=vae, scheduler=None, vae_scale_factor=scale)
    policy = Policy(pipe=pipe, device=torch.device("cpu"), dtype=dtype, resolution=resolution, t5_tokens=t5_tokens)
    add_adapters(policy, rank, alpha, teachers, anchor)
    for m in (tr, vae):
        if m is not None:
            _to_fake(m, mode)
    if full_teacher:
        policy.full[full_teacher] = _to_fake(build(SD3Transformer2DModel, transformer_config), mode).eval()
    policy.autocast = lambda: cuda_autocast(dtype)  # the transformer's forwards as under CUDA autocast
    cfg = tr.config
    with mode:
        for prompt in [f"p{i}" for i in range(16)] + [""]:
            policy.embeds[prompt] = (torch.empty(clip_tokens + t5_tokens, cfg.joint_attention_dim, dtype=dtype),
                                     torch.empty(cfg.pooled_projection_dim, dtype=dtype))
    return policy, mode


def real_policy(model, dtype=torch.bfloat16, resolution=None, t5_tokens=256, rank=32, alpha=64, teachers=(),
                anchor=None):
    """The same, loaded for real on the CPU (sde_sampler.load_policy, the stages' loader), in
    `dtype`, its prompt cache filled by the real encoders: what validate() measures against."""
    from sde_sampler import cache_prompts, load_policy
    policy = load_policy(model, device="cpu", dtype=dtype, resolution=resolution, t5_tokens=t5_tokens)
    add_adapters(policy, rank, alpha, teachers, anchor)
    cache_prompts(policy, [f"p{i}" for i in range(16)])
    policy.autocast = lambda: cuda_autocast(dtype)
    return policy


# -----------------------------------------------------------------------------
# one step of each stage's work, as the stage's own code does it

def _routes(teachers, full_teacher, batch):
    names = [*teachers, *([full_teacher] if full_teacher else [])] or ["base"]
    return [names[i % len(names)] for i in range(batch)]


def opd_step(policy, batch, cfg, distill, teachers=(), anchor=None, full_teacher=None, labels_only=False):
    """One trained SDE step of one OPD micro-batch (distill: opd_distill.distill_micro_batch, over
    one step): the routed teachers' and the anchor's labels in one no-grad forward, the student's
    forward with gradient, the loss, the backward. labels_only: just the label forward."""
    from sde_sampler import BASE, adapter_velocities, encode
    prompts = [f"p{i}" for i in range(batch)]
    routed = _routes(teachers, full_teacher, batch)
    mar_rows = [k for k in range(batch) if k % cfg["mar_every"] == 0]
    anchor = anchor or BASE
    if labels_only:  # distill_micro_batch's label forward, alone
        cond = encode(policy, prompts)
        rows = list(range(batch)) + mar_rows
        x = torch.randn(len(rows), *policy.latent_shape)
        adapter_velocities(policy, x, 0.9, tuple(c[rows] for c in cond), cfg["guidance"],
                           routed + [anchor] * len(mar_rows))
        return
    sigmas = np.array([1.0, 0.9])  # .item() of a fake tensor has no value: numpy's has
    distill(policy, prompts, routed, anchor, sigmas, 1, torch.Generator(), cfg, 1.0, None, mar_rows)


def rollout_step(policy, batch, cfg):
    """One step of a GRPO rollout (sde_sampler.rollout's loop body): the student's guided velocity
    without gradient, and the SDE step."""
    from sde_sampler import encode, sde_step, using_adapter, velocity
    x = torch.randn(batch, *policy.latent_shape)
    with torch.no_grad(), using_adapter(policy, policy.student):
        v = velocity(policy, x, 0.9, encode(policy, [f"p{i}" for i in range(batch)]), cfg["guidance"])
        sde_step(v, x, 0.9, 0.8, cfg["noise_level"])


def decode_step(policy, batch, cfg=None):
    """sde_sampler.decode's device work for one chunk of `batch` latents: the VAE, then uint8 pixels."""
    vae = policy.pipe.vae
    with torch.no_grad():
        latents = torch.randn(batch, *policy.latent_shape)
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0].float()
        ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def grpo_train_step(policy, batch, cfg, step_loss):
    """One trained step of one GRPO micro-batch (step_loss: teacher_grpo.step_loss, and its
    backward): the base's velocity without gradient (the KL's reference), the student's with, the
    PPO loss."""
    from sde_sampler import encode
    shape = policy.latent_shape
    traj = {"sigmas": np.array([0.9, 0.8]), "states": torch.randn(batch, 1, *shape),
            "next_states": torch.randn(batch, 1, *shape), "log_probs": torch.zeros(batch, 1)}
    idx = torch.arange(batch)
    cond = encode(policy, [f"p{i}" for i in range(batch)])
    loss, kl, _ = step_loss(policy, traj, idx, 0, torch.ones(batch), cond, cfg)
    (loss + cfg["beta"] * kl).backward()


def sft_step(policy, batch, cfg, loss):
    """One SFT step: the student's guided velocity at noised teacher samples, the flow-matching
    loss (loss: sft_coldstart.flow_matching_loss), the backward (sft_coldstart.sft_loss)."""
    from sde_sampler import encode, velocity
    x0, eps = torch.randn(batch, *policy.latent_shape), torch.randn(batch, *policy.latent_shape)
    s = torch.rand(batch)
    xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps  # sft_coldstart's noisy(x0, eps, s)
    v = velocity(policy, xs, s, encode(policy, [f"p{i}" for i in range(batch)]), cfg["guidance"])
    loss(v, x0, eps).backward()


def _checkpointing(autocast):
    """diffusers' gradient checkpointing function with the recompute under the forward's autocast,
    as torch.utils.checkpoint re-enters torch.autocast for its recompute."""
    def checkpoint(block, *args):
        def forward(*a):
            with autocast():
                return block(*a)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return checkpoint


def measure(policy, mode, step, batch, cfg, checkpointing=False, heap=None, **kw):
    """Run step(policy, batch, cfg, **kw) once under a Counter, inside `mode` (fake tensors) or on
    real ones (mode None), and return {"peak": {phase: bytes}, "flops": {phase: FLOPs}, "heap":
    peak heap growth or None, "attention_matrices": n}. Phases: "labels" (transformer forwards
    without gradient), "student" (the forward with gradient, and the backward), "vae", "other"
    (before the first forward). The student's gradients exist beforehand, as from the second
    micro-batch of a step on (accumulation), and count as trainable state, not here."""
    vae = policy.pipe.vae
    models = [policy.transformer, *policy.full.values(), *([vae] if vae is not None else [])]
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    if checkpointing:
        policy.transformer.enable_gradient_checkpointing(_checkpointing(policy.autocast))
    with mode or nullcontext():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    if heap:  # a first call allocates for good (lazy imports, kernel caches): not the step's to measure
        with torch.random.fork_rng(devices=[]):
            step(policy, batch, cfg, **kw)
    known = [t for m in models for t in [*m.parameters(), *m.buffers()]] + [p.grad for p in params]
    counter = Counter(known + [t for entry in policy.embeds.values() for t in entry], heap)

    def transformer_phase(module, args):
        counter.phase = "student" if torch.is_grad_enabled() else "labels"
    hooks = [m.register_forward_pre_hook(transformer_phase) for m in [policy.transformer, *policy.full.values()]]
    if vae is not None:  # decode() calls vae.decode, not the module: its decoder's call marks the phase
        hooks.append(vae.decoder.register_forward_pre_hook(lambda module, args: setattr(counter, "phase", "vae")))
    try:  # the process's random state stays as it was (a stage checks before it draws its own)
        with torch.random.fork_rng(devices=[]), mode or nullcontext(), counter:
            torch.manual_seed(0)
            step(policy, batch, cfg, **kw)
    finally:
        for h in hooks:
            h.remove()
        if checkpointing:
            policy.transformer.disable_gradient_checkpointing()
    return {"peak": counter.peak, "flops": counter.flops, "attention_matrices": counter.attention_matrices,
            "heap": counter.heap_peak if heap else None}


# -----------------------------------------------------------------------------
# what sits on the device before any step: weights, the trainable state, the optional models

def weights_bytes(policy, teachers=(), anchor=None, full_teacher=None, vae=False):
    """Frozen weights on the device: the base transformer (parameters and buffers, without any
    adapter), the named frozen adapters, a full-weight teacher's copy, the VAE."""
    tr = policy.transformer
    base = [p for n, p in tr.named_parameters() if ".lora_" not in n] + list(tr.buffers())
    total = _nbytes(base) + sum(_nbytes(adapter_params(tr, n)) for n in [*teachers, *([anchor] if anchor else [])])
    if full_teacher:
        copy = policy.full[full_teacher]
        total += _nbytes([*copy.parameters(), *copy.buffers()])
    if vae and policy.pipe.vae is not None:
        total += _nbytes([*policy.pipe.vae.parameters(), *policy.pipe.vae.buffers()])
    return total


def trainable_bytes(policy, ema=True):
    """The student LoRA in fp32, its gradient, AdamW's two moments and (OPD, GRPO) the EMA copy."""
    return _nbytes(adapter_params(policy.transformer, "student")) * (5 if ema else 4)


def text_encoder_params():
    """CLIP-L, CLIP-G and T5-XXL's encoder (SD3.5's three text encoders), counted on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                            num_hidden_layers=12, num_attention_heads=12,
                                                            projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
    return sum(p.numel() for m in (clip_l, clip_g, t5) for p in m.parameters())


def pickscore_params():
    """PickScore_v1: CLIP ViT-H/14 (image tower 1280 wide x 32, text tower 1024 x 24), counted on meta."""
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16),
                        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                           num_attention_heads=16, patch_size=14, image_size=224),
                        projection_dim=1024)
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPModel(config).parameters())


# -----------------------------------------------------------------------------
# from two measurements to any batch, and the stages' sums

def line(x1, y1, x2, y2, x):
    """The value at x of the line through (x1, y1) and (x2, y2)."""
    return y1 + (y2 - y1) * (x - x1) / (x2 - x1)


def images_in(phase, batch, cfg):
    """Images a phase works on in a micro-batch: OPD's label forward also labels the anchor's
    images, 1 in mar_every of them (rounded up: the first image of a micro-batch always is one)."""
    return batch + -(-batch // cfg["mar_every"]) if anchor_share(phase, cfg) != 1 else batch


def activation_bytes(runs, batch, cfg):
    """Peak activation bytes at `batch` of units measured at batch 1 and 2 ({unit: (m1, m2)}): each
    phase extrapolated on a line in its own images, the largest of them."""
    peaks = []
    for m1, m2 in runs.values():
        for phase in m1["peak"].keys() | m2["peak"].keys():
            x1, x2, x = (images_in(phase, b, cfg) for b in (1, 2, batch))
            peaks.append(line(x1, m1["peak"].get(phase, 0), x2, m2["peak"].get(phase, 0), x))
    return max(peaks)


def anchor_share(phase, cfg):
    """Images of a phase per trained image: OPD's label forward labels 1 + 1/mar_every (the anchor's)."""
    return 1 + 1 / cfg["mar_every"] if phase == "labels" and "mar_every" in cfg and cfg.get("beta_mar") else 1


def flops_per_image(m1, m2, cfg):
    """FLOPs per trained image of one pass of a unit (measured at batch 1 and 2): each phase's
    FLOPs per image it works on, times its images per trained image."""
    total = 0
    for phase in m1["flops"].keys() | m2["flops"].keys():
        x1, x2 = images_in(phase, 1, cfg), images_in(phase, 2, cfg)
        total += (m2["flops"].get(phase, 0) - m1["flops"].get(phase, 0)) / (x2 - x1) * anchor_share(phase, cfg)
    return total


def only(run, phases):
    """A unit's measurements restricted to some phases (SFT's step is the student phase of GRPO's)."""
    return tuple({k: {p: v for p, v in m[k].items() if p in phases} if isinstance(m[k], dict) else m[k]
                  for k in m} for m in run)


def with_labels(run, labels_run):
    """An OPD step's measurements with the label forward of another teacher set (labels_run)."""
    return tuple({**m, "peak": {**m["peak"], "labels": lab["peak"]["labels"]},
                  "flops": {**m["flops"], "labels": lab["flops"]["labels"]}} for m, lab in zip(run, labels_run))


def passes(unit, cfg):
    """How many times one optimizer step (GRPO: one iteration of rollouts) runs a unit per image."""
    trained = int(cfg.get("num_steps", 1) * cfg.get("timestep_fraction", 1))
    return {"opd": trained, "rollout": cfg.get("num_steps", 1), "decode": 1, "train": trained, "sft": 1}[unit]


def images_per_step(stage, cfg, gpus):
    """Images one GPU trains per optimizer step (GRPO: per iteration of rollouts, which makes
    updates_per_step updates); SFT's step is one batch."""
    return cfg["batch_size"] if stage == "sft" else cfg["prompts_per_step"] * cfg["group_size"] // gpus


def stage_cost(stage, runs, cfg, batch, weights, trainable, gpus=8, latent_shape=None):
    """{weights, trainable, activations, peak (bytes), flops_per_image, flops_per_step (per GPU),
    seconds (per step and GPU on an H100 at MFU)} of a stage at a batch size, from its units'
    measurements at batch 1 and 2 ({unit: (m1, m2)})."""
    images = images_per_step(stage, {**cfg, "batch_size": batch}, gpus)
    held = 0
    if stage == "grpo":  # every image's trajectory stays on the device from its rollout to its update
        held = images * ((2 * cfg["num_steps"] + 1) * math.prod(latent_shape) * 4 + cfg["num_steps"] * 4)
    act = activation_bytes(runs, batch, cfg)
    if stage == "grpo":  # ... and rollout_batches holds it twice for a moment, when it concatenates
        act = max(act + held, 2 * held)
    per_image = sum(flops_per_image(*run, cfg) * passes(unit, cfg) for unit, run in runs.items())
    return dict(weights=weights, trainable=trainable, activations=act, peak=weights + trainable + act,
                flops_per_image=per_image, flops_per_step=per_image * images,
                seconds=per_image * images / (MFU * H100_BF16))


def largest_batch(cost_at, capacity, spare=SPARE, limit=1024, divides=None):
    """The largest batch size (up to limit, dividing `divides` if given) whose peak leaves `spare`
    of capacity free; 0 if not even 1 does. cost_at(batch) -> stage_cost's dict."""
    best = 0
    for b in range(1, limit + 1):
        if cost_at(b)["peak"] > (1 - spare) * capacity:
            break
        if divides is None or divides % b == 0:
            best = b
    return best


# -----------------------------------------------------------------------------
# the table: every stage at SD3.5's real sizes (python -m tools.bench --only estimate)

MODELS = {"SD3.5-Medium": SD35_MEDIUM, "SD3.5-Large": SD35_LARGE}
GPUS = {"24 GB": 24.0, "40 GB": 39.6, "48 GB": 45.0, "80 GB": 79.6}  # GiB torch sees on a 4090, A100, L40S, H100
TEACHERS = ("t0", "t1", "t2")


def stage_defaults(stages):
    """{stage: a copy of its DEFAULTS} from stages = {stage: (DEFAULTS, its function)}."""
    return {name: dict(defaults) for name, (defaults, _) in stages.items()}


def measure_model(config, stages, vae_config=SD35_VAE, resolution=512, t5_tokens=256, clip_tokens=77, rank=32,
                  alpha=64, log=print):
    """Build one fake policy with every adapter and copy the stages hold (3 LoRA teachers, a LoRA
    anchor, a full-weight teacher), measure every unit at batch 1 and 2 with the stages' DEFAULTS
    and functions (stages: see the module's docstring), and return (policy, {unit: (m1, m2)});
    "opd" (also with a CFG-free student, --student_guidance 1) and "train" (GRPO's update) with
    gradient checkpointing too."""
    import time
    t0 = time.time()
    policy, mode = fake_policy(config, vae_config, resolution, t5_tokens, clip_tokens, rank, alpha, TEACHERS, "anchor",
                               "full")
    cfgs, distill, step_loss = stage_defaults(stages), stages["opd"][1], stages["grpo"][1]
    opd = dict(distill=distill, anchor="anchor")
    todo = {("opd", False): (opd_step, "opd", False, dict(opd, teachers=TEACHERS)),
            ("opd", True): (opd_step, "opd", True, dict(opd, teachers=TEACHERS)),
            ("opd free", False): (opd_step, "opd", False, dict(opd, teachers=TEACHERS, cfg={"student_guidance": 1.0})),
            ("opd free", True): (opd_step, "opd", True, dict(opd, teachers=TEACHERS, cfg={"student_guidance": 1.0})),
            "labels 1": (opd_step, "opd", False, dict(opd, teachers=TEACHERS[:1], labels_only=True)),
            "labels full": (opd_step, "opd", False, dict(opd, full_teacher="full", labels_only=True)),
            "rollout": (rollout_step, "grpo", False, {}), "decode": (decode_step, "grpo", False, {}),
            ("train", False): (grpo_train_step, "grpo", False, dict(step_loss=step_loss)),
            ("train", True): (grpo_train_step, "grpo", True, dict(step_loss=step_loss))}
    runs = {}
    for key, (step, stage, ckpt, kw) in todo.items():
        kw = dict(kw)
        over = kw.pop("cfg", {})  # a variant's flags (the CFG-free student's --student_guidance 1)
        runs[key] = tuple(measure(policy, mode, step, b, {**cfgs[stage], **over, "batch_size": b}, ckpt, **kw)
                          for b in (1, 2))
        log(f"  measured {key} at batch 1 and 2 ({time.time() - t0:.0f} s)", flush=True)
    return policy, runs


def stage_rows(policy, runs, cfgs, batches=(1, 2, 4, 8), gpus=8):
    """The table's rows: dicts of (variant, short, stage, cfg, checkpointing, batch, units, cost), for
    OPD with 1, 2, 3 LoRA teachers or a full-weight teacher (each with a LoRA anchor), GRPO and
    SFT (with 2 LoRA teachers loaded, as sft_coldstart holds them). OPD's variants share the
    student's measurements and differ in their label forward (2 LoRA teachers: measured as 3,
    which at batch 1 and 2 route to the same 2); SFT's step is the student phase of GRPO's update
    (the same forward and backward; the tests check it). cfgs: stage_defaults()."""
    base, lora = weights_bytes(policy, vae=True), _nbytes(adapter_params(policy.transformer, "t0"))
    full = weights_bytes(policy, full_teacher="full") - weights_bytes(policy)
    rows = []
    for ckpt in (False, True):
        opd = runs["opd", ckpt]
        grpo = {"rollout": runs["rollout"], "decode": runs["decode"], "train": runs["train", ckpt]}
        variants = [("OPD, 1 LoRA teacher + LoRA anchor", "OPD 1 LoRA", "opd",
                     {"opd": with_labels(opd, runs["labels 1"])}, 2 * lora),
                    ("OPD, 2 LoRA teachers + LoRA anchor", "OPD 2 LoRA", "opd", {"opd": opd}, 3 * lora),
                    ("OPD, 2 LoRA + anchor, CFG-free student", "OPD CFG-free", "opd", {"opd": runs["opd free", ckpt]},
                     3 * lora),
                    ("OPD, 3 LoRA teachers + LoRA anchor", "OPD 3 LoRA", "opd", {"opd": opd}, 4 * lora),
                    ("OPD, full-weight teacher + LoRA anchor", "OPD full", "opd",
                     {"opd": with_labels(opd, runs["labels full"])}, full + lora),
                    ("GRPO: rollout, decode, update", "GRPO", "grpo", grpo, 0),
                    ("SFT, 2 LoRA teachers loaded", "SFT", "sft",
                     {"sft": only(runs["train", ckpt], ("student", "other"))}, 2 * lora)]
        for variant, short, stage, units, extra in variants:
            for b in batches:
                cost = stage_cost(stage, units, {**cfgs[stage], "batch_size": b}, b, base + extra,
                                  trainable_bytes(policy, ema=stage != "sft"), gpus, policy.latent_shape)
                rows.append(dict(variant=variant, short=short, stage=stage, cfg=cfgs[stage], ckpt=ckpt, batch=b,
                                 units=units, cost=cost))
    order = list(dict.fromkeys(r["variant"] for r in rows))
    return sorted(rows, key=lambda r: (order.index(r["variant"]), r["ckpt"], r["batch"]))


def must_divide(stage, cfg, gpus):
    """The number a stage's --batch_size must divide (None: any batch): OPD's images per rank, GRPO's
    images per rank and update (each update takes the same number of micro-batches)."""
    if stage == "sft":
        return None
    return images_per_step(stage, cfg, gpus) // (cfg.get("updates_per_step", 1) if stage == "grpo" else 1)


def fits_table(policy, rows, gpus=8, spare=SPARE):
    """{GPU: {short: [without, with checkpointing]}}, each a pair (the largest batch that fits, the
    largest that also divides what the stage requires it to; None where no rule)."""
    out = {gpu: {} for gpu in GPUS}
    for r in (r for r in rows if r["batch"] == 1):
        stage, cfg, weights, trainable = r["stage"], r["cfg"], r["cost"]["weights"], r["cost"]["trainable"]

        def cost_at(b):
            return stage_cost(stage, r["units"], {**cfg, "batch_size": b}, b, weights, trainable, gpus,
                              policy.latent_shape)
        rule = must_divide(stage, cfg, gpus)
        for gpu, gib in GPUS.items():
            pair = (largest_batch(cost_at, gib * GIB, spare),
                    largest_batch(cost_at, gib * GIB, spare, divides=rule) if rule else None)
            out[gpu].setdefault(r["short"], [None, None])[r["ckpt"]] = pair
    return out


def report(stages, models=MODELS, batches=(1, 2, 4, 8), gpus=8, log=print):
    """Print the table of docs/benchmarks.md: every stage of every model at every batch size, with
    and without gradient checkpointing, and the largest batch that fits each GPU size. stages:
    {stage: (DEFAULTS, its function)} (the module's docstring)."""
    cfgs = stage_defaults(stages)
    encoders, pickscore = text_encoder_params() * 2, pickscore_params() * 4
    log(f"units: GiB (2^30 bytes); TFLOP per trained image; seconds per optimizer step and GPU with {gpus} GPUs "
        f"(GRPO: per iteration of rollouts, which makes {cfgs['grpo']['updates_per_step']} updates; SFT: per batch) on "
        f"an H100 at {MFU:.0%} of its {H100_BF16 / 1e12:.0f} TFLOP/s dense bf16 peak (MFU assumed, not measured)")
    log(f"per GPU and step: OPD {images_per_step('opd', cfgs['opd'], gpus)} images ({cfgs['opd']['prompts_per_step']} "
        f"prompts x {cfgs['opd']['group_size']} / {gpus}), GRPO {images_per_step('grpo', cfgs['grpo'], gpus)} "
        f"({cfgs['grpo']['prompts_per_step']} x {cfgs['grpo']['group_size']} / {gpus}); both train "
        f"{passes('opd', cfgs['opd'])} of {cfgs['opd']['num_steps']} SDE steps; every forward has CFG (guidance "
        f"{cfgs['opd']['guidance']}: 2 rows an image); the anchor labels 1 image in {cfgs['opd']['mar_every']}")
    log(f"not in the table: the text encoders when the prompts overflow the embedding cache and they stay on the "
        f"device, +{encoders / GIB:.1f} GiB (CLIP-L, CLIP-G, T5-XXL in bf16); PickScore as a reward (or an eval "
        f"task), +{pickscore / GIB:.1f} GiB (CLIP-H in fp32, as rewards.py loads it); OCR runs on the CPU")
    for name, config in models.items():
        log(f"\n[estimate] {name}, 512 px: measuring on fake tensors", flush=True)
        policy, runs = measure_model(config, stages, log=log)
        tr = policy.transformer
        n_base = sum(p.numel() for n, p in tr.named_parameters() if ".lora_" not in n)
        log(f"{name}: transformer {n_base / 1e9:.2f} B parameters, {weights_bytes(policy) / GIB:.2f} GiB in bf16 "
            f"with its buffers; VAE {(weights_bytes(policy, vae=True) - weights_bytes(policy)) / GIB:.2f} GiB; a LoRA "
            f"of r=32 {_nbytes(adapter_params(tr, 't0')) / 2**20:.0f} MiB in bf16; the student's trainable state "
            f"{trainable_bytes(policy) / GIB:.2f} GiB (fp32 weights, gradients, AdamW's two moments, EMA; SFT has "
            f"no EMA)")
        matrices = max(m["attention_matrices"] for run in runs.values() for m in run)
        attention = f"{matrices} MATH-KERNEL matrices" if matrices else "the fused kernel, no tokens x tokens matrix"
        log(f"attention: {attention}; activations: measured at batch 1 and 2, extrapolated on a line (each phase "
            f"on its own)")
        log(f"{'stage':<40}{'batch':>5}{'ckpt':>5}{'weights':>8}{'train.':>7}{'activ.':>8}{'peak':>7}"
            f"{'TFLOP/img':>10}{'s/step':>8}")
        rows = stage_rows(policy, runs, cfgs, batches, gpus)
        for r in rows:
            c = r["cost"]
            log(f"{r['variant']:<40}{r['batch']:>5}{'yes' if r['ckpt'] else 'no':>5}{c['weights'] / GIB:>8.2f}"
                f"{c['trainable'] / GIB:>7.2f}{c['activations'] / GIB:>8.2f}{c['peak'] / GIB:>7.2f}"
                f"{c['flops_per_image'] / 1e12:>10.1f}{c['seconds']:>8.2f}")
        table = fits_table(policy, rows, gpus)
        shorts = list(next(iter(table.values())))
        log(f"largest --batch_size with {SPARE:.0%} of the memory to spare, without / with gradient checkpointing "
            f"[largest that divides the images per GPU, which OPD and GRPO require, where it differs]:")
        log(f"{'GPU (GiB)':<16}" + "".join(f"{s:>17}" for s in shorts))
        for gpu, cells in table.items():
            def cell(pair):
                best, even = pair
                return f"{best}" + (f"[{even}]" if even is not None and even != best else "")
            log(f"{gpu + f' ({GPUS[gpu]:.1f})':<16}" + "".join(f"{cell(c[0]) + ' / ' + cell(c[1]):>17}"
                                                                for c in cells.values()))


# -----------------------------------------------------------------------------
# the check: the estimate against real CPU tensors, on pipelines small enough to run

def storage_bytes(modules):
    """Bytes of the distinct storages behind the parameters and buffers of these modules."""
    seen = {}
    for t in [t for m in modules for t in [*m.parameters(), *m.buffers()]]:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def validate(model, stages, batch=2, resolution=None, t5_tokens=1):
    """Each unit of each stage at `batch` on a small pipeline folder, estimated (fake tensors from
    its config) and measured (the same step on the real pipeline, loaded as the stages load it,
    on the CPU): the activation peak the estimate gives, the same Counter on the real tensors,
    and the real run's heap growth (glibc; an independent measurement, which also sees what
    kernels and autograd allocate for themselves). Returns [(unit, checkpointing, estimate,
    counted, heap)] and the weights (estimated, measured). stages: {stage: (DEFAULTS, its function)}."""
    cfgs = stage_defaults(stages)
    real = real_policy(model, resolution=resolution, t5_tokens=t5_tokens, rank=8, alpha=16, teachers=TEACHERS[:2],
                       anchor="anchor")
    vae = real.pipe.vae
    fake, mode = fake_policy(real.transformer.config, vae.config if vae is not None else None, real.resolution,
                             t5_tokens, real.pipe.tokenizer_max_length, 8, 16, TEACHERS[:2], "anchor")
    weights = (weights_bytes(fake, TEACHERS[:2], "anchor", vae=True) + trainable_bytes(fake) // 5,
               storage_bytes([real.transformer, *([vae] if vae is not None else [])]))
    opd = dict(distill=stages["opd"][1], teachers=TEACHERS[:2], anchor="anchor")
    train, sft = dict(step_loss=stages["grpo"][1]), dict(loss=stages["sft"][1])
    units = [("opd", opd_step, "opd", False, opd), ("opd", opd_step, "opd", True, opd),
             ("rollout", rollout_step, "grpo", False, {}), ("decode", decode_step, "grpo", False, {}),
             ("train", grpo_train_step, "grpo", False, train), ("train", grpo_train_step, "grpo", True, train),
             ("sft", sft_step, "sft", False, sft), ("sft", sft_step, "sft", True, sft)]
    rows = []
    for name, step, stage, ckpt, kw in units:
        if name == "decode" and vae is None:
            continue
        est = measure(fake, mode, step, batch, cfgs[stage], ckpt, **kw)
        got = measure(real, None, step, batch, cfgs[stage], ckpt, heap=heap_meter(), **kw)
        rows.append((name, ckpt, max(est["peak"].values()), max(got["peak"].values()), got["heap"]))
    return rows, weights


def validation_report(models, stages, batches=(2, 4), log=print):
    """Print validate()'s comparison for each {name: (folder, t5_tokens)} at two batch sizes: the
    estimated activation peak against the Counter on the real run and against the real run's heap
    growth, with the estimate's error at each batch and per image (the slope between the two
    batches), and the heap bytes beyond the estimate that do not grow with the batch (autograd's
    graph, Python objects: not tensors). stages: as validate's. Returns the per-image errors."""
    (b1, b2), errors = batches, []
    for name, (folder, t5) in models.items():
        (rows1, weights), (rows2, _) = (validate(folder, stages, b, t5_tokens=t5) for b in batches)
        log(f"{name}: weights estimated {weights[0]:,} bytes, loaded {weights[1]:,}; activation peaks in kB: "
            f"estimated / counted on the real tensors / the real run's heap growth (error of the estimate)")
        for (unit, ckpt, e1, c1, h1), (_, _, e2, c2, h2) in zip(rows1, rows2):
            per_image = (e2 - e1) / (h2 - h1) - 1
            gap_per_image = ((h2 - e2) - (h1 - e1)) / (b2 - b1)
            constant = (h1 - e1) - gap_per_image * b1
            errors.append(per_image)
            log(f"  {unit:<8}{'ckpt' if ckpt else '':<5}" + "  ".join(
                f"batch {b}: {e / 1e3:,.0f} / {c / 1e3:,.0f} / {h / 1e3:,.0f} ({(e - h) / h:+.1%})"
                for b, e, c, h in ((b1, e1, c1, h1), (b2, e2, c2, h2)))
                + f"  per image {per_image:+.1%}; not estimated, at any batch: {constant / 1e3:,.0f} kB")
    return errors


# -----------------------------------------------------------------------------
# at a stage's start-up: will this run fit?

def _is_full(path, cfg):
    """Whether a teacher (or anchor) is a full-weight model held as its own copy (not a LoRA)."""
    from lora import is_full_weights
    try:
        return not cfg.get("teacher_rank") and is_full_weights(path)
    except Exception:  # a hub id or anything unreadable here: the stage reads it later, as a LoRA if it can
        return False


def _clip_tokens(model):
    """The CLIP tokenizer's length, which the text sequence has before the T5 tokens (SD3: 77)."""
    import json
    from pathlib import Path
    path = Path(str(model)) / "tokenizer" / "tokenizer_config.json"
    return json.loads(path.read_text()).get("model_max_length", 77) if path.exists() else 77


_RUNS = {}  # (stage, settings) -> what estimate_run measured: a process measures a setting once


def estimate_run(stage, cfg, model, step, world=1, encoders_on_device=False):
    """(cost_at, must_divide's number) for a run: cost_at(batch) is stage_cost's dict at that
    batch size for the stage, cfg, model and step (the stage's function) startup_check describes;
    the units are measured at batch 1 and 2 on fake tensors from the model's config.json files."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    import common
    from sde_sampler import BASE
    config = SD3Transformer2DModel.load_config(model, subfolder="transformer")
    try:
        vae_config = AutoencoderKL.load_config(model, subfolder="vae")
    except Exception:  # a pixel-space model (the tiny world's) has none
        vae_config = None
    teachers = list(common.parse_teachers(cfg.get("teachers", [])).values()) if stage != "grpo" else []
    full = [p for p in teachers if p != BASE and _is_full(p, cfg)]
    loras = tuple(f"t{i}" for i in range(len([p for p in teachers if p != BASE and p not in full])))
    anchor = None
    if stage == "opd" and cfg.get("anchor"):
        anchor = "full" if _is_full(cfg["anchor"], cfg) else "anchor"
    ckpt = bool(cfg.get("gradient_checkpointing"))
    key = (repr((stage, str(model), sorted((k, v) for k, v in cfg.items() if k != "batch_size"), encoders_on_device)),
           step)
    if key not in _RUNS:
        policy, mode = fake_policy(config, vae_config, cfg["resolution"], cfg["t5_tokens"], _clip_tokens(model),
                                   cfg["lora_rank"], cfg["lora_alpha"], loras, anchor if anchor == "anchor" else None,
                                   "full" if full or anchor == "full" else None)
        units = {"opd": [("opd", opd_step, dict(distill=step, teachers=loras + ((BASE,) if BASE in teachers else ()),
                                                anchor=anchor, full_teacher="full" if full else None))],
                 "grpo": [("rollout", rollout_step, {}), ("decode", decode_step, {}),
                          ("train", grpo_train_step, dict(step_loss=step))],
                 "sft": [("sft", sft_step, dict(loss=step))]}[stage]
        runs = {name: tuple(measure(policy, mode, step, b, {**cfg, "batch_size": b}, ckpt, **kw) for b in (1, 2))
                for name, step, kw in units if not (name == "decode" and vae_config is None)}
        weights = weights_bytes(policy, loras, anchor if anchor == "anchor" else None, vae=True)
        if policy.full:  # one copy measured; each full-weight teacher (or anchor) is one on the device
            weights += (len(full) + (anchor == "full")) * (weights_bytes(policy, full_teacher="full")
                                                           - weights_bytes(policy))
        rewards = ",".join(str(cfg.get(k, "")) for k in ("reward", "tasks", "shared_reward", "eval_tasks"))
        if "pickscore" in rewards:
            weights += pickscore_params() * 4
        if encoders_on_device:
            weights += text_encoder_params() * 2
        _RUNS[key] = (runs, weights, trainable_bytes(policy, ema=stage != "sft"), policy.latent_shape)
    runs, weights, trainable, latent_shape = _RUNS[key]

    def cost_at(b):
        return stage_cost(stage, runs, {**cfg, "batch_size": b}, b, weights, trainable, world, latent_shape)
    return cost_at, must_divide(stage, cfg, world)


def check_device(stage, cfg, device, step, world=1):
    """A training stage's start-up check on CUDA, before any weight moves there: startup_check
    at the stage's settings against the GPU's free memory (rank 0 prints). Elsewhere nothing."""
    if device.type == "cuda":
        import torch.distributed as dist
        quiet = dist.is_initialized() and dist.get_rank() != 0
        startup_check(stage, cfg, cfg["model"], torch.cuda.mem_get_info(device)[0], step, world,
                      log=(lambda *a, **k: None) if quiet else print)


def startup_check(stage, cfg, model, free_bytes, step, world=1, encoders_on_device=False, spare=SPARE, log=print):
    """Estimate a training step's peak accelerator memory at the run's settings before loading
    anything, print one line, and stop a run that would not fit.

        estimate.startup_check("opd", cfg, cfg["model"], torch.cuda.mem_get_info()[0], distill_micro_batch, world)

    stage: "opd", "grpo" or "sft". cfg: the stage's config (DEFAULTS after presets and flags); read:
    batch_size, resolution, t5_tokens, guidance, lora_rank, lora_alpha, gradient_checkpointing (False
    if absent), prompts_per_step and group_size (OPD, GRPO), num_steps, timestep_fraction,
    noise_level, teachers (OPD, SFT: TASK=PATH; a full-weight one counts as its own copy unless
    teacher_rank > 0, a LoRA one as a LoRA of the student's rank), anchor, mar_every, beta_mar and
    the pathwise loss's keys (OPD), beta and the PPO keys (GRPO); reward, tasks, shared_reward and
    eval_tasks: PickScore, if named, is counted (it loads onto the device, in fp32).
    model: a pipeline folder or hub id; only its transformer's and VAE's config.json are read.
    free_bytes: the device's free memory now. step: the stage's own function, which the estimate
    runs (opd: opd_distill.distill_micro_batch; grpo: teacher_grpo.step_loss; sft:
    sft_coldstart.flow_matching_loss): this module imports no stage. world: the number of ranks
    (OPD and GRPO need a batch size that divides the images per rank). encoders_on_device: count
    the text encoders (they stay on the device when the prompts overflow the embedding cache:
    cache_prompts).
    spare: the fraction of free_bytes to leave free (the allocator's rounding and fragmentation,
    what the estimate leaves out).

    Prints "estimated peak X GiB (weights A, trainable B, activations C) of Y GiB free" and returns
    stage_cost's dict for the run, plus "largest_batch" (0: not even 1 fits); or None, with a note,
    when the model's config cannot be read or the estimate itself fails (one line, "note: no memory
    estimate (...)": an estimate is no reason to stop a run). Raises SystemExit with one line naming
    the largest --batch_size that fits, or, if not even 1 does, suggesting --gradient_checkpointing
    true.
    Costs a fake-tensor step at batch 1 and 2: about 20-60 s on one core for SD3.5-Medium (once
    per setting and process)."""
    try:
        cost_at, rule = estimate_run(stage, cfg, model, step, world, encoders_on_device)
        cost = cost_at(cfg["batch_size"])
        cost["largest_batch"] = largest_batch(cost_at, free_bytes, spare, divides=rule)
    except OSError as e:  # no config.json to be had (offline, gated): the stage says more when it loads
        log(f"note: no memory estimate: cannot read the configs of {model!r} ({type(e).__name__})")
        return None
    except Exception as e:  # the estimator's own failure (a model or torch it does not know): the run goes on
        log(f"note: no memory estimate ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
        return None
    ckpt = bool(cfg.get("gradient_checkpointing"))
    log(f"estimated peak {cost['peak'] / GIB:.1f} GiB (weights {cost['weights'] / GIB:.1f}, trainable "
        f"{cost['trainable'] / GIB:.2f}, activations {cost['activations'] / GIB:.1f}) of {free_bytes / GIB:.1f} GiB "
        f"free (--batch_size {cfg['batch_size']}, {cfg['resolution']} px, gradient checkpointing "
        f"{'on' if ckpt else 'off'})")
    if cost["peak"] <= (1 - spare) * free_bytes:
        return cost
    need = (f"error: --batch_size {cfg['batch_size']} needs ~{cost['peak'] / GIB:.1f} GiB of the "
            f"{free_bytes / GIB:.1f} GiB free")
    if cost["largest_batch"]:
        raise SystemExit(f"{need}; the largest --batch_size that fits with {spare:.0%} to spare is "
                         f"{cost['largest_batch']}" + ("" if ckpt else " (larger with --gradient_checkpointing true)"))
    if not ckpt:
        raise SystemExit(f"{need}, and not even --batch_size 1 fits with {spare:.0%} to spare; "
                         f"try --gradient_checkpointing true")
    raise SystemExit(f"{need}, and not even --batch_size 1 with gradient checkpointing fits with {spare:.0%} to "
                     f"spare: a larger GPU, a lower --resolution, or fewer full-weight teachers (--teacher_rank)")
