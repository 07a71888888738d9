"""
What every stage script needs and none of them should hide: config parsing with presets,
torch.distributed setup, the EMA of the LoRA weights, atomic checkpoints with resume, a training
run's frame (the checks before anything loads, the student and its optimizer, fresh or resumed)
and metrics (metrics.jsonl, optionally W&B). Sampling and scoring test prompts is scoring.py.
"""

import argparse
import collections
import importlib.util
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# config: the defaults block of a script, then --preset, then explicit flags


def _boolean(text):
    """true/1/yes or false/0/no; anything else is argparse's one-line error naming the flag."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")
    return value


def _flag_type(default):
    if isinstance(default, bool):
        return _boolean
    if isinstance(default, (int, float)):
        return type(default)
    return str


@contextmanager
def startup_errors():
    """Bad input found while setting up (flags, prompt files, teachers) ends the run with one
    line naming the problem, before any compute is spent, instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError) as e:
        # an OSError's args are (errno, text): its str names the file too
        msg = str(e) if isinstance(e, OSError) else (e.args[0] if e.args else repr(e))
        raise SystemExit(f"error: {msg}") from None


def parse_config(defaults, presets, argv=None, description=None):
    """argparse from a dict of defaults. Precedence: explicit flag > --preset value > default.
    Lists take several values (--teachers a=X b=Y); booleans take true/false."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    for key, value in defaults.items():
        if key in ("preset", "resume"):
            continue
        if isinstance(value, list):
            parser.add_argument(f"--{key}", nargs="*", action="extend", default=None)
        else:
            parser.add_argument(f"--{key}", type=_flag_type(value), default=None)
    args = vars(parser.parse_args(argv))
    config = dict(defaults)
    if args["preset"]:
        config.update(presets[args["preset"]])
    config.update({k: v for k, v in args.items() if v is not None})
    config["resume"] = args["resume"]
    config["preset"] = args["preset"]
    if config.get("wandb") and importlib.util.find_spec("wandb") is None:
        parser.error("--wandb needs the wandb package: pip install wandb")
    return config


def parse_teachers(specs):
    """["ocr=PATH", "geneval.pt", ...] -> {task: path}. A bare path is named by its file or
    folder stem (ocr.pt -> ocr; runs/ocr/final -> ocr); a task named twice is an error."""
    teachers = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep:
            p = Path(spec.rstrip("/"))
            # runs/count/final and runs/count/checkpoint-000100 are named after their run
            named = p.parent if (p.name == "final" or CKPT.match(p.name)) else p
            task, path = named.stem, spec
        if not task or not path:
            raise ValueError(f"bad teacher {spec!r}; use TASK=PATH or a path named after its task")
        if task in teachers:
            raise ValueError(f"task {task!r} has two teachers: {teachers[task]} and {path}")
        teachers[task] = path
    return teachers


def parse_prompt_files(specs, tasks):
    """["ocr=FILE", ...] -> {task: FILE}, each task one of `tasks` (--prompts of eval and OPD)."""
    files = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep or not path or task not in tasks:
            raise ValueError(f"bad --prompts {spec!r}; use TASK=FILE with TASK one of {', '.join(tasks)}")
        files[task] = path
    return files


def stream_seed(purpose, seed, step=0, rank=0):
    """The seed of one random stream, a function of (purpose, seed, step, rank) alone, mixed by
    a cryptographic hash (blake2b). A linear formula such as seed * A + step * B + rank repeats
    itself: with B ranks or more, rank r + B at step s would draw what rank r draws at step s + 1.
    Hashed, 1,024 ranks x 200 steps x 3 seeds give 614,400 distinct streams per purpose (tested),
    and a purpose ("prompts", "noise", ...) never shares its stream with another."""
    digest = hashlib.blake2b(f"{purpose}/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch or numpy generator takes them


def sample_rows(rows, n, seed, step, rank, balance_tags=False):
    """n training rows for this step and rank, drawn with replacement from a generator seeded by
    (seed, step, rank): a resumed run redraws exactly what the uninterrupted one would have.
    balance_tags draws every task equally often, and within a task every metadata "tag",
    whatever their numbers of prompts."""
    g = torch.Generator().manual_seed(stream_seed("prompts", seed, step, rank))
    if not balance_tags:
        return [rows[i] for i in torch.randint(len(rows), (n,), generator=g).tolist()]
    keys = [(r.get("task"), r.get("metadata", {}).get("tag")) for r in rows]
    rows_per_tag = collections.Counter(keys)
    tags_per_task = collections.Counter(task for task, _ in rows_per_tag)
    weights = torch.tensor([1.0 / (rows_per_tag[k] * tags_per_task[k[0]]) for k in keys])
    return [rows[i] for i in torch.multinomial(weights, n, replacement=True, generator=g).tolist()]


def step_generator(device, seed, step, rank, purpose="noise"):
    """The noise of this step's rollouts (or another stream: purpose), a function of (seed, step,
    rank) alone."""
    return torch.Generator(device).manual_seed(stream_seed(purpose, seed, step, rank))


# -----------------------------------------------------------------------------
# distributed (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; gloo on CPU, nccl on GPU)

def setup_dist():
    """(rank, world_size, device). Plain `python` is a world of one."""
    if "RANK" not in os.environ:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            # otherwise set_device fails deep in CUDA with "invalid device ordinal"
            raise SystemExit(f"error: local rank {local} but only {torch.cuda.device_count()} GPU(s) on this node; "
                             f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def _comm(t):
    """Where a tensor must live for a collective: the GPU under nccl, the CPU under gloo."""
    return t.cuda() if dist.get_backend() == "nccl" else t.cpu()


def all_mean(x):
    """Mean of a tensor (or float) over ranks."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_initialized():
        t = _comm(t)
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.cpu()


def all_gather_objects(obj):
    """A list of every rank's obj (rank order); just [obj] without torch.distributed."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_grads(params):
    """Average the gradients over ranks once per optimizer step: one flat all-reduce. Doing it by
    hand instead of wrapping in DDP avoids DDP's per-forward buffer sync (SD3's positional
    embedding) and its hooks on the micro-steps (which would otherwise need no_sync)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _comm(torch.cat([g.reshape(-1) for g in grads]))
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).to(p.device).clone()
        i += g.numel()


def check_in_sync(params, when, frozen=()):
    """Every rank must hold the same weights: at the start (a rank that loaded another --init or
    teacher), after every checkpoint and at the end (a missed all-reduce, a rank-dependent
    branch), so that a divergence stops the run within save_every steps instead of showing up
    as bad results. params are compared exactly; the frozen modules (the base, the teachers) by
    one float64 sum per tensor, which is cheap and still tells a different file apart. Raises,
    naming `when`, if any rank differs from rank 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    sums = [t.detach().double().sum().float().reshape(1) for m in frozen for t in m.state_dict().values()]
    flat = _comm(torch.cat([p.detach().float().reshape(-1) for p in params] + sums))
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise RuntimeError(f"ranks hold different weights {when} (max |diff| {diff.item():.3e}): every rank must "
                           "start from the same files and apply the same updates")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# EMA of the trainable LoRA weights (Flow-GRPO evaluates and ships the EMA)

def ema_init(params):
    return [p.detach().float().clone() for p in params]


@torch.no_grad()
def ema_update(ema, params, decay):
    for e, p in zip(ema, params):
        e.lerp_(p.detach().float(), 1 - decay)


@contextmanager
def ema_weights(ema, params):
    """Temporarily put the EMA weights into the live parameters (for eval or saving)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


# -----------------------------------------------------------------------------
# checkpoints: out/checkpoint-000123/ (LoRA folder + training_state.pt), atomic, resumable

CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(out):
    """Completed checkpoints in out, oldest first (half-written .tmp folders don't match)."""
    out = Path(out)
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := CKPT.match(p.name))
             and (p / "training_state.pt").exists()]
    return [p for _, p in sorted(found)]


def prepare_out(out, resume):
    """Refuse to mix runs: an --out with checkpoints needs --resume. Returns the checkpoint to
    resume from (or None)."""
    out = Path(out)
    found = checkpoints(out)
    if found and not resume:
        raise SystemExit(f"error: {out} already holds checkpoints of another run ({found[-1].name});"
                         " pass --resume to continue it or choose another --out")
    if resume and not found:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    return found[-1] if (resume and found) else None


def save_checkpoint(policy, params, out, step, state, config, ema=None, keep=2):
    """Write out/checkpoint-{step}: the student's LoRA (a diffusers folder) as final/ would hold
    it at this step (the EMA, when the run keeps one), so eval.py on a checkpoint scores what
    final/ would have been, and a killed run leaves an EMA model; config.json; and
    training_state.pt with the live weights, the optimizer and the EMA, from which --resume
    continues. All under a temporary name first, so a crash never leaves a corrupt one. Older
    checkpoints beyond `keep` are deleted afterwards."""
    from lora import save_adapter
    folder = Path(out) / f"checkpoint-{step:06d}"
    state = {**state, "live": [p.detach().to("cpu", copy=True) for p in params]}  # copies: the EMA goes into params
    with ema_weights(ema, params) if ema is not None else nullcontext():
        save_adapter(policy, policy.student, folder, extra_files={"config.json": config},
                     extra_state={"training_state.pt": state})
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def save_final(policy, out, config):
    """out/final/: the student's LoRA (diffusers folder) with the run's config beside it."""
    from lora import save_adapter
    return save_adapter(policy, policy.student, Path(out) / "final", extra_files={"config.json": config})


def optimizer_update(params, optimizer, ema, config):
    """One optimizer update: average gradients over ranks, clip, step, EMA (if the run keeps
    one). Returns the gradient norm."""
    sync_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"]).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(ema, params, config["ema_decay"])
    return grad_norm


def after_step(policy, params, optimizer, ema, config, out, step):
    """The end of a training step: a checkpoint (rank 0) every save_every steps and at the last
    one, then every rank waits for the others. (The periodic eval is the stage's own call to
    scoring.eval_and_log, just before: scoring imports this module, not the other way round.)"""
    if step % config["save_every"] == 0 or step == config["max_steps"]:
        check_in_sync(params, f"at step {step}")
        if is_rank0():
            state = {"step": step, "optimizer": optimizer.state_dict()}
            if ema is not None:
                state["ema"] = [e.cpu() for e in ema]
            save_checkpoint(policy, params, out, step, state, config, ema)
    barrier()


def finish_run(policy, params, out, config, ema=None):
    """The end of a training run: check the ranks agree, then rank 0 writes out/final/ (with
    the EMA weights when there is an EMA, as Flow-GRPO ships them) and closes the W&B run."""
    global _wandb
    check_in_sync(params, "at the end")
    if is_rank0():
        if world() > 1:
            print(f"ranks in sync: {world()} ranks hold identical LoRA weights")
        with ema_weights(ema, params) if ema is not None else nullcontext():
            save_final(policy, out, config)
        print(f"done: {Path(out) / 'final'}")
        if _wandb is not None:
            _wandb.finish()
            _wandb = None
    barrier()
    cleanup_dist()


def load_training_state(folder, params):
    """A checkpoint's optimizer/EMA/step state, with its live weights put into params (the
    folder's LoRA, which add_student loaded, is the EMA). Rank 0 also cuts the run's
    metrics.jsonl back to the checkpoint's step: the steps logged after it (by a run that was
    killed) are about to be run, and logged, again."""
    state = torch.load(Path(folder) / "training_state.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        for p, live in zip(params, state.get("live", [])):  # older checkpoints held the live weights in the folder
            p.copy_(live)
    metrics = Path(folder).parent / "metrics.jsonl"
    if metrics.exists() and (not dist.is_initialized() or dist.get_rank() == 0):
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= state["step"]]
        if len(kept) < len(lines):
            tmp = metrics.with_name(metrics.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(metrics)
    return state


# -----------------------------------------------------------------------------
# a training run's frame, the same in OPD, GRPO and SFT: the batch arithmetic, what is checked
# before any weight loads, the student and its optimizer (fresh or resumed), the run's folder

def batch_plan(config, world):
    """(prompts per rank, images per rank, micro-batches per rank) of one step, or a one-line
    error where the prompts do not divide over the ranks or a rank's images into batches."""
    if config["prompts_per_step"] % world:
        raise ValueError(f"--prompts_per_step {config['prompts_per_step']} is not divisible by {world} ranks")
    prompts = config["prompts_per_step"] // world
    images = prompts * config["group_size"]
    if images % config["batch_size"]:
        raise ValueError(f"--batch_size {config['batch_size']} does not divide the {images} images per rank "
                         f"({prompts} prompts x group of {config['group_size']})")
    return prompts, images, images // config["batch_size"]


def prepare_run(config, rewards=()):
    """Before any weight loads: --out checked against another run's checkpoints (and the one
    --resume continues from found), the model resolved, and the hub models of `rewards` fetched
    (one line naming any that cannot be). Call it inside startup_errors(). Returns (out,
    checkpoint to resume or None)."""
    from rewards import preload
    from sde_sampler import resolve_model
    out = Path(config["out"])
    resume_from = prepare_out(out, config["resume"])
    config["model"] = resolve_model(config["model"], config["preset"])
    preload(list(rewards))
    return out, resume_from


def load_base(config, device):
    """The run's one base pipeline (teachers, anchor and student are adapters on it), loaded after
    the torch seed, so that every rank builds the same fresh LoRA; reward models go to `device`."""
    from rewards import set_device
    from sde_sampler import load_policy
    torch.manual_seed(config["seed"])
    set_device(device)
    return load_policy(config["model"], device=device, resolution=config["resolution"],
                       t5_tokens=config["t5_tokens"], cache_gb=config["embed_cache_gb"])


def start_training(policy, config, resume_from, init=None, keep_ema=True):
    """The student and its training state: a LoRA (`init`'s, or fresh at --lora_rank), gradient
    checkpointing if asked, AdamW and the EMA; resuming, all of them and the step from the
    checkpoint. The ranks are then checked to start alike (the student and every frozen model).
    Returns (params, optimizer, ema or None, step)."""
    from lora import add_student
    params = add_student(policy, rank=config["lora_rank"], alpha=config["lora_alpha"], init=resume_from or init)
    if config["gradient_checkpointing"]:
        policy.transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    ema = ema_init(params) if keep_ema else None
    step = 0
    if resume_from is not None:
        state = load_training_state(resume_from, params)
        optimizer.load_state_dict(state["optimizer"])
        ema = [e.to(params[0].device) for e in state["ema"]] if keep_ema else None
        step = state["step"]
        if is_rank0():
            print(f"resumed from {resume_from} at step {step}")
    check_in_sync(params, f"at the start (step {step})", frozen=[policy.transformer, *policy.full.values()])
    return params, optimizer, ema, step


def open_run(out, config, *lines):
    """Rank 0: the run's folder with its config.json, the W&B run if --wandb asked, and the run's
    start-up lines printed."""
    if is_rank0():
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "config.json", config)
        start_logging(out, config)
        print("\n".join(line for line in lines if line))


def log_step(out, record, bar, **shown):
    """Rank 0: the step's record into metrics.jsonl (and W&B), and the progress bar on, showing
    `shown` ({name: format}: the record's values)."""
    if is_rank0():
        log_metrics(out, record)
        bar.set_postfix({k: format(record[k], f) for k, f in shown.items()})
        bar.update(1)


_wandb = None  # the Weights & Biases run of this process, when --wandb asked for one


def start_logging(out, config):
    """With --wandb PROJECT, rank 0 also sends every metrics.jsonl record to a W&B run (wandb is
    imported only then; WANDB_MODE=offline writes it under OUT/wandb for a later `wandb sync`).
    The run's id is kept in OUT/wandb_id, so --resume continues the same W&B run (W&B drops
    steps it has already seen: those re-run after the checkpoint)."""
    global _wandb
    _wandb = None
    if not config.get("wandb") or (dist.is_initialized() and dist.get_rank() != 0):
        return
    import wandb
    id_file = Path(out) / "wandb_id"
    Path(out).mkdir(parents=True, exist_ok=True)
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(6))
    _wandb = wandb.init(project=config["wandb"], name=Path(out).name, dir=str(out), config=config,
                        id=id_file.read_text().strip(), resume="allow")


def _flat(record, prefix=""):
    """{"eval": {"count": {"mean": 0.4}}} -> {"eval/count/mean": 0.4}: W&B's chart names."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def log_metrics(out, record):
    """One JSON line per record in out/metrics.jsonl (rank 0 only calls this), and the same
    numbers to the W&B run if start_logging made one."""
    record = {"time": round(time.time(), 3), **record}
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    if _wandb is not None:
        _wandb.log({k: v for k, v in _flat(record).items() if k not in ("step", "time")}, step=record["step"])


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
