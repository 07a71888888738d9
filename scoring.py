"""
Sampling test prompts and scoring them, the one path for the periodic evals of every training
stage, eval.py and the tiny base's report: ODE samples from fixed per-image noise (image j of
prompt i from seed + i + SEED_STRIDE * j, in batches of a fixed shape), each task's reward,
sharded over ranks; summaries with standard errors; the paired change between two evals; and
the one image-grid painter.
"""

import json
import os
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from common import all_gather_objects, ema_weights, is_rank0, log_metrics, world, write_json

# -----------------------------------------------------------------------------
# images

GRID_HEADER, GRID_CAPTION = 16, 28  # px: the column names' strip, the two caption lines above a row


def image_grid(images, cols, captions=None, header=None, labels=None, min_size=0, gap=0):
    """Paste PIL images (row-major) into a grid of `cols` columns, each cell scaled up (nearest)
    to at least min_size px. Optional: captions, one per row, wrapped to two lines above it;
    header, one name per column; labels, one short text per image in its top-left corner."""
    w, h = images[0].size
    scale = max(1, -(-min_size // w))
    w, h = w * scale, h * scale
    rows = -(-len(images) // cols)
    top, cap = (GRID_HEADER if header else 0), (GRID_CAPTION if captions else 0)
    grid = Image.new("RGB", (cols * (w + gap) - gap, top + rows * (cap + h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, name in enumerate(header or []):
        draw.text((c * (w + gap) + 2, 2), name[: w // 6], fill="black", font=font)
    for r, caption in enumerate(captions or []):
        y = top + r * (cap + h)
        draw.line([(0, y), (grid.width, y)], fill="#bbb")
        text = "\n".join(textwrap.wrap(caption, max(8, grid.width // 6), max_lines=2, placeholder="..."))
        draw.multiline_text((3, y + 2), text, fill="black", font=font, spacing=1)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * (w + gap), top + r * (cap + h) + cap
        grid.paste(im.resize((w, h), Image.NEAREST), (x, y))
        if labels:
            box = draw.textbbox((x + 2, y + 2), labels[i], font=font)
            draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill="white")
            draw.text((x + 2, y + 2), labels[i], fill="black", font=font)
    return grid


def load_png(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def save_png(image, path):
    """Atomically: a killed run or a concurrent one never leaves a half-written PNG behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
    image.save(tmp)
    tmp.replace(path)


# -----------------------------------------------------------------------------
# evaluation, the one sample-and-score path (periodic evals, eval.py, the tiny base's report):
# ODE samples from fixed per-image noise, every task's reward, sharded over ranks

SEED_STRIDE = 1_000_000  # image j of a prompt starts from the noise seed of its image 0 + SEED_STRIDE * j


def seeded_jobs(rows, seed=0, images_per_prompt=1):
    """One job per image to sample: row i's image j, the row's fields plus "row": i and "seed":
    seed + k + SEED_STRIDE * j, with k the prompt's place in its task's set: its "index" where
    prompts.spread picked it (the periodic evals), else its place among this task's rows (eval.py
    passes a task's prompts from the first on). A prompt is so sampled from the same noise by a
    training run's evals and by eval.py. All rows' image 0 come first, so a run with fewer prompts
    or fewer images per prompt sees exactly a subset of the images of a larger one."""
    place, seen = [], {}
    for row in rows:
        place.append(row.get("index", seen.get(row.get("task"), 0)))
        seen[row.get("task")] = seen.get(row.get("task"), 0) + 1
    return [{**row, "row": i, "seed": seed + place[i] + SEED_STRIDE * j}
            for j in range(images_per_prompt) for i, row in enumerate(rows)]


@torch.no_grad()
def sample_images(policy, jobs, num_steps, guidance, batch_size, adapter=None, cache=None, desc=None):
    """{job index: PIL image} for this rank's jobs (rank, rank + world, ...), each by the ODE from
    its own noise seed. The last batch is padded with copies of its last job: the kernels'
    rounding depends on the batch shape (not on the other samples), so a fixed shape makes an
    image a function of its prompt and noise alone, whatever the number of ranks. cache: one PNG
    path per job, read where it exists and written where sampled. Returns (images, number sampled)."""
    from tqdm import tqdm
    from sde_sampler import decode, initial_noise, rollout
    mine = range(dist.get_rank() if dist.is_initialized() else 0, len(jobs), world())
    images = {i: load_png(cache[i]) for i in mine if cache and cache[i].exists()}
    todo = [i for i in mine if i not in images]
    with tqdm(total=len(todo), desc=desc, unit="img", disable=desc is None, leave=False) as bar:
        for k in range(0, len(todo), batch_size):
            batch = todo[k:k + batch_size]
            padded = batch + batch[-1:] * (batch_size - len(batch))
            x = initial_noise(policy, [jobs[i]["seed"] for i in padded])
            out = rollout(policy, [jobs[i]["prompt"] for i in padded], num_steps, guidance, 0.0, latents=x,
                          adapter=adapter)
            for i, im in zip(batch, decode(policy, out["latents"], batch_size)):
                images[i] = im
                if cache:
                    save_png(im, cache[i])
            bar.update(len(batch))
    return images, len(todo)


def score_images(jobs, images, plan=None, batch_size=64, metrics=()):
    """Every task's reward on the images this rank holds: [{"job", "task", "score", "info"}].
    plan: {task: job indices it scores}; by default every job is scored by its own task (a task
    with no prompts of its own, like pickscore, is given the other tasks' jobs). A task named in
    metrics keeps its published value, info[task] where the reward records one (PickScore's raw
    score; as a reward it is divided by 26)."""
    from rewards import get_reward
    if plan is None:
        plan = {}
        for i, job in enumerate(jobs):
            plan.setdefault(job["task"], []).append(i)
    records = []
    for task, idx in plan.items():
        mine = [i for i in idx if i in images]
        for k in range(0, len(mine), batch_size):
            chunk = mine[k:k + batch_size]
            scores, info = get_reward(task)([images[i] for i in chunk], [jobs[i]["prompt"] for i in chunk],
                                            [jobs[i]["metadata"] for i in chunk])
            records += [{"job": i, "task": task, "score": inf.get(task, s) if task in metrics else s, "info": inf}
                        for i, s, inf in zip(chunk, scores.tolist(), info)]
    return records


def _stats(records, jobs):
    per_prompt = {}
    for r in records:
        job = jobs[r["job"]]
        per_prompt.setdefault((job["task"], job["row"]), []).append(r["score"])
    out = {"mean": sum(r["score"] for r in records) / len(records), "n": len(records),
           "se": standard_error(torch.tensor([sum(v) / len(v) for v in per_prompt.values()]))}
    strict = [bool(r["info"]["strict"]) for r in records if "strict" in r["info"]]
    if strict:
        out["strict"] = sum(strict) / len(strict)
    failed = [bool(r["info"]["failed"]) for r in records if "failed" in r["info"]]
    if failed:  # images the reward's engine could not read (OCR), scored 0
        out["failed"] = sum(failed)
    return out


def summarise(records, jobs):
    """{task: {"mean", "n", "se"}} from score_images' records of every rank: n counts images, se
    is the standard error of the mean over prompts (each prompt's images averaged first);
    "strict", the pass rate, where the reward has a pass/fail; "tags", the same per prompt tag,
    where a task's own prompts carry several (GenEval reports per tag: a mean can hide that
    counting learned while position did not). For a GenEval reward (rewards.GENEVAL_REWARDS)
    "strict" is GenEval's overall score as its summary_scores.py computes it, the mean of the
    per-tag pass rates, and "strict_pooled" the pass rate over all images, which weighs a tag by
    its number of images. "sets": the same per prompt set, where a task scores several (pickscore
    and the eval metrics score every set's images)."""
    from rewards import GENEVAL_REWARDS
    out = {}
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [r for r in records if r["task"] == task]
        out[task] = _stats(mine, jobs)
        tags = {}
        for r in mine:
            job = jobs[r["job"]]
            if job["task"] == task and (tag := (job.get("metadata") or {}).get("tag")) is not None:
                tags.setdefault(tag, []).append(r)
        sets = {}  # a reward or metric that scores several prompt sets (pickscore, the metrics): each alone too
        for r in mine:
            sets.setdefault(jobs[r["job"]]["task"], []).append(r)
        if len(sets) > 1:
            out[task]["sets"] = {s: _stats(rs, jobs) for s, rs in sets.items()}
        if len(tags) > 1:
            out[task]["tags"] = {t: _stats(rs, jobs) for t, rs in tags.items()}
            if task in GENEVAL_REWARDS and "strict" in out[task]:
                per_tag = [s["strict"] for s in out[task]["tags"].values()]
                out[task]["strict_pooled"] = out[task]["strict"]
                out[task]["strict"] = sum(per_tag) / len(per_tag)
    return out


def evaluate(policy, rows, num_steps, guidance, batch_size, seed=0, adapter=None, images_per_prompt=1, metrics=()):
    """Sample rows (dicts with prompt/task/metadata; images_per_prompt each, seeded_jobs' seeds)
    and score each by its own task's reward, and every image by each of `metrics` (on their
    published scales: score_images), every rank a share, gathered on all. Returns
    (summarise's {task: stats}, images, details), images and details in seeded_jobs' order, each
    detail with its row index, seed, score and the reward's JSON-able info."""
    jobs = seeded_jobs(rows, seed, images_per_prompt)
    images, _ = sample_images(policy, jobs, num_steps, guidance, batch_size, adapter)
    plan = {}
    for i, job in enumerate(jobs):
        plan.setdefault(job["task"], []).append(i)
    plan.update({m: list(range(len(jobs))) for m in metrics})
    parts = all_gather_objects((score_images(jobs, images, plan, batch_size, metrics), images))
    records = sorted((r for p in parts for r in p[0]), key=lambda r: r["job"])
    images = {i: im for p in parts for i, im in p[1].items()}
    details = [{"row": jobs[r["job"]]["row"], "prompt": jobs[r["job"]]["prompt"], "task": r["task"],
                "seed": jobs[r["job"]]["seed"], "score": r["score"],
                **{k: v for k, v in r["info"].items() if _jsonable(v)}} for r in records]
    return summarise(records, jobs), [images[r["job"]] for r in records], details


def prompt_means(details):
    """{row index: mean score of its images} from evaluate's details."""
    scores = {}
    for d in details:
        scores.setdefault(d["row"], []).append(d["score"])
    return {i: sum(v) / len(v) for i, v in sorted(scores.items())}


def standard_error(values):
    """The standard error of the mean of a 1-D tensor (0 for fewer than two values)."""
    return (values.std() / len(values) ** 0.5).item() if len(values) > 1 else 0.0


def paired_change(now, ref):
    """The change of a task's mean between two evals of the same prompts and seeds, with its
    standard error over prompts: (mean of d_i, se of d_i), d_i = now_i - ref_i. The same noise
    makes the two evals' image noise largely cancel, so this se is what a change is judged by."""
    d = torch.tensor([now[i] - ref[i] for i in now if i in ref])
    return (d.mean().item(), standard_error(d)) if len(d) else (0.0, 0.0)


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def metric_names(spec):
    """"imagereward,hps" -> ["imagereward", "hps"]: the --metrics of eval.py and of the training
    stages' periodic evals, each one of rewards.METRICS (a clear error naming any other)."""
    from rewards import METRICS
    names = list(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    for m in names:
        if m not in METRICS:
            raise ValueError(f"unknown --metrics {m!r}; the metrics: {', '.join(METRICS)}")
    return names


def eval_set(spec, n, files=None):
    """The periodic evals' prompts: "count,text" -> (the tasks, their rows), n test prompts of
    each task spread over its set (prompts.spread), from files[task] where given; a task with no
    reward is a one-line error before anything loads."""
    from prompts import load_prompts, spread
    from rewards import get_reward
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    for t in tasks:
        get_reward(t)
    return tasks, [r for t in tasks for r in spread(load_prompts(t, "test", (files or {}).get(t)), n)]


def eval_and_log(policy, ema, params, rows, cfg, out, step):
    """The periodic eval of a training run: EMA weights, ODE samples of every task's test
    prompts (eval_images each), each task's score with its standard error into metrics.jsonl,
    and its change since the run's first eval (same prompts, same noise) with the standard
    error of that change; per-prompt scores into samples/scores_step_N.json, a grid (8 images
    per task) into samples/."""
    from tqdm import tqdm
    with ema_weights(ema, params):
        # a CFG-free student (opd_distill's --student_guidance 1) is scored where it samples
        summary, images, details = evaluate(policy, rows, cfg["eval_steps"], cfg.get("student_guidance") or cfg["guidance"],
                                            cfg["batch_size"],
                                            seed=cfg["seed"], images_per_prompt=cfg.get("eval_images", 1),
                                            metrics=metric_names(cfg.get("metrics", "")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        samples = Path(out) / "samples"
        samples.mkdir(exist_ok=True)
        scores = {t: prompt_means([d for d in details if d["task"] == t]) for t in summary}
        first = sorted(samples.glob("scores_step_*.json"))
        write_json(samples / f"scores_step_{step:06d}.json", scores)
        ref_step = int(first[0].stem.rpartition("_")[2]) if first else step
        ref = _read_scores(first[0]) if first else None
        text = []
        for t, s in summary.items():
            line = f"{t} {s['mean']:.3f} +-{s['se']:.3f}"
            if ref is not None and t in ref and ref_step != step:
                s["change"], s["change_se"] = paired_change(scores[t], ref[t])
                s["since_step"] = ref_step
                line += f" (change {s['change']:+.3f} +-{s['change_se']:.3f})"
            text.append(line)
        log_metrics(out, {"step": step, "eval": summary})
        tasks = list(summary)
        first_images = images[:len(rows)]  # every row's image 0
        grid = [im for t in tasks for im in [im for im, r in zip(first_images, rows) if r["task"] == t][:8]]
        image_grid(grid, cols=8, captions=tasks, min_size=64).save(
            samples / f"step_{step:06d}.png")
        tqdm.write(f"eval step {step}: " + ", ".join(text)
                   + (f"; changes since step {ref_step}, same prompts and noise" if ref_step != step else "")
                   + " (+- one standard error over prompts)")
    return summary


def _read_scores(path):
    """A samples/scores_*.json file as {task: {row: prompt mean}} (JSON keys are strings)."""
    return {t: {int(i): v for i, v in s.items()} for t, s in json.loads(Path(path).read_text()).items()}


def _row_stats(scores):
    """{task: {row: prompt mean}} -> {task: (mean, standard error over prompts)}."""
    return {t: (sum(v.values()) / len(v), standard_error(torch.tensor(list(v.values())))) for t, v in scores.items()}


def side_by_side(student, start, references, labels):
    """Markdown: the student's last eval beside where it started and beside each reference, every
    task's mean ± standard error over prompts, then the student's paired change against each (the
    same prompts and noise; bold: beyond two standard errors). Each argument is {task: {row:
    prompt mean}}, as eval_and_log writes to samples/scores_step_N.json; labels names the student,
    the start, then the references."""
    tasks = list(student)
    table = [("student", student), ("start", start), *references.items()]
    lines = ["| | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for name, scores in table:
        stats = _row_stats(scores)
        lines.append(f"| {labels.get(name, name)} | "
                     + " | ".join(f"{stats[t][0]:.3f} ±{stats[t][1]:.3f}" if t in stats else "" for t in tasks) + " |")
    for name, scores in table[1:]:
        cells = []
        for t in tasks:
            change, se = paired_change(student[t], scores[t]) if t in scores else (None, None)
            cell = "" if change is None else f"{change:+.3f} ±{se:.3f}"
            cells.append(f"**{cell}**" if cell and abs(change) > 2 * se else cell)
        lines.append(f"| student − {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(policy, rows, cfg, out, references):
    """The end of a training run with periodic evals: its student (the last eval) beside where it
    started (the first eval) and each reference model, {name: (adapter, guidance)} (OPD: the
    teachers), sampled from the same prompts and noise, printed and written to out/final_table.md.
    A reference's per-prompt scores are kept in samples/scores_NAME.json, so a resumed run does not
    sample it again. Returns the table."""
    samples = Path(out) / "samples"
    evals = sorted(samples.glob("scores_step_*.json"))
    if not evals:  # a run resumed from one that logged no eval: nothing to compare
        return None
    found = {name: samples / f"scores_{name.replace(' ', '_')}.json" for name in references}
    scores = {}
    for name, (adapter, guidance) in references.items():
        if all_gather_objects(found[name].exists())[0]:  # rank 0's file decides: every rank skips, or samples
            if is_rank0():
                scores[name] = _read_scores(found[name])
            continue
        _, _, details = evaluate(policy, rows, cfg["eval_steps"], guidance, cfg["batch_size"], seed=cfg["seed"],
                                 adapter=adapter, images_per_prompt=cfg.get("eval_images", 1))
        scores[name] = {t: prompt_means([d for d in details if d["task"] == t]) for t in dict.fromkeys(r["task"] for r in rows)}
        if is_rank0():
            write_json(found[name], scores[name])
    if not is_rank0():
        return None
    student, start = _read_scores(evals[-1]), _read_scores(evals[0])
    step_of = lambda f: int(f.stem.rpartition("_")[2])  # noqa: E731
    labels = {"student": f"student (step {step_of(evals[-1])})",
              "start": f"start (step {step_of(evals[0])}: {cfg.get('init') or 'the base'})"}
    text = side_by_side(student, start, scores, labels)
    (Path(out) / "final_table.md").write_text(text + "\n")
    per_task = ", ".join(f"{t} {len(v)}" for t, v in student.items())
    print(f"\nthe student beside where it started and its teachers, on the same test prompts ({per_task}) and "
          f"noise, {cfg.get('eval_images', 1)} images each; ± one standard error over prompts, bold: a change "
          f"beyond two\n" + text)
    return text
