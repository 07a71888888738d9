"""
Each task's test score against training step, one panel per task, one line per run: the seesaw
of a single-reward teacher, or its absence in a distilled student, at a glance.

    python -m tools.curves mix=runs/tiny/mix opd=runs/tiny/opd --out runs/tiny/curves.png
    python -m tools.curves --results runs/tiny/eval/results.json --x count,text --y clean \
        opd_mar0 opd_mar0.2 opd_mar1 --out runs/tiny/mar_sweep.png       # a trade-off, one point each

A run is a training --out folder; its metrics.jsonl holds the periodic evals ({"step", "eval":
{task: {"mean", ...}}}) that teacher_grpo.py and opd_distill.py write. NAME=DIR names a line;
a bare DIR is named after its folder.

With --results, the positional names are checkpoints of an eval.py results.json instead, each
drawn as one point: the mean of the --x tasks' scores against the --y task's (MAR's trade-off:
what the anchor keeps against what the teachers teach).

With --kl_by_step, the runs are OPD runs: per task, the KL to its teacher at each SDE step (the
`kl_by_step` of metrics.jsonl), averaged over the run's first and last --window training steps,
drawn and printed: does the KL fall at every SDE step, the first ones (layout, counts, where
guidance matters most) included?

    python -m tools.curves --kl_by_step opd=runs/opd free=runs/opd_free --out runs/kl_by_step.png
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def eval_curves(run):
    """{task: ([steps], [mean scores])} from a run folder's metrics.jsonl."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (not a training run's --out folder?)")
    curves = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for task, s in record.get("eval", {}).items():
            steps, means = curves.setdefault(task, ([], []))
            steps.append(record["step"])
            means.append(s["mean"])
    if not curves:
        raise ValueError(f"{path}: no eval records (was the run started with --eval_every 0?)")
    return curves


def plot(runs, out):
    """runs: {name: folder}. Writes one PNG with a panel per task (tasks in first-seen order)."""
    curves = {name: eval_curves(run) for name, run in runs.items()}
    tasks = list(dict.fromkeys(t for c in curves.values() for t in c))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, c in curves.items():
            if task in c:
                ax.plot(*c[task], marker="o", label=name)
        ax.set_title(task)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test score (mean reward)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def kl_by_step(run, window):
    """{task: (first, last)}: the per-SDE-step KL to the task's teacher, averaged over the run's
    first and last `window` training steps (opd_distill.py's metrics.jsonl)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (not a training run's --out folder?)")
    rows = {}
    for record in map(json.loads, path.read_text().splitlines()):
        for task, kls in record.get("kl_by_step", {}).items():
            rows.setdefault(task, []).append(kls)
    if not rows:
        raise ValueError(f"{path}: no kl_by_step records (not an opd_distill.py run?)")
    mean = lambda block: [sum(col) / len(col) for col in zip(*block)]  # noqa: E731
    return {task: (mean(r[:window]), mean(r[-window:])) for task, r in rows.items()}


def plot_kl(runs, window, out):
    """One panel per task, the KL (log scale) against the SDE step: dashed the run's first
    `window` steps, solid its last; prints the same with the last/first ratio per SDE step."""
    kls = {name: kl_by_step(run, window) for name, run in runs.items()}
    tasks = list(dict.fromkeys(t for k in kls.values() for t in k))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, (name, by_task) in enumerate(kls.items()):
            if task not in by_task:
                continue
            first, last = by_task[task]
            ax.plot(first, linestyle="--", color=f"C{k}", alpha=0.6)
            ax.plot(last, marker="o", color=f"C{k}", label=name)
            print(f"{name} {task}: KL by SDE step, first {window} -> last {window} training steps: "
                  + ", ".join(f"{a:.3g}->{b:.3g} ({b / a:.2f}x)" for a, b in zip(first, last)))
        ax.set_title(task)
        ax.set_yscale("log")
        ax.set_xlabel("SDE step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"KL to the teacher (dashed: first {window}, solid: last {window} steps)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def tradeoff(results, names, x_tasks, y_task, out):
    """One labelled point per checkpoint of an eval.py results.json: mean of x_tasks against y_task."""
    res = json.loads(Path(results).read_text())
    missing = [n for n in names if n not in res]
    if missing:
        raise ValueError(f"{results}: no checkpoint named {missing[0]!r} (has {', '.join(res)})")
    for task in [*x_tasks, y_task]:
        if any(task not in res[n] for n in names):
            raise ValueError(f"{results}: task {task!r} was not evaluated")
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    xs = [sum(res[n][t]["mean"] for t in x_tasks) / len(x_tasks) for n in names]
    ys = [res[n][y_task]["mean"] for n in names]
    ax.plot(xs, ys, marker="o")
    for n, x, y in zip(names, xs, ys):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"mean of {', '.join(x_tasks)}")
    ax.set_ylabel(y_task)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR or DIR: training runs' --out folders "
                        "(with --results: checkpoint names)")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--results", help="an eval.py results.json: one point per named checkpoint")
    parser.add_argument("--x", default="count,text", help="with --results: tasks averaged on the x axis")
    parser.add_argument("--y", default="clean", help="with --results: the task on the y axis")
    parser.add_argument("--kl_by_step", action="store_true", help="OPD runs: the KL to the teacher by SDE step, "
                        "early against late in training")
    parser.add_argument("--window", type=int, default=5, help="with --kl_by_step: training steps averaged at each end")
    args = parser.parse_args(argv)
    try:
        if args.kl_by_step:
            plot_kl(dict((r.split("=", 1) if "=" in r else (Path(r).name, r)) for r in args.runs), args.window, args.out)
        elif args.results:
            tradeoff(args.results, args.runs, [t for t in args.x.split(",") if t], args.y, args.out)
        else:
            plot(dict((r.split("=", 1) if "=" in r else (Path(r).name, r)) for r in args.runs), args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"tools/curves.py: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
