"""
Score any set of checkpoints side by side on every task: a table, image grids, per-image details.

    python eval.py --preset tiny --ckpt base count=runs/count/final student=runs/opd/final --out runs/eval_tiny
    python eval.py --preset tiny --ckpt base opd=runs/opd/final --vs base        # the quickstart's gain, paired
    python eval.py --ckpt base --ckpt ocr=runs/ocr/final --ckpt student=runs/opd/final \\
        --tasks geneval,ocr,pickscore --out runs/eval                                      # SD3.5-Medium
    torchrun --nproc_per_node=8 eval.py --ckpt base ocr=jieliu/SD3.5M-FlowGRPO-Text --num_prompts 100 --out runs/eval
    python eval.py --ckpt base --tasks geneval,drawbench --prompts drawbench=drawbench.txt \
        --metrics imagereward,hps,aesthetic,clipscore,pickscore --images_per_prompt geneval=4   # quality metrics

--metrics score every image of every prompt set on the metric's published scale (ImageReward's
standardised reward, HPS v2.1, the LAION aesthetic score 1-10, CLIPScore, raw PickScore), over all
images and per prompt set; a --tasks NAME given --prompts NAME=FILE that is no reward (drawbench)
is a prompt set only the metrics score. A run's checkpoint is sampled at the guidance its
config.json records (a CFG-free student from opd_distill.py --student_guidance 1 at 1) unless
--guidance is given.

Every checkpoint is a LoRA adapter on ONE loaded base (`base` is the base itself, adapters
off); NAME=PATH names one, a bare PATH is named by its stem. Any form load_adapter accepts
works: our diffusers folders, peft folders, .safetensors/.pt state dicts, hub ids; and a fully
fine-tuned transformer's weights, sampled through a copy of its own (lora.load_teacher). All are
checked before any sampling, so a bad path stops the run at once, named.

Each task's prompts (its built-in test split, or --prompts TASK=FILE) are sampled with the ODE
(noise_level 0) from fixed per-prompt noise: the i-th prompt of a task starts from seed
`seed + i`, so every checkpoint sees the same noise and a --num_prompts run is a prefix of the
full one. With --images_per_prompt k (GenEval's protocol samples 4), its j-th image starts from
`seed + i + SEED_STRIDE * j`, so a run with more images per prompt extends one with fewer. A
task without prompts of its own (pickscore) scores the images of all other tasks.
Prompts are sharded over ranks and every forward pass has the same batch shape (the last batch
is padded), so an image does not depend on the number of ranks, bit for bit.

Images are cached as PNG in --cache_dir (default OUT/cache) under a hash of (checkpoint weights,
base model, prompt, seed, steps, guidance, resolution, dtype, device type): re-scoring with
another reward, adding a checkpoint, a task or more prompts regenerates nothing already there.

--vs NAME reports every other checkpoint's change against checkpoint NAME (a student against
its init), task by task, with the standard error of the per-prompt differences: both sampled
the same prompts from the same noise, so the noise they share cancels out of the difference,
and this error is what a gain is judged by (the tiny OPD student from the merge against it:
0.014-0.022 a task, where each score alone has 0.023-0.031).

Writes into --out: results.json {checkpoint: {task: {"mean", "se", "strict", "n"}}} ("strict"
where the reward has a pass/fail, for GenEval its official overall, the mean of the per-tag
pass rates, with "strict_pooled" the rate over all images; "tags", the same per prompt tag,
where a task's prompts have several, as GenEval's and the tiny count prompts do; "sets", the same
per prompt set, for a reward or metric that scores several sets' images; "failed", the
images the OCR engine failed on, scored 0; "vs" {"ckpt", "change", "se"} with --vs),
results.md (the tables), grid_<task>.png (rows = prompts, columns = checkpoints, each cell's
score in its corner), details.jsonl (one line per image and task: prompt, tag, seed, score and
what the reward read or detected) and config.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import common
import scoring
import tiny.world as tinyworld
from lora import is_full_weights, load_teacher, read_lora
from prompts import BUILTIN, TINY_TASKS, load_prompts
from rewards import REWARDS, get_reward, preload, set_device
from scoring import SEED_STRIDE
from sde_sampler import BASE, cache_prompts, load_policy, resolve_model

# -----------------------------------------------------------------------------
# defaults: SD3.5-Medium's eval settings (Flow-GRPO's); --preset tiny swaps in the tiny world
DEFAULTS = dict(
    model="",                        # hub id or pipeline folder; empty: SD3.5-Medium (or the preset's base)
    ckpt=["base"],                   # base | NAME=PATH | PATH (named by its stem), several allowed
    tasks="geneval,ocr,pickscore",   # each scored by its own reward; pickscore scores every other task's images;
                                     # a NAME with --prompts NAME=FILE and no reward of that name (drawbench) is
                                     # a prompt set that only the --metrics score
    metrics="",                      # scorers of every image, on their published scales, over all prompt sets
                                     # and per set: imagereward,hps,aesthetic,clipscore,pickscore (rewards.METRICS)
    prompts=[],                      # TASK=FILE: a prompt file (prompts.py formats) instead of the built-in set
    split="test",
    num_prompts=0,                   # prompts per task, the first N of the set; 0: all
    images_per_prompt="1",           # samples per prompt, each from its own noise: K for every task, or
                                     # TASK=K,... (the others 1); GenEval's protocol: geneval=4
    out="runs/eval",
    cache_dir="",                    # generated images, by content key; empty: OUT/cache
    resolution=512,
    t5_tokens=256,  # T5 tokens per prompt (max_sequence_length); the tiny base has no T5 and uses 1
    embed_cache_gb=4.0,              # host RAM for prompt embeddings per process (SD3.5-M: 2.6 MiB each)
    eval_steps=40,                   # ODE steps
    guidance=4.5,                    # CFG; a run's checkpoint is sampled at the guidance its config.json records
                                     # (a CFG-free student: 1) unless --guidance is given, which sets every one
    batch_size=8,                    # images per forward pass, per rank
    grid_prompts=6,                  # rows (prompts) in each task's grid
    seed=0,                          # the i-th prompt of every task starts from initial_noise seed + i
    vs="",                           # a checkpoint's name: every other one's change against it, with the
                                     # paired standard error (same prompts, same noise)
)
PRESETS = {
    "tiny": dict(resolution=tinyworld.SAMPLING["resolution"], t5_tokens=tinyworld.SAMPLING["t5_tokens"],
                 eval_steps=tinyworld.SAMPLING["eval_steps"],
                 guidance=tinyworld.SAMPLING["guidance"], tasks=",".join(tinyworld.TASKS), batch_size=tinyworld.EVAL_BATCH,
                 grid_prompts=8,
                 # one image for each of the 64 count prompts: the base's mean moved by 0.09
                 # between noise seeds, over half the +0.15 a teacher is asked to gain
                 images_per_prompt=4),
}
CACHE_VERSION = 1     # bump when the sampler's numerics change, to orphan the old cache
CELL_MIN = 256        # grid cells are scaled up (nearest) to at least this many pixels
GAP = 4               # grid: white space between checkpoint columns
# -----------------------------------------------------------------------------


def checkpoint_name(path):
    """The name a bare PATH goes by: its run's for a run's folders (runs/opd/final -> opd,
    runs/opd/checkpoint-000200 -> opd_200, so that a run's checkpoints sit side by side), else its stem."""
    p = Path(path.rstrip("/"))
    step = common.CKPT.match(p.name)
    if p.name == "final" or step:
        return p.parent.name + (f"_{int(step.group(1))}" if step else "")
    return p.stem


def parse_checkpoints(specs):
    """["base", "ocr=PATH", "runs/x/opd.pt"] -> {name: source}, BASE's source being None."""
    ckpts = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = (BASE, None) if spec == BASE else (checkpoint_name(spec), spec)
        if not name or (sep and not source):
            raise ValueError(f"bad --ckpt {spec!r}; use base, NAME=PATH or a PATH named after the checkpoint")
        if sep and name == BASE:
            raise ValueError(f"--ckpt {spec!r}: the name {BASE!r} is reserved for the model without adapters")
        if name in ckpts:
            raise ValueError(f"two checkpoints named {name!r}: {ckpts[name]} and {source}; name them NAME=PATH")
        ckpts[name] = source
    if not ckpts:
        raise ValueError("no checkpoint to evaluate; pass --ckpt base and/or NAME=PATH")
    return ckpts


def recorded_guidance(source):
    """The CFG a run's checkpoint was trained to sample at, from the config.json saved beside its
    weights: a student's --student_guidance (opd_distill.py; a CFG-free student's 1), else the
    run's --guidance; None for anything else (the base, hub ids, files)."""
    config = Path(source) / "config.json" if source else None
    if config is None or not config.is_file():
        return None
    run = json.loads(config.read_text())
    return run.get("student_guidance") or run.get("guidance")


def lora_fingerprint(source):
    """A hash of a LoRA's weights and config, whatever form it comes in (folder, file, hub id):
    the same adapter saved twice keys the same cached images, a retrained one does not."""
    state, kwargs = read_lora(source)
    h = hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode())
    for key in sorted(state):
        t = state[key].detach().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model):
    """A pipeline folder (or a full-weight checkpoint) by the names, sizes and mtimes of its
    files (hashing GBs of weights would cost more than it saves); a hub id by its name."""
    root = Path(model)
    if not root.exists():
        return str(model)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stats = [(str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def cache_key(model_id, ckpt_id, row, settings):
    blob = json.dumps([CACHE_VERSION, model_id, ckpt_id, row["prompt"], row["seed"], settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def parse_images_per_prompt(spec, tasks):
    """"4" -> {task: 4} for every task; "geneval=4" -> GenEval 4, the others 1; "2,geneval=4"."""
    default, per = 1, {}
    for item in filter(None, (x.strip() for x in str(spec).split(","))):
        name, sep, value = item.rpartition("=")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--images_per_prompt {item!r}: the number of images must be a whole number >= 1")
        if sep and name not in tasks:
            raise ValueError(f"--images_per_prompt {item!r}: {name!r} is not one of --tasks ({', '.join(tasks)})")
        per[name] = int(value) if sep else per.get(name, 0)
        default = default if sep else int(value)
    return {t: per.get(t) or default for t in tasks}


def eval_rows(tasks, split, num_prompts, files, seed, images_per_prompt=None, metrics=()):
    """The rows to sample, one per image (the tasks that have prompts, in order, each cut to
    num_prompts, with scoring.seeded_jobs' seeds: image j of the task's i-th prompt from seed + i +
    SEED_STRIDE * j; images_per_prompt: {task: images}, default 1) and, per reward and then per
    metric, the indices of the rows it scores: a reward its own task's rows (a reward without
    prompts, every row), a metric every row. A task that is only a prompt set (a file and no
    reward of its name) is sampled and scored by the metrics alone."""
    rows, plan, images_per_prompt = [], {}, images_per_prompt or {}
    own = [t for t in tasks if t in files or t in BUILTIN or t in TINY_TASKS]
    for task in own:
        prompts = load_prompts(task, split, files.get(task))
        prompts = prompts[:num_prompts] if num_prompts else prompts
        part = scoring.seeded_jobs(prompts, seed, images_per_prompt.get(task, 1))
        plan[task] = list(range(len(rows), len(rows) + len(part)))
        rows += part
    for task in tasks:
        if task not in plan:
            if not rows:
                raise ValueError(f"task {task!r} has no built-in prompts: pass --prompts {task}=FILE, or evaluate "
                                 "it together with a task that has prompts (it then scores their images)")
            plan[task] = list(range(len(rows)))
    scored = [t for t in tasks if t in REWARDS] + list(metrics)
    return rows, {t: plan.get(t, list(range(len(rows)))) for t in scored}


# -----------------------------------------------------------------------------
# outputs

def prompt_scores(records, rows):
    """{task: {(prompt's task, prompt index): mean score of its images}} from score_images'
    records: the unit that a paired change between two checkpoints is taken over."""
    return {task: scoring.prompt_means([{"row": (rows[r["job"]]["task"], rows[r["job"]]["row"]), "score": r["score"]}
                                        for r in records if r["task"] == task])
            for task in dict.fromkeys(r["task"] for r in records)}


def seed_groups(names):
    """{prefix: [names]} for checkpoints named PREFIX@sN (one run per seed), where a prefix has
    at least two of them."""
    groups = {}
    for name in names:
        prefix, sep, seed = name.rpartition("@s")
        if sep and prefix and seed.isdigit():
            groups.setdefault(prefix, []).append(name)
    return {p: n for p, n in groups.items() if len(n) > 1}


def guidance_text(by_ckpt):
    """"guidance 4.5", or "guidance 4.5 (opd_free 1)" where checkpoints sample at their own."""
    common_g = max(set(by_ckpt.values()), key=list(by_ckpt.values()).count)
    own = [f"{name} {g:g}" for name, g in by_ckpt.items() if g != common_g]
    return f"guidance {common_g:g}" + (f" ({', '.join(own)}: the guidance each run records)" if own else "")


def results_table(results, cfg, n_rows):
    """Markdown: one row per checkpoint, one column per task and the average of the task means.
    n_rows: {task: prompts}."""
    tasks = list(next(iter(results.values())))
    metrics = [m for m in cfg.get("metrics", "").split(",") if m in tasks]
    rewards = [t for t in tasks if t not in metrics] or tasks  # the average is over the rewards' [0, 1] scales
    per_task = cfg.get("images_by_task") or {t: int(cfg.get("images_per_prompt", 1)) for t in tasks}
    counts = sorted(set(per_task.values()))
    images = ("" if counts == [1] else f"; {counts[0]} images per prompt" if len(counts) == 1 else
              "; images per prompt " + ", ".join(f"{t} {k}" for t, k in per_task.items()))
    images += f", the j-th from seed + i + {SEED_STRIDE:,} j" if images else ""
    shown = {t: [f"{r[t]['mean']:.3f}" for r in results.values()] for t in tasks}
    best = {t: max(v, key=float) if len(set(v)) > 1 else None for t, v in shown.items()}
    model = cfg["model"]  # a folder under the working directory is shown relative: results.md gets shipped
    if Path(model).is_absolute() and Path(model).is_relative_to(Path.cwd()):
        model = str(Path(model).relative_to(Path.cwd()))
    lines = [f"# Eval: {model}", "",
             f"ODE, {cfg['eval_steps']} steps, {guidance_text(cfg.get('guidance_by_ckpt', {'': cfg['guidance']}))}, "
             f"{cfg['resolution']} px, "
             f"the i-th prompt of a task from seed {cfg['seed']} + i for every checkpoint{images}; {cfg['split']} prompts: "
             + ", ".join(f"{t} {n}" for t, n in n_rows.items()), "",
             "| checkpoint | " + " | ".join(tasks) + " | average |",
             "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
    for name, res in results.items():
        cells = []
        for t in tasks:
            cell = (f"{res[t]['mean']:.3f}" + (f" ±{res[t]['se']:.3f}" if "se" in res[t] else "")
                    + (f" ({res[t]['strict']:.3f})" if "strict" in res[t] else ""))
            cells.append(f"**{cell}**" if f"{res[t]['mean']:.3f}" == best[t] else cell)
        avg = sum(res[t]["mean"] for t in rewards) / len(rewards)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg:.3f} |")
    groups = seed_groups(results)
    if groups:
        lines += ["", "| over seeds | " + " | ".join(tasks) + " | average |",
                  "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
        for prefix, names in groups.items():
            runs = [{**{t: results[n][t]["mean"] for t in tasks},
                     "average": sum(results[n][t]["mean"] for t in rewards) / len(rewards)} for n in names]
            cells = [f"{sum(v) / len(v):.3f} [{min(v):.3f}-{max(v):.3f}]"
                     for v in ([r[k] for r in runs] for k in [*tasks, "average"])]
            lines.append(f"| {prefix} ({len(names)} seeds) | " + " | ".join(cells) + " |")
        lines += ["", "Over seeds: the checkpoints named PREFIX@sN, mean of their task means [min-max]."]
    vs = [(name, res) for name, res in results.items() if "vs" in res[tasks[0]]]
    if vs:
        ref = vs[0][1][tasks[0]]["vs"]["ckpt"]
        lines += ["", f"Change against `{ref}` on the same prompts and noise, ± its paired standard error over prompts "
                  "(bold: beyond two standard errors):", "",
                  "| checkpoint | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
        for name, res in vs:
            cells = [f"{c['change']:+.3f} ±{c['se']:.3f}" for c in (res[t]["vs"] for t in tasks)]
            cells = [f"**{cell}**" if abs(res[t]["vs"]["change"]) > 2 * res[t]["vs"]["se"] else cell
                     for t, cell in zip(tasks, cells)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for prefix, names in groups.items():
            if all("vs" in results[n][tasks[0]] for n in names):
                cells = [f"{sum(v) / len(v):+.3f} [{min(v):+.3f}, {max(v):+.3f}]"
                         for v in ([results[n][t]["vs"]["change"] for n in names] for t in tasks)]
                lines.append(f"| {prefix} ({len(names)} seeds), mean [min, max] | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: the task's mean reward (partial credit), ± its standard error over prompts (a "
              "prompt's images averaged first), with its strict pass rate in parentheses "
              "where the task has one (exact OCR match; for GenEval its overall score, the mean of its "
              "per-tag accuracies as GenEval's summary_scores.py reports it, per tag below); best mean in bold. "
              "pickscore is PickScore / 26. average: the mean of the task means"
              + (f" (not of the metrics, {', '.join(metrics)}: each on its published scale, over every image, "
                 "per prompt set below)" if metrics else "") + ".", ""]
    failed = [f"{name} {t} {res[t]['failed']}" for name, res in results.items() for t in tasks if res[t].get("failed")]
    if failed:
        lines += ["Images the OCR engine failed on, scored 0 (checkpoint, task, images): " + ", ".join(failed) + ".", ""]
    for t in tasks:
        tags = list(dict.fromkeys(tag for r in results.values() for tag in r[t].get("tags", {})))
        if not tags:
            continue
        n = {tag: next(r[t]["tags"][tag]["n"] for r in results.values() if tag in r[t].get("tags", {}))
                  // per_task.get(t, 1) for tag in tags}
        lines += [f"`{t}` per prompt tag (mean, strict pass rate in parentheses):", "",
                  "| checkpoint | " + " | ".join(f"{tag} ({n[tag]})" for tag in tags) + " |",
                  "| --- | " + " | ".join("---:" for _ in tags) + " |"]
        for name, res in results.items():
            cells = [(f"{c['mean']:.3f}" + (f" ({c['strict']:.3f})" if "strict" in c else "")) if c else ""
                     for c in (res[t].get("tags", {}).get(tag) for tag in tags)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for t in metrics:  # a metric per prompt set (the paper reads PickScore on its own prompts, DeQA on DrawBench)
        sets = list(dict.fromkeys(s for r in results.values() for s in r[t].get("sets", {})))
        if not sets:
            continue
        lines += [f"`{t}` per prompt set (mean ± standard error over prompts):", "",
                  "| checkpoint | " + " | ".join(sets) + " |", "| --- | " + " | ".join("---:" for _ in sets) + " |"]
        for name, res in results.items():
            cells = [f"{c['mean']:.3f} ±{c['se']:.3f}" if c else "" for c in (res[t]["sets"].get(s) for s in sets)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _json_default(o):
    return o.item() if hasattr(o, "item") else str(o)


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = common.parse_config(DEFAULTS, PRESETS, argv, description=__doc__.split("\n\n")[0])
    rank, world, device = common.setup_dist()
    master = rank == 0
    with common.startup_errors():
        tasks = list(dict.fromkeys(t.strip() for t in cfg["tasks"].split(",") if t.strip()))
        metrics = scoring.metric_names(cfg["metrics"])
        if not tasks:
            raise ValueError("--tasks is empty")
        for m in metrics:
            if m in tasks:
                raise ValueError(f"{m!r} is both a task and a metric: name it in --tasks (a reward, on its training "
                                 "scale) or in --metrics (on its published scale, per prompt set), not both")
        files = common.parse_prompt_files(cfg["prompts"], tasks)
        for t in tasks:
            if t not in files or t in REWARDS or not metrics:  # else a prompt set that only the metrics score
                get_reward(t)
        cfg["images_by_task"] = parse_images_per_prompt(cfg["images_per_prompt"], tasks)
        rows, plan = eval_rows(tasks, cfg["split"], cfg["num_prompts"], files, cfg["seed"], cfg["images_by_task"],
                               metrics)
        ckpts = parse_checkpoints(cfg["ckpt"])
        if cfg["vs"] and cfg["vs"] not in ckpts:
            raise ValueError(f"--vs {cfg['vs']!r} is not one of this eval's checkpoints ({', '.join(ckpts)})")
        fingerprints = {}
        for name, source in ckpts.items():
            try:
                fingerprints[name] = ("base" if source is None else "full:" + model_fingerprint(source)
                                      if is_full_weights(source) else lora_fingerprint(source))
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--ckpt {name}: {e.args[0] if e.args else e}") from None
            except Exception as e:  # a corrupt file surfaces as its reader's own error type
                raise ValueError(f"--ckpt {name}: {source}: unreadable ({type(e).__name__}: {e})") from None
        given = any(a == "--guidance" or a.startswith("--guidance=") for a in argv)
        cfg["guidance_by_ckpt"] = {name: cfg["guidance"] if given else recorded_guidance(source) or cfg["guidance"]
                                   for name, source in ckpts.items()}
        cfg["model"] = resolve_model(cfg["model"], cfg["preset"])
        preload(list(plan))  # the rewards' and metrics' hub models, now: offline or gated fails here, in one line
        if cfg["batch_size"] < 1 or cfg["grid_prompts"] < 0:
            raise ValueError("--batch_size must be at least 1 and --grid_prompts at least 0")
    out = Path(cfg["out"])
    cache = Path(cfg["cache_dir"] or out / "cache")
    cache.mkdir(parents=True, exist_ok=True)

    set_device(device)
    with common.startup_errors():  # a model the hub cannot give: one line
        policy = load_policy(cfg["model"], device=device, resolution=cfg["resolution"], t5_tokens=cfg["t5_tokens"],
                             cache_gb=cfg["embed_cache_gb"])
    adapters = {}
    with common.startup_errors():
        for k, (name, source) in enumerate(ckpts.items()):
            try:
                adapters[name] = BASE if source is None else load_teacher(policy, source, f"ckpt{k}")
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--ckpt {name}: {e.args[0] if e.args else e}") from None

    # every image's place in the cache; rank r samples rows r, r + world, ... of every checkpoint
    guidance = cfg["guidance_by_ckpt"]
    settings = dict(steps=cfg["eval_steps"], resolution=policy.resolution,
                    t5_tokens=policy.t5_tokens, dtype=str(policy.dtype), device=device.type)
    model_id = model_fingerprint(cfg["model"])
    paths = {name: [cache / f"{cache_key(model_id, fingerprints[name], r, {**settings, 'guidance': guidance[name]})}.png"
                    for r in rows] for name in ckpts}
    missing = sum(not p.exists() for ps in paths.values() for p in ps)
    if missing:  # every rank embeds all prompts in one call, so the text encoders see the same batches
        cache_prompts(policy, [r["prompt"] for r in rows])
    grid_rows = {t: idx[: cfg["grid_prompts"]] for t, idx in plan.items()}
    show = set(i for idx in grid_rows.values() for i in idx)
    scored = list(plan)  # the rewards, then the metrics
    sets = list(dict.fromkeys(r["task"] for r in rows))  # the prompt sets, each with its images per prompt
    n_prompts = {t: len({(rows[i]["task"], rows[i]["row"]) for i in plan[t]}) for t in scored}
    if master:
        out.mkdir(parents=True, exist_ok=True)
        cached = len(ckpts) * len(rows) - missing
        print(f"{len(ckpts)} checkpoint(s) [{', '.join(ckpts)}] x {len(rows)} images ("
              + ", ".join(f"{t} {sum(r['task'] == t for r in rows) // cfg['images_by_task'][t]} prompts x "
                          f"{cfg['images_by_task'][t]}" for t in sets) + ") = "
              f"{len(ckpts) * len(rows)} images, "
              f"{cached} already in {cache}; the rest in batches of {cfg['batch_size']} per rank over {world} "
              f"rank(s); {cfg['eval_steps']} ODE steps, {guidance_text(guidance)}, {policy.resolution} px")
        common.write_json(out / "config.json", {**cfg, "fingerprints": fingerprints, "model_fingerprint": model_id})

    results, details, grids, per_prompt = {}, [], {t: {} for t in scored}, {}
    for name, adapter in adapters.items():
        images, generated = scoring.sample_images(policy, rows, cfg["eval_steps"], guidance[name], cfg["batch_size"],
                                                 adapter, cache=paths[name], desc=name if master else None)
        records = scoring.score_images(rows, images, plan, cfg["batch_size"], metrics)
        shown = {i: images[i] for i in show if i in images}
        parts = common.all_gather_objects((records, shown, generated))
        if not master:
            continue
        records = sorted((r for p in parts for r in p[0]), key=lambda r: (scored.index(r["task"]), r["job"]))
        shown = {i: im for p in parts for i, im in p[1].items()}
        results[name] = scoring.summarise(records, rows)
        per_prompt[name] = prompt_scores(records, rows)
        by_key = {(r["task"], r["job"]): r["score"] for r in records}
        for t in scored:
            grids[t][name] = [(shown[i], by_key[(t, i)]) for i in grid_rows[t]]
        for r in records:
            row, info = rows[r["job"]], r["info"]
            d = {"checkpoint": name, "task": r["task"], "prompt": row["prompt"], "seed": row["seed"], "score": r["score"]}
            if row["task"] != r["task"]:
                d["prompt_task"] = row["task"]
            if (tag := (row.get("metadata") or {}).get("tag")) is not None:
                d["tag"] = tag
            if "strict" in info:
                d["strict"] = bool(info["strict"])
            d["info"] = {k: v for k, v in info.items() if k != "strict"}
            d["image"] = str(paths[name][r["job"]])
            details.append(d)
        n = sum(p[2] for p in parts)
        tqdm.write(f"{name}: generated {n} images, {len(rows) - n} from the cache; "
                   + ", ".join(f"{t} {s['mean']:.3f} +-{s['se']:.3f}" for t, s in results[name].items()))

    if master:
        if cfg["vs"]:  # the same prompts and noise: the noise the two share cancels out of the change
            ref = per_prompt[cfg["vs"]]
            for name in (n for n in results if n != cfg["vs"]):
                for t in scored:
                    change, se = scoring.paired_change(per_prompt[name][t], ref[t])
                    results[name][t]["vs"] = {"ckpt": cfg["vs"], "change": change, "se": se}
        common.write_json(out / "results.json", results)
        table = results_table(results, cfg, n_prompts)
        (out / "results.md").write_text(table)
        with open(out / "details.jsonl", "w") as f:
            for d in details:
                f.write(json.dumps(d, default=_json_default) + "\n")
        for t in scored:
            if grid_rows[t]:
                cells = [grids[t][name][r] for r in range(len(grid_rows[t])) for name in ckpts]
                scoring.image_grid([im for im, _ in cells], len(ckpts), [rows[i]["prompt"] for i in grid_rows[t]],
                                  header=list(ckpts), labels=[f"{s:.2f}" for _, s in cells], min_size=CELL_MIN,
                                  gap=GAP).save(out / f"grid_{t}.png")
        print(table)
        print(f"wrote {out / 'results.json'}, results.md, details.jsonl and grid_<task>.png")
    common.barrier()
    common.cleanup_dist()
    return results if master else None


if __name__ == "__main__":
    main(sys.argv[1:])
