"""Cold start: merge exactness (deltas and transformer outputs), svd/average against exact, the
diffusers round trip, teachers of different shapes, bad teachers."""
import json

import pytest
import torch

import merge_coldstart
from conftest import random_teacher as _teacher
from lora import add_student, load_adapter, read_lora
from sde_sampler import encode, load_policy, using_adapter, velocity

PROMPTS = ["a red circle", "the text \"a3\""]
QKV = ["attn.to_q", "attn.to_k", "attn.to_v"]


def _live_deltas(transformer, name):
    """{module: scaling * B @ A} of a live peft adapter: peft's own scaling, nothing of ours."""
    return {m: (mod.scaling[name] * mod.lora_B[name].weight @ mod.lora_A[name].weight).double()
            for m, mod in transformer.named_modules() if hasattr(mod, "lora_A") and name in mod.lora_A}


def _deltas(folder):
    state, kwargs = read_lora(folder)
    return {m: s * b @ a for m, (b, a, s) in merge_coldstart.lora_factors(state, kwargs).items()}


def _probe(policy, name=None):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cond = encode(policy, PROMPTS)
    with torch.no_grad():
        if name is None:
            return velocity(policy, x, 0.7, cond, 1.0)
        with using_adapter(policy, name):
            return velocity(policy, x, 0.7, cond, 1.0)


def _merge(pipe_dir, out, teachers, **over):
    args = ["--model", str(pipe_dir), "--out", str(out), "--teachers", *teachers]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    merge_coldstart.main(args)
    return json.loads((out / "merge_report.json").read_text())


def test_exact_merge_equals_weighted_deltas_and_outputs(policy, tiny_pipe_dir, tmp_path, teachers):
    report = _merge(tiny_pipe_dir, tmp_path / "exact", [f"count={teachers[0]}", str(teachers[1])], weights="0.7,-0.4")
    want = {m: 0.7 * d for m, d in _live_deltas(policy.transformer, "count").items()}
    for m, d in _live_deltas(policy.transformer, "text").items():
        want[m] = want[m] - 0.4 * d
    got = _deltas(tmp_path / "exact" / "final")
    assert got.keys() == want.keys()
    assert max((got[m] - want[m]).abs().max().item() for m in want) < 1e-5
    assert report["rel_error"] < 1e-12 and set(report["teachers"]) == {"count", "text"}
    # stacked ranks: 4+3 on most layers, 2+3 where the first teacher's rank_pattern says 2
    assert report["layers_per_rank"] == {"5": 1, "7": len(want) - 1}
    assert (tmp_path / "exact" / "final" / "config.json").exists()
    assert json.loads((tmp_path / "exact" / "config.json").read_text())["method"] == "exact"

    # the transformer with the merged adapter = the base with the deltas added to its Linear weights
    load_adapter(policy, tmp_path / "exact" / "final", "merged")
    fused = load_policy(str(tiny_pipe_dir), device="cpu")
    modules = dict(fused.transformer.named_modules())
    with torch.no_grad():
        for m, d in want.items():
            modules[m].weight += d.float()
    v_merged, v_fused, v_base = _probe(policy, "merged"), _probe(fused), _probe(policy, "base")
    assert (v_merged - v_fused).abs().max() < 1e-4
    assert (v_merged - v_base).abs().max() > 1e-2
    # ... and it is what opd_distill.py --init starts the student from
    params = add_student(policy, init=tmp_path / "exact" / "final")
    assert all(p.requires_grad for p in params) and (_probe(policy) - v_merged).abs().max() < 1e-5


def test_svd_full_rank_is_exact_and_average_is_not(policy, tiny_pipe_dir, tmp_path):
    # equal ranks (average needs them), different alphas and different A's
    t1 = _teacher(policy, tmp_path / "count", "count", 1, r=3, alpha=6, targets=QKV)
    t2 = _teacher(policy, tmp_path / "text", "text", 2, r=3, alpha=3, targets=QKV)
    args = [f"count={t1}", f"text={t2}"]
    _merge(tiny_pipe_dir, tmp_path / "exact", args)
    svd = _merge(tiny_pipe_dir, tmp_path / "svd", args, method="svd", rank=6)
    low = _merge(tiny_pipe_dir, tmp_path / "low", args, method="svd")  # default: the largest teacher rank, 3
    avg = _merge(tiny_pipe_dir, tmp_path / "avg", args, method="average")
    exact = _deltas(tmp_path / "exact" / "final")
    full = _deltas(tmp_path / "svd" / "final")
    assert max((full[m] - exact[m]).abs().max().item() for m in exact) < 1e-5
    assert svd["rel_error"] < 1e-6 and svd["layers_per_rank"] == {"6": len(exact)}
    assert low["layers_per_rank"] == {"3": len(exact)} and 0.05 < low["rel_error"] < 1
    # average: B_avg A_avg has cross terms; the report says by how much, matching a direct computation
    a = _deltas(tmp_path / "avg" / "final")
    num = sum(((a[m] - exact[m]) ** 2).sum() for m in exact)
    den = sum((exact[m] ** 2).sum() for m in exact)
    assert avg["rel_error"] > 0.1
    assert abs(avg["rel_error"] - (num / den).sqrt().item()) < 1e-5
    m = next(iter(exact))
    assert abs(avg["rel_error_per_layer"][m] - (torch.linalg.norm(a[m] - exact[m]) / torch.linalg.norm(exact[m])).item()) < 1e-5
    # the stored factors of average are the authors' element-wise means (alpha/r shared: folded back)
    state, kwargs = read_lora(tmp_path / "avg" / "final")
    s1, s2 = read_lora(t1)[0], read_lora(t2)[0]
    key = f"{m}.lora_A.weight"
    torch.testing.assert_close(state[key], 0.5 * s1[key] + 0.5 * s2[key])


def test_ties_density_one_without_conflict_is_exact():
    d1 = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    d2 = torch.tensor([[2.0, -1.0], [1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(merge_coldstart.ties_delta([d1, d2], [0.5, 0.5], 1.0), 0.5 * d1 + 0.5 * d2)
    # a sign conflict: the minority entry is dropped, not averaged in
    d3 = torch.tensor([[-4.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    out = merge_coldstart.ties_delta([d2, d3, d3], [1 / 3] * 3, 1.0)
    assert out[0, 0] == -4.0
    # trimming keeps the top fraction by magnitude
    out = merge_coldstart.ties_delta([d1], [1.0], 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.0, -2.0], [3.0, 0.0]], dtype=torch.float64))


def test_ties_and_svd_outputs_load_and_report(tiny_pipe_dir, tmp_path, teachers):
    report = _merge(tiny_pipe_dir, tmp_path / "ties", [f"count={teachers[0]}", f"text={teachers[1]}"],
                    method="ties", rank=4, density=0.5)
    assert report["density"] == 0.5 and 0 < report["rel_error"] < 1.5
    assert report["layers_per_rank"] == {"4": len(report["rel_error_per_layer"])}
    fresh = load_policy(str(tiny_pipe_dir), device="cpu")
    load_adapter(fresh, tmp_path / "ties" / "final", "ties")
    assert torch.isfinite(_probe(fresh, "ties")).all()


def test_merged_folder_loads_with_diffusers(policy, tiny_pipe_dir, tmp_path, teachers):
    _merge(tiny_pipe_dir, tmp_path / "m", [f"count={teachers[0]}", f"text={teachers[1]}"], weights="0.5,0.5")
    load_adapter(policy, tmp_path / "m" / "final", "merged")
    v_merged = _probe(policy, "merged")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    e, p, _, _ = encode(policy, PROMPTS)
    fresh = load_policy(str(tiny_pipe_dir), device="cpu")
    for folder in (tmp_path / "m" / "final", tmp_path / "m"):  # --out itself loads too
        fresh.pipe.load_lora_weights(str(folder))  # plain diffusers reads rank_pattern and alpha_pattern
        with torch.no_grad():
            v = fresh.pipe.transformer(hidden_states=x, timestep=torch.full((2,), 700.0), encoder_hidden_states=e,
                                       pooled_projections=p).sample
        assert (v - v_merged).abs().max() < 1e-5
        fresh.pipe.unload_lora_weights()


def test_bad_teachers_stop_naming_the_layer(policy, tiny_pipe_dir, tmp_path, teachers):
    narrow = _teacher(policy, tmp_path / "narrow", "narrow", 3, r=4, alpha=8, targets=["attn.to_q", "attn.to_v"])
    with pytest.raises(SystemExit, match=r"teachers 'count' and 'narrow' adapt different layers: "
                                         r"layer transformer_blocks\.0\.attn\.add_k_proj is only in 'count'"):
        _merge(tiny_pipe_dir, tmp_path / "x", [f"count={teachers[0]}", str(narrow)])
    state, _ = read_lora(teachers[1])
    key = "transformer_blocks.1.attn.to_k.lora_A.weight"
    state[key] = torch.zeros(state[key].shape[0], 64)
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(SystemExit, match=r"wide\.pt: layer transformer_blocks\.1\.attn\.to_k has LoRA shape \(3, 64\)"):
        with pytest.warns(UserWarning, match="no lora_alpha"):
            _merge(tiny_pipe_dir, tmp_path / "x", [f"count={teachers[0]}", str(tmp_path / "wide.pt")])
    with pytest.raises(SystemExit, match=r"needs equal ranks: layer transformer_blocks\.0\.attn\.add_k_proj"):
        _merge(tiny_pipe_dir, tmp_path / "x", [str(teachers[0]), str(teachers[1])], method="average")
    with pytest.raises(SystemExit, match="--weights has 1 values for 2 teachers"):
        _merge(tiny_pipe_dir, tmp_path / "x", [str(teachers[0]), str(teachers[1])], weights="1")
    with pytest.raises(SystemExit, match="--method sft is a training stage of its own: python sft_coldstart.py"):
        _merge(tiny_pipe_dir, tmp_path / "x", [str(teachers[0]), str(teachers[1])], method="sft")
    with pytest.raises(SystemExit, match="task 'count' has two teachers"):
        _merge(tiny_pipe_dir, tmp_path / "x", [str(teachers[0]), f"count={teachers[1]}"])
    assert not (tmp_path / "x" / "final").exists()
