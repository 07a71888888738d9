"""LoRA checkpoints: diffusers round trip, peft folders, several adapters on one base, bad input."""
import pytest
import torch

from pretrain_tiny import build_tiny_pipeline
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
