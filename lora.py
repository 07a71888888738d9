"""
LoRA adapters on the one shared base: the student (trainable), the teachers and the anchor
(frozen) are named peft adapters of one transformer, so a teacher costs its own LoRA, not a copy
of the model. Adding, saving (a folder diffusers and peft both load), reading any published form
(our folders, peft folders, .safetensors/.pt state dicts, hub ids), checking every layer against
the base before loading, and loading.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch


# Flow-GRPO's LoRA targets on SD3: the joint attention's image and text projections.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
LORA_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def lora_config(rank=32, alpha=64, targets=LORA_TARGETS, init="gaussian"):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)


def _add_adapter(transformer, config, name):
    with warnings.catch_warnings():
        # several named adapters on one base is the point here, not an accident to flag
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=name)


def add_student(policy, rank=32, alpha=64, targets=LORA_TARGETS, name="student", init=None):
    """Add the trainable adapter (optionally initialised from any teacher form) and make it active.
    Its weights are kept in float32 even when the base runs in bf16."""
    if init is not None:
        load_adapter(policy, init, name, trainable=True)
    else:
        _add_adapter(policy.transformer, lora_config(rank, alpha, targets), name)
    policy.student = name
    policy.transformer.set_adapter(name)
    params = [p for n, p in policy.transformer.named_parameters() if f".{name}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_state_dict(policy, name):
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(policy.transformer, adapter_name=name)


def save_lora(state, lora_cfg, folder, extra_files=None, extra_state=None):
    """Write a LoRA state dict (peft naming, keys relative to the transformer) as a folder that
    StableDiffusion3Pipeline.load_lora_weights and peft's PeftModel.from_pretrained both load
    unchanged, atomically: into a temporary
    name, then renamed. The state goes in directly: convert_state_dict_to_diffusers drops SD3
    keys. lora_cfg (LoraConfig.to_dict()) becomes the metadata that carries lora_alpha; without
    it diffusers reads alpha as r. extra_files = {filename: json-able dict}; extra_state =
    {filename: object for torch.save} (optimizer, EMA, step)."""
    from diffusers import StableDiffusion3Pipeline
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    lora_cfg = dict(lora_cfg)
    if lora_cfg.get("target_modules"):
        lora_cfg["target_modules"] = sorted(lora_cfg["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=lora_cfg)
    # the same adapter in peft's own layout too, so that PeftModel.from_pretrained(transformer, folder)
    # loads it, the way Flow-GRPO and the authors' Flow-OPD code load teachers and anchors
    from peft import LoraConfig
    from safetensors.torch import save_file
    fields = {k: v for k, v in lora_cfg.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
    LoraConfig(**fields).save_pretrained(tmp)
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, tmp / "adapter_model.safetensors")
    for fname, obj in (extra_files or {}).items():
        (tmp / fname).write_text(json.dumps(obj, indent=2, default=str))
    for fname, obj in (extra_state or {}).items():
        torch.save(obj, tmp / fname)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_adapter(policy, name, folder, extra_files=None, extra_state=None):
    """save_lora of a live adapter of the policy."""
    return save_lora(adapter_state_dict(policy, name), policy.transformer.peft_config[name].to_dict(), folder,
                     extra_files, extra_state)


def _strip(key):
    for prefix in ("base_model.model.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _read_state_file(path):
    """A LoRA state dict from .safetensors or .pt (weights_only), plus safetensors metadata."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable tensor dict ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of LoRA tensors, found {type(obj).__name__}")
    return obj, {}


def _diffusers_meta(raw):
    """diffusers stores the LoraConfig flat, as "transformer.<field>" keys, in the file's metadata."""
    meta = json.loads(raw.get("lora_adapter_metadata", "{}"))
    return {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")}


def read_lora(source):
    """Read a LoRA in any accepted form into (state_dict keyed by transformer module paths,
    LoraConfig kwargs). Forms: our/diffusers folder (pytorch_lora_weights.safetensors + metadata),
    a peft folder (adapter_config.json + adapter_model.safetensors, as Flow-GRPO saves), a
    .safetensors/.pt state-dict file, or a hub repo id of either folder."""
    src = str(source)
    path = Path(src)
    if not path.exists():
        # owner/name is a hub id even with dots in the name (jieliu/SD3.5M-FlowGRPO-Text); a missing
        # local file keeps its extension and gets the plain not-found error
        if src.count("/") == 1 and not src.startswith((".", "/", "~")) and path.suffix not in LORA_FILE_SUFFIXES:
            from huggingface_hub import snapshot_download
            try:
                path = Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors"]))
            except Exception as e:
                raise FileNotFoundError(f"{src}: not a local path and not downloadable from the hub ({type(e).__name__})") from None
        else:
            raise FileNotFoundError(f"{src}: LoRA checkpoint not found")
    meta = {}
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            files = sorted(path.glob("adapter_model.*"))
            if not files:
                raise FileNotFoundError(f"{src}: peft folder without adapter_model.safetensors/.bin")
            state, _ = _read_state_file(files[0])
            meta = json.loads((path / "adapter_config.json").read_text())
        elif (path / "pytorch_lora_weights.safetensors").exists():
            state, raw = _read_state_file(path / "pytorch_lora_weights.safetensors")
            meta = _diffusers_meta(raw)
        else:
            raise FileNotFoundError(f"{src}: folder holds neither pytorch_lora_weights.safetensors nor adapter_config.json")
    else:
        state, raw = _read_state_file(path)
        meta = _diffusers_meta(raw)
    if any(k.startswith(("text_encoder", "te_")) for k in state):
        warnings.warn(f"{src}: text-encoder LoRA weights are ignored; only the transformer is adapted")
    state = {_strip(k).replace(".default.", "."): v for k, v in state.items()
             if not k.startswith(("text_encoder", "te_"))}
    a_keys = [k for k in state if k.endswith("lora_A.weight")]
    if not a_keys or any(not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in state):
        bad = next((k for k in state if not k.endswith(("lora_A.weight", "lora_B.weight"))), "no lora_A keys")
        if state and all(not k.endswith(("lora_A.weight", "lora_B.weight")) for k in state):
            raise ValueError(f"{src}: holds full transformer weights, not a LoRA; opd_distill.py and sft_coldstart.py "
                             "take it as a teacher and eval.py as a --ckpt (its own copy; opd_distill's --teacher_rank R "
                             "makes it a LoRA of its delta), but a merge or an --init needs LoRAs")
        raise ValueError(f"{src}: not a LoRA state dict in peft/diffusers naming (key {bad!r})")
    modules = sorted(k[: -len(".lora_A.weight")] for k in a_keys)
    ranks = {state[m + ".lora_A.weight"].shape[0] for m in modules}
    rank = int(meta.get("r", max(ranks)))
    alpha = meta.get("lora_alpha")
    if alpha is None:
        warnings.warn(f"{src}: no lora_alpha stored; assuming alpha = r = {rank}")
        alpha = rank
    rank_pattern = {m: state[m + ".lora_A.weight"].shape[0] for m in modules
                    if state[m + ".lora_A.weight"].shape[0] != rank}
    kwargs = dict(r=rank, lora_alpha=alpha, target_modules=modules, rank_pattern=rank_pattern,
                  alpha_pattern=dict(meta.get("alpha_pattern") or {}), use_rslora=bool(meta.get("use_rslora")))
    if meta.get("use_dora"):
        raise ValueError(f"{src}: DoRA adapters are not supported")
    return state, kwargs


def check_lora_fits(transformer, state, source):
    """Every LoRA layer must name a Linear of the base with matching in/out features."""
    mods = dict(transformer.named_modules())
    for key, w in state.items():
        mname = key.rsplit(".lora_", 1)[0]
        m = mods.get(mname)
        m = getattr(m, "base_layer", m)
        if not isinstance(m, torch.nn.Linear):
            raise ValueError(f"{source}: layer {mname} is not a linear layer of this base model")
        want = (w.shape[0], m.in_features) if key.endswith("lora_A.weight") else (m.out_features, w.shape[1])
        if tuple(w.shape) != want:
            raise ValueError(f"{source}: layer {mname} has LoRA shape {tuple(w.shape)}, base expects {want}"
                             " (a LoRA for a different architecture?)")


def load_adapter(policy, source, name, trainable=False, lora=None):
    """Load a LoRA in any accepted form as a named adapter on the shared base (frozen unless
    trainable); or lora=(state, kwargs) as read_lora returns them. Validates every layer against
    the base before touching it."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    state, kwargs = lora or read_lora(source)
    tr = policy.transformer
    check_lora_fits(tr, state, source)
    if name in (getattr(tr, "peft_config", None) or {}):
        raise ValueError(f"{source}: an adapter named {name!r} is already loaded")
    _add_adapter(tr, LoraConfig(**kwargs), name)
    result = set_peft_model_state_dict(tr, state, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{source}: keys not matched by the adapter: {missing[:3]}")
    for n, p in tr.named_parameters():
        if f".{name}." in n:
            p.data = p.data.float() if trainable else p.data.to(policy.dtype)
            p.requires_grad_(trainable)
    if policy.student is not None and not trainable:
        tr.set_adapter(policy.student)
    return name


# -----------------------------------------------------------------------------
# full-weight teachers (a fully fine-tuned transformer): its own frozen copy, or a LoRA of its delta

def read_full_weights(source):
    """A full transformer state dict from a .safetensors/.pt file or a diffusers transformer
    folder (diffusion_pytorch_model*.safetensors), keys without a "transformer." prefix; None
    when the source is a LoRA (any form read_lora takes)."""
    path = Path(str(source))
    if path.is_dir():
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            return None
        state = {}
        for f in files:
            state.update(_read_state_file(f)[0])
    elif path.is_file() and path.suffix in LORA_FILE_SUFFIXES:
        state = _read_state_file(path)[0]
    else:
        return None
    if any("lora_" in k for k in state):
        return None
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def is_full_weights(source):
    """Whether a source holds full transformer weights, read from the file headers alone where
    the format allows (safetensors), so a multi-GB checkpoint is not loaded to find out."""
    path = Path(str(source))
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file() or files[0].suffix not in LORA_FILE_SUFFIXES:
        return False
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(files[0]), framework="pt") as f:
                return not any("lora_" in k for k in f.keys())
        except Exception:
            return False  # unreadable: read_lora names the problem
    return read_full_weights(files[0]) is not None


def base_weights(transformer):
    """{state-dict key: tensor} of the base model itself, peft's wrapping and adapters removed."""
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}


def check_full_fits(transformer, state, source):
    """A full state dict must hold exactly the base's parameters with their shapes."""
    base = base_weights(transformer)
    for key, w in state.items():
        if key not in base:
            raise ValueError(f"{source}: key {key!r} is not in this base's transformer (another architecture?)")
        if tuple(w.shape) != tuple(base[key].shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(w.shape)}, the base {tuple(base[key].shape)} "
                             "(another architecture?)")
    missing = [k for k in base if k not in state]
    if missing:
        raise ValueError(f"{source}: {len(missing)} of the base's tensors missing, e.g. {missing[0]!r}")


def lora_of_delta(transformer, state, rank):
    """The LoRA closest to a full-weight teacher: for every Linear whose weight differs from the
    base, the best rank-r factors of the difference (truncated SVD: B = U_r sqrt(S_r), A =
    sqrt(S_r) V_r^T, so B A is the delta's best rank-r approximation; alpha = r, scale 1).
    Returns ((state, LoraConfig kwargs) for load_adapter, {layer: relative error |delta - BA| /
    |delta|}, {other changed tensor: its relative change}) - norms and biases a LoRA cannot carry."""
    base = base_weights(transformer)
    linears = {n for n, m in transformer.named_modules() if isinstance(getattr(m, "base_layer", m), torch.nn.Linear)
               and ".lora_" not in n and not n.endswith(".base_layer")}
    lora, errors, dropped = {}, {}, {}
    for key, w in state.items():
        delta = w.to(base[key].device).float() - base[key].float()  # the base may sit on the GPU
        if not delta.any():
            continue
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in linears:
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, S.numel())
            B, A = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
            lora[f"{layer}.lora_A.weight"], lora[f"{layer}.lora_B.weight"] = A.contiguous(), B.contiguous()
            errors[layer] = ((delta - B @ A).norm() / delta.norm()).item()
        else:
            dropped[key] = (delta.norm() / base[key].float().norm().clamp(min=1e-12)).item()
    if not lora:
        raise ValueError("the full-weight teacher's Linear weights equal the base's: nothing to distil")
    modules = sorted(k.removesuffix(".lora_A.weight") for k in lora if k.endswith("lora_A.weight"))
    ranks = {m: lora[m + ".lora_A.weight"].shape[0] for m in modules}
    kwargs = dict(r=rank, lora_alpha=rank, target_modules=modules, alpha_pattern={},
                  rank_pattern={m: r for m, r in ranks.items() if r != rank}, use_rslora=False)
    return (lora, kwargs), errors, dropped


def load_teacher(policy, source, name, rank=0):
    """A teacher (or anchor) in any form: a LoRA becomes an adapter on the shared base; full
    transformer weights become their own frozen copy of the transformer (policy.full[name];
    its memory is printed) or, with rank > 0, a rank-`rank` LoRA of their delta from the base
    (the relative error per layer is printed). Returns the name that routes to it."""
    state = read_full_weights(source)
    if state is None:
        return load_adapter(policy, source, name)
    tr = policy.transformer
    check_full_fits(tr, state, source)
    if rank > 0:
        lora, errors, dropped = lora_of_delta(tr, state, rank)
        worst = max(errors, key=errors.get)
        print(f"teacher {name}: full weights -> rank-{rank} LoRA of the delta on {len(errors)} layers; relative "
              f"error mean {sum(errors.values()) / len(errors):.3f}, worst {errors[worst]:.3f} ({worst})"
              + (f"; {len(dropped)} other changed tensors (norms, biases) dropped, largest relative change "
                 f"{max(dropped.values()):.2e} ({max(dropped, key=dropped.get)})" if dropped else ""))
        return load_adapter(policy, source, name, lora=lora)
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):  # no random init of weights that are about to be replaced (SD3.5-M: 2.2 B)
        copy = SD3Transformer2DModel.from_config(tr.config)
    copy.load_state_dict(state, assign=True)
    copy.to(policy.device, policy.dtype).requires_grad_(False).eval()
    policy.full[name] = copy
    size = sum(p.numel() * p.element_size() for p in copy.parameters())
    print(f"teacher {name}: full weights, its own frozen copy of the transformer: {size / 2**30:.2f} GiB in "
          f"{str(policy.dtype).removeprefix('torch.')} (--teacher_rank R makes it a LoRA of its delta instead)")
    return name
