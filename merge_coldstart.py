"""
Cold start for the student: merge the teachers' LoRAs into one. The result is the --init of
opd_distill.py. A merge is arithmetic on the LoRA factors, checked against the base's layer shapes
(built on the meta device, no weights loaded): no sampling, no GPU, no process group, seconds on a
CPU. The other cold start, SFT on the teachers' samples, is a training stage: sft_coldstart.py.

    python merge_coldstart.py --preset tiny --teachers count=runs/count/final text=runs/text/final --out runs/merge
    python merge_coldstart.py --preset tiny --teachers runs/count/final runs/text/final --method svd --rank 8 --out runs/svd
    python merge_coldstart.py --teachers ocr=ocr_teacher/ geneval=geneval_teacher/ --out runs/merge   # SD3.5-Medium
    python opd_distill.py --preset tiny --teachers ... --init runs/merge/final --out runs/opd

A teacher LoRA k adds delta_k = s_k B_k A_k to every adapted Linear, s_k = alpha_k / r_k (per
layer, from its rank/alpha patterns). The merge rules:

- exact (default): delta = sum_k w_k delta_k, represented exactly as one LoRA of rank sum_k r_k by
  stacking the factors: B = [w_1 s_1 B_1, ..., w_K s_K B_K], A = [A_1; ...; A_K].
- svd: that delta, truncated to rank --rank per layer (the best rank-r approximation).
- ties: TIES merging (trim, elect sign, disjoint mean) of the deltas, refactored to rank --rank.
- average: element-wise average of the A's and of the B's, as the authors' script does. Not a
  merge of the deltas (B_avg A_avg has cross terms B_j A_k), kept for comparison.

Every run writes --out/final/ (a LoRA folder that StableDiffusion3Pipeline.load_lora_weights and
opd_distill.py --init take; its weights file is also linked into --out itself), config.json,
metrics.jsonl and merge_report.json: the relative Frobenius error of the result's delta against
the exact weighted delta, per layer and overall.
"""

import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch

import common
from lora import check_lora_fits, read_lora, save_lora
from sde_sampler import resolve_model

# -----------------------------------------------------------------------------
# defaults: SD3.5-Medium; --preset tiny merges onto the tiny base
DEFAULTS = dict(
    model="",                 # hub id or pipeline folder; empty: SD3.5-Medium (or the preset's base)
    teachers=[],              # task=LORA or a bare LORA path (its task: the file/folder name)
    weights="",               # w_k, comma-separated in teacher order; empty: 1/K each
    method="exact",           # exact | svd | ties | average
    out="runs/merge",
    rank=0,                   # svd/ties: output rank per layer; 0: the largest teacher rank
    density=0.2,              # ties: fraction of each teacher's delta entries kept (TIES paper: 20%)
)
PRESETS = {"tiny": {}}        # the tiny base is resolve_model's choice; a merge has nothing else to set
METHODS = ("exact", "svd", "ties", "average")


# -----------------------------------------------------------------------------
# the maths: a teacher is {module: (B, A, s)}, adding s * B @ A to that Linear; a merge result is
# {module: (B, A)} adding B @ A (every scale folded into B)

def layer_scale(lora_kwargs, module, rank):
    """alpha / r of one layer, as peft computes it: alpha_pattern before lora_alpha, rsLoRA's sqrt."""
    from peft.utils.other import get_pattern_key
    pattern = lora_kwargs.get("alpha_pattern") or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), module), lora_kwargs["lora_alpha"])
    return alpha / math.sqrt(rank) if lora_kwargs.get("use_rslora") else alpha / rank


def lora_factors(state, lora_kwargs):
    """read_lora's output -> {module: (B, A, s)} in float64: the layer adds s * B @ A."""
    out = {}
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            m = key[: -len(".lora_A.weight")]
            a, b = state[key].double(), state[m + ".lora_B.weight"].double()
            out[m] = (b, a, layer_scale(lora_kwargs, m, a.shape[0]))
    return out


def exact_merge(teachers, weights):
    """sum_k w_k s_k B_k A_k as one LoRA: the factors stacked along the rank, no approximation.
    Layers some teachers lack stack only the others'."""
    merged = {}
    for m in sorted(set().union(*teachers)):
        parts = [(w * t[m][2] * t[m][0], t[m][1]) for t, w in zip(teachers, weights) if m in t]
        merged[m] = (torch.cat([b for b, _ in parts], 1), torch.cat([a for _, a in parts], 0))
    return merged


def factorize(delta, rank):
    """The best rank-`rank` factors of a matrix (Eckart-Young), split evenly: B = U sqrt(S), A = sqrt(S) V^T."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def low_rank(b, a, rank):
    """factorize(b @ a, rank) without forming b @ a: QR both factors, SVD the small core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    cb, ca = factorize(rb @ ra.T, rank)
    return qb @ cb, ca @ qa.T


def svd_merge(teachers, weights, rank):
    return {m: low_rank(b, a, rank) for m, (b, a) in exact_merge(teachers, weights).items()}


def ties_delta(deltas, weights, density):
    """TIES (Yadav et al. 2023) on one layer's teacher deltas: keep each delta's top `density`
    fraction of entries by magnitude, elect every entry's sign by the weighted sum of the trimmed
    deltas, and take the w-weighted mean of the entries that agree with it, scaled by sum(w) (TIES'
    lambda). With density 1 and no sign conflict this is the exact weighted sum."""
    trimmed = []
    for d in deltas:
        keep = max(1, round(density * d.numel()))
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        mask[d.abs().flatten().topk(keep).indices] = True
        trimmed.append(d * mask.view_as(d))
    t = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=t.dtype).view(-1, 1, 1)
    sign = torch.sign((w * t).sum(0))
    agree = w * ((torch.sign(t) == sign) & (t != 0))
    mass = agree.sum(0)
    return torch.where(mass > 0, (agree * t).sum(0) / mass.clamp_min(1e-30), 0.0) * w.sum()


def ties_merge(teachers, weights, density, rank):
    return {m: factorize(ties_delta([t[m][2] * t[m][0] @ t[m][1] for t in teachers], weights, density), rank)
            for m in sorted(teachers[0])}


def average_merge(teachers, weights):
    """The authors' rule: A = sum_k w_k A_k, B = sum_k w_k s_k B_k (each teacher's scale folded into its
    B: their script exactly when the teachers share alpha/r). Needs equal ranks per layer."""
    return {m: (sum(w * t[m][2] * t[m][0] for t, w in zip(teachers, weights)),
                sum(w * t[m][1] for t, w in zip(teachers, weights))) for m in sorted(teachers[0])}


def relative_errors(merged, reference):
    """||delta - delta_ref||_F / ||delta_ref||_F per layer and overall (a layer missing on one side
    counts as a zero delta there)."""
    per_layer, num, den = {}, 0.0, 0.0
    for m in sorted(set(merged) | set(reference)):
        d = merged[m][0] @ merged[m][1] if m in merged else 0.0
        ref = reference[m][0] @ reference[m][1] if m in reference else torch.zeros_like(d)
        diff, norm = float(torch.linalg.norm(d - ref)) ** 2, float(torch.linalg.norm(ref)) ** 2
        per_layer[m] = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
        num, den = num + diff, den + norm
    overall = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return overall, per_layer


# -----------------------------------------------------------------------------
# setup helpers

def parse_weights(text, k):
    if not text:
        return [1.0 / k] * k
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers, one per teacher") from None
    if len(weights) != k:
        raise ValueError(f"--weights has {len(weights)} values for {k} teachers")
    return weights


def base_skeleton(model):
    """The base transformer built on the meta device: every Linear's shape, no weights loaded."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    try:
        config = SD3Transformer2DModel.load_config(model, subfolder="transformer")
    except OSError as e:
        raise FileNotFoundError(f"{model}: no SD3 transformer config found ({str(e).splitlines()[0]})") from None
    with init_empty_weights():
        return SD3Transformer2DModel.from_config(config)


def check_same_layers(names, sources, teachers):
    """The merge rules combine layer by layer: every teacher must adapt the same layers."""
    first = set(teachers[0])
    for name, source, t in zip(names[1:], sources[1:], teachers[1:]):
        if set(t) != first:
            layer = sorted(first ^ set(t))[0]
            where = names[0] if layer in first else name
            raise ValueError(f"{source}: teachers {names[0]!r} and {name!r} adapt different layers: layer {layer} "
                             f"is only in {where!r}")


def check_equal_ranks(names, teachers):
    for m in sorted(teachers[0]):
        ranks = {n: t[m][1].shape[0] for n, t in zip(names, teachers)}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"--method average needs equal ranks: layer {m} has ranks {ranks}; use exact or svd")


def lora_folder_state(merged, scale):
    """{module: (B, A)} -> (state dict, LoraConfig dict) of a LoRA with alpha/r = scale on every layer;
    per-layer ranks go into rank_pattern (with a matching alpha_pattern), so ranks may differ."""
    from peft import LoraConfig
    ranks = {m: a.shape[0] for m, (_, a) in merged.items()}
    alpha = {k: int(scale * k) if float(scale * k).is_integer() else scale * k for k in set(ranks.values())}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    cfg = LoraConfig(r=r, lora_alpha=alpha[r], target_modules=sorted(ranks), rank_pattern=pattern,
                     alpha_pattern={m: alpha[k] for m, k in pattern.items()}).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    state = {}
    for m, (b, a) in merged.items():
        state[f"{m}.lora_A.weight"] = a.float().contiguous()
        state[f"{m}.lora_B.weight"] = (b / scale).float().contiguous()
    return state, cfg


def link_final(out):
    """--out itself loads as the LoRA too: its weights file is a hard link to final/'s (a copy where
    links are not possible)."""
    import shutil
    src, dst = Path(out) / "final" / "pytorch_lora_weights.safetensors", Path(out) / "pytorch_lora_weights.safetensors"
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(DEFAULTS, PRESETS, argv, description=__doc__.split("\n\n")[0])
    method = cfg["method"]
    with common.startup_errors():
        if method == "sft":
            raise ValueError("--method sft is a training stage of its own: python sft_coldstart.py --teachers ...")
        if method not in METHODS:
            raise ValueError(f"unknown --method {method!r}; valid methods: {', '.join(METHODS)}")
        specs = common.parse_teachers(cfg["teachers"])
        if not specs:
            raise ValueError("no teachers: pass --teachers TASK=LORA ...")
        names, sources = list(specs), list(specs.values())
        weights = parse_weights(cfg["weights"], len(specs))
        if method == "ties" and (min(weights) <= 0 or not 0 < cfg["density"] <= 1):
            raise ValueError("--method ties needs positive --weights and 0 < --density <= 1")
        loras = [read_lora(s) for s in sources]
        cfg["model"] = resolve_model(cfg["model"], cfg["preset"])
        skeleton = base_skeleton(cfg["model"])
        for (state, _), source in zip(loras, sources):
            check_lora_fits(skeleton, state, source)
        teachers = [lora_factors(state, kw) for state, kw in loras]
        check_same_layers(names, sources, teachers)
        if method == "average":
            check_equal_ranks(names, teachers)
    rank_out = cfg["rank"] or max(a.shape[0] for t in teachers for _, a, _ in t.values())
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "config.json", cfg)
    for n, s, t, (_, kw), w in zip(names, sources, teachers, loras, weights):
        print(f"teacher {n}: {s} | {len(t)} layers, rank(s) {sorted({a.shape[0] for _, a, _ in t.values()})}, "
              f"alpha {kw['lora_alpha']}{' (rsLoRA)' if kw.get('use_rslora') else ''} | weight {w:g}")

    reference = exact_merge(teachers, weights)
    if method == "exact":
        merged = reference
    elif method == "svd":
        merged = svd_merge(teachers, weights, rank_out)
    elif method == "ties":
        merged = ties_merge(teachers, weights, cfg["density"], rank_out)
    else:
        merged = average_merge(teachers, weights)
    error, per_layer = relative_errors(merged, reference)
    ranks = dict(sorted(Counter(a.shape[0] for _, a in merged.values()).items()))
    report = {"method": method, "reference": "exact weighted delta sum_k w_k (alpha_k / r_k) B_k A_k",
              "teachers": {n: {"source": str(s), "weight": w} for n, s, w in zip(names, sources, weights)},
              "layers_per_rank": {str(k): v for k, v in ranks.items()}, "rel_error": error,
              "rel_error_per_layer": per_layer, **({"density": cfg["density"]} if method == "ties" else {})}
    common.write_json(out / "merge_report.json", report)
    # the output's alpha/r: the teachers' own when they all share one (r=32, alpha=64 stacked twice
    # gives r=64, alpha=128), so a student trained on from it keeps the step size it was tuned for
    scales = {s for t in teachers for _, _, s in t.values()}
    state, lora_cfg = lora_folder_state(merged, scales.pop() if len(scales) == 1 else 1.0)
    save_lora(state, lora_cfg, out / "final", {"config.json": cfg, "merge_report.json": report})
    common.log_metrics(out, {"method": method, "rel_error": error, "layers": len(merged),
                             "layers_per_rank": report["layers_per_rank"]})
    link_final(out)
    print(f"{method}: {len(merged)} layers (layers per rank {ranks}), relative error against the exact "
          f"weighted delta {error:.3e}")
    print(f"done: {out / 'final'}")


if __name__ == "__main__":
    main(sys.argv[1:])
