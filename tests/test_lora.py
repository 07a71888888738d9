"""LoRA checkpoints: diffusers round trip, peft folders, several adapters on one base, bad input."""
import pytest
import torch

from tiny.pretrain import build_tiny_pipeline
from lora import add_student, load_adapter, save_adapter
from sde_sampler import BASE, encode, load_policy, using_adapter, velocity

PROMPTS = ["a red circle", "a blue square"]


def _randomise(params, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)


def _probe(policy, name=None):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    cond = encode(policy, PROMPTS)
    with torch.no_grad():
        if name is None:
            return velocity(policy, x, 0.6, cond, 1.0)
        with using_adapter(policy, name):
            return velocity(policy, x, 0.6, cond, 1.0)


def _raw_forward(pipe, policy):
    """The transformer of a plain diffusers pipeline, on the probe input."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    e, p, _, _ = encode(policy, PROMPTS)
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=torch.full((2,), 600.0), encoder_hidden_states=e,
                                pooled_projections=p).sample


def test_save_then_diffusers_load_lora_weights(policy, tiny_pipe_dir, tmp_path):
    _randomise(add_student(policy, rank=4, alpha=16), 0)
    v_student = _probe(policy)
    v_base = _probe(policy, BASE)
    folder = save_adapter(policy, "student", tmp_path / "ckpt", extra_files={"config.json": {"lr": 1e-4}})
    assert (folder / "config.json").exists() and not (tmp_path / "ckpt.tmp").exists()
    fresh = load_policy(str(tiny_pipe_dir), device="cpu")
    fresh.pipe.load_lora_weights(str(folder))  # plain diffusers, nothing of ours
    v_loaded = _raw_forward(fresh.pipe, policy)
    assert (v_loaded - v_student).abs().max() < 1e-5
    assert (v_loaded - v_base).abs().max() > 1e-3
    # alpha survives (without the metadata diffusers would read alpha = r = 4 and halve... quarter it)
    ours = load_policy(str(tiny_pipe_dir), device="cpu")
    load_adapter(ours, folder, "ocr")
    assert (_probe(ours, "ocr") - v_student).abs().max() < 1e-5


def test_saved_folders_load_with_peft_from_pretrained(policy, tiny_pipe_dir, tmp_path):
    """Every saved LoRA folder also loads the way Flow-GRPO and the authors' OPD code load
    teachers, PeftModel.from_pretrained(transformer, folder), with per-layer ranks and alphas."""
    from peft import PeftModel
    from conftest import random_teacher
    q = "transformer_blocks.0.attn.to_q"
    folder = random_teacher(policy, tmp_path / "t", "t", 3, r=4, alpha=8, rank_pattern={q: 2}, alpha_pattern={q: 6})
    v_teacher, v_base = _probe(policy, "t"), _probe(policy, BASE)
    fresh = load_policy(str(tiny_pipe_dir), device="cpu")
    fresh.pipe.transformer = PeftModel.from_pretrained(fresh.pipe.transformer, str(folder)).base_model.model
    v_loaded = _raw_forward(fresh.pipe, policy)
    assert (v_loaded - v_teacher).abs().max() < 1e-5 and (v_loaded - v_base).abs().max() > 1e-3


def test_peft_folder_teacher_and_coexistence(policy, tiny_pipe_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    # a teacher saved the way Flow-GRPO saves it: a PeftModel folder
    other = load_policy(str(tiny_pipe_dir), device="cpu")
    peft_model = get_peft_model(other.transformer, LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                                               target_modules=["attn.to_q", "attn.to_v"]))
    _randomise([p for n, p in peft_model.named_parameters() if "lora_" in n], 1)
    v_teacher = _raw_forward(other.pipe, policy)
    peft_model.save_pretrained(tmp_path / "peft_teacher")
    assert (tmp_path / "peft_teacher" / "adapter_config.json").exists()

    params = add_student(policy, rank=4, alpha=8)
    _randomise(params, 2)
    save_adapter(policy, "student", tmp_path / "second")
    load_adapter(policy, tmp_path / "peft_teacher", "geneval")
    load_adapter(policy, tmp_path / "second", "ocr")
    v_geneval, v_ocr, v_student, v_base = (_probe(policy, "geneval"), _probe(policy, "ocr"), _probe(policy),
                                           _probe(policy, BASE))
    assert (v_geneval - v_teacher).abs().max() < 1e-5
    assert (v_ocr - v_student).abs().max() < 1e-5
    assert (v_geneval - v_student).abs().max() > 1e-3
    fresh = load_policy(str(tiny_pipe_dir), device="cpu")
    assert torch.equal(v_base, _probe(fresh))  # disabling gives the base output exactly
    # teachers stay frozen, the student stays trainable after all the switching
    grads = {n: p.requires_grad for n, p in policy.transformer.named_parameters() if "lora_" in n}
    assert all(v for n, v in grads.items() if ".student." in n)
    assert not any(v for n, v in grads.items() if ".student." not in n)


def test_state_dict_file_forms(policy, tmp_path):
    from safetensors.torch import save_file
    params = add_student(policy, rank=4, alpha=4)
    _randomise(params, 3)
    v_student = _probe(policy)
    from lora import adapter_state_dict
    sd = {k: v.clone() for k, v in adapter_state_dict(policy, "student").items()}
    torch.save(sd, tmp_path / "count.pt")
    save_file(sd, str(tmp_path / "text.safetensors"))
    # a bare state dict carries no alpha: we say so and take alpha = r (4 here, which is right)
    with pytest.warns(UserWarning, match="no lora_alpha stored"):
        load_adapter(policy, tmp_path / "count.pt", "count")
    with pytest.warns(UserWarning, match="no lora_alpha stored"):
        load_adapter(policy, tmp_path / "text.safetensors", "text")
    assert (_probe(policy, "count") - v_student).abs().max() < 1e-5
    assert (_probe(policy, "text") - v_student).abs().max() < 1e-5


def test_bad_inputs_fail_with_one_line_naming_the_path(policy, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_teacher"):
        load_adapter(policy, tmp_path / "missing_teacher", "ocr")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "notlora.pt")
    with pytest.raises(ValueError, match=r"notlora\.pt: expected a dict of LoRA tensors") as e:
        load_adapter(policy, tmp_path / "notlora.pt", "ocr")
    assert "\n" not in str(e.value)
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a loadable tensor dict"):
        load_adapter(policy, tmp_path / "garbage.pt", "ocr")
    # a LoRA trained for a wider transformer
    wide_dir = tmp_path / "wide_pipe"
    build_tiny_pipeline(wide_dir, seed=1, num_layers=2, head_dim=16)
    wide = load_policy(str(wide_dir), device="cpu")
    _randomise(add_student(wide, rank=4, alpha=4), 4)
    save_adapter(wide, "student", tmp_path / "wide_lora")
    with pytest.raises(ValueError, match=r"wide_lora: layer transformer_blocks\.0\.attn\.\S+ has LoRA shape") as e:
        load_adapter(policy, tmp_path / "wide_lora", "ocr")
    assert "\n" not in str(e.value)
    assert "ocr" not in (policy.transformer.peft_config if getattr(policy.transformer, "_hf_peft_config_loaded", False) else {})


def test_dotted_hub_ids_reach_the_hub(policy, tmp_path, monkeypatch):
    """The published Flow-GRPO ids have dots in their names (SD3.5M-...): they are hub ids, not
    files with a suffix, and go to the download (mocked here); a missing local file does not."""
    import huggingface_hub

    from lora import read_lora
    _randomise(add_student(policy, rank=4, alpha=8), 3)
    save_adapter(policy, "student", tmp_path / "published")
    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tmp_path / "published")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    for repo in ("jieliu/SD3.5M-FlowGRPO-Text", "jieliu/SD3.5M-FlowGRPO-GenEval", "someone/plain"):
        state, kwargs = read_lora(repo)
        assert state and kwargs["lora_alpha"] == 8
    assert asked == ["jieliu/SD3.5M-FlowGRPO-Text", "jieliu/SD3.5M-FlowGRPO-GenEval", "someone/plain"]
    with pytest.raises(FileNotFoundError, match="ocr.safetensors: LoRA checkpoint not found"):
        read_lora("teachers/ocr.safetensors")
    assert len(asked) == 3


# -----------------------------------------------------------------------------
# full-weight teachers

DELTA_LAYERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "proj_out"]


def _full_teacher(policy, path, seed=0, rank=2, extra=None):
    """A 'fully fine-tuned' transformer: the base's state dict with rank-2 changes to three Linear
    layers (and `extra` {key: change} elsewhere), saved as one .safetensors file."""
    from safetensors.torch import save_file
    from lora import base_weights
    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in base_weights(policy.transformer).items()}
    for layer in DELTA_LAYERS:
        w = state[f"{layer}.weight"]
        w += 0.3 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g) / rank
    for key, change in (extra or {}).items():
        state[key] = state[key] + change
    save_file(state, str(path))
    return state


def test_full_weight_teacher_as_its_own_copy_or_as_a_lora_of_its_delta(policy, tiny_pipe_dir, tmp_path, capsys):
    """--teachers ocr.safetensors holding a full transformer: by default its own frozen copy (its
    rows of a mixed batch are exactly that model's velocity); with a rank, the truncated SVD of
    its delta as a LoRA on the shared base: exact when the delta has that rank, with its error
    reported when not, and the norms and biases it cannot carry reported as dropped."""
    from lora import load_teacher
    from sde_sampler import adapter_velocities
    state = _full_teacher(policy, tmp_path / "ocr.safetensors")
    truth_policy = load_policy(str(tiny_pipe_dir), device="cpu")
    truth_policy.transformer.load_state_dict(state)
    cond = encode(policy, PROMPTS + ["a green triangle"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    truth = velocity(truth_policy, x, 0.7, cond, 4.5)
    base = velocity(truth_policy, x, 0.7, cond, 4.5, transformer=load_policy(str(tiny_pipe_dir), device="cpu").transformer)
    add_student(policy, rank=4, alpha=4)  # the student is on the base too; its zero B changes nothing
    assert load_teacher(policy, tmp_path / "ocr.safetensors", "ocr") == "ocr" and "ocr" in policy.full
    assert "full weights, its own frozen copy of the transformer" in capsys.readouterr().out
    mixed = adapter_velocities(policy, x, 0.7, cond, torch.tensor([4.5, 4.5, 4.5]), ["ocr", BASE, "ocr"])
    torch.testing.assert_close(mixed[[0, 2]], truth[[0, 2]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-4, atol=1e-5)
    assert (truth - base).abs().max() > 1e-2  # the teacher is not the base (the control)
    load_teacher(policy, tmp_path / "ocr.safetensors", "ocr_r2", rank=2)
    assert "rank-2 LoRA of the delta on 3 layers; relative error mean 0.000" in capsys.readouterr().out
    torch.testing.assert_close(adapter_velocities(policy, x, 0.7, cond, 4.5, "ocr_r2"), truth, rtol=1e-3, atol=1e-4)
    _full_teacher(policy, tmp_path / "geneval.safetensors", seed=1, extra={"norm_out.linear.bias": 0.1})
    load_teacher(policy, tmp_path / "geneval.safetensors", "geneval_r1", rank=1)
    line = capsys.readouterr().out
    err = float(line.split("relative error mean ")[1].split(",")[0])
    assert 0.1 < err < 1 and "1 other changed tensors (norms, biases) dropped" in line and "norm_out.linear.bias" in line


def test_full_weights_of_another_architecture_are_refused_naming_the_key(policy, tmp_path):
    from safetensors.torch import save_file
    from lora import base_weights, load_teacher, read_lora
    other_dir = tmp_path / "other"
    build_tiny_pipeline(other_dir, seed=1, num_layers=2, head_dim=16)
    other = load_policy(str(other_dir), device="cpu")
    save_file({k: v.contiguous() for k, v in base_weights(other.transformer).items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors: '\S+' has shape \(\d+,?.*\), the base \(.*another architecture"):
        load_teacher(policy, tmp_path / "other.safetensors", "x")
    mine = {k: v.contiguous() for k, v in base_weights(policy.transformer).items()}
    save_file({**mine, "extra_head.weight": torch.zeros(2, 2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"key 'extra_head.weight' is not in this base's transformer"):
        load_teacher(policy, tmp_path / "extra.safetensors", "x")
    save_file({k: v for k, v in list(mine.items())[1:]}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"1 of the base's tensors missing"):
        load_teacher(policy, tmp_path / "short.safetensors", "x")
    with pytest.raises(ValueError, match=r"holds full transformer weights, not a LoRA; opd_distill.py and sft_coldstart.py take it.*needs LoRAs"):
        read_lora(tmp_path / "extra.safetensors")
    assert not policy.full


@pytest.mark.slow  # the README's test command skips it; .ci/run runs it after
def test_readme_hub_ids_reach_the_download_in_merge_opd_and_eval(policy, tiny_pipe_dir, tmp_path, monkeypatch):
    """The README's GPU recipe, its three scripts with the published ids (the download mocked: a
    tiny LoRA comes back), on the tiny pipeline: each gets past the download and finishes."""
    import huggingface_hub

    import eval as evaluation
    import merge_coldstart
    import opd_distill
    _randomise(add_student(policy, rank=4, alpha=8), 5)
    save_adapter(policy, "student", tmp_path / "published")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(repo_id) or str(tmp_path / "published"))
    T = ["ocr=jieliu/SD3.5M-FlowGRPO-Text", "geneval=jieliu/SD3.5M-FlowGRPO-GenEval"]
    m = ["--model", str(tiny_pipe_dir)]
    merge_coldstart.main(m + ["--teachers", *T, "--method", "exact", "--out", str(tmp_path / "merge")])
    opd_distill.main(m + ["--teachers", *T, "--anchor", "jieliu/SD3.5M-FlowGRPO-PickScore", "--init",
                          str(tmp_path / "merge" / "final"), "--out", str(tmp_path / "opd"), "--resolution", "32",
                          "--t5_tokens", "1", "--num_steps", "2", "--group_size", "2", "--prompts_per_step", "2",
                          "--batch_size", "4", "--max_steps", "1", "--eval_every", "0", "--lora_rank", "4"])
    evaluation.main(m + ["--ckpt", "base", "--ckpt", T[0], "--ckpt", f"opd={tmp_path / 'opd' / 'final'}",
                         "--tasks", "count", "--num_prompts", "1", "--resolution", "32", "--t5_tokens", "1",
                         "--eval_steps", "2", "--out", str(tmp_path / "eval")])
    assert set(asked) == {"jieliu/SD3.5M-FlowGRPO-Text", "jieliu/SD3.5M-FlowGRPO-GenEval",
                          "jieliu/SD3.5M-FlowGRPO-PickScore"}
    assert (tmp_path / "opd" / "final").exists() and (tmp_path / "eval" / "results.json").exists()
