"""Shared fixtures: one tiny random SD3 pipeline folder per test session (built offline), a policy
on it, and random teacher LoRAs."""
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    from tiny.pretrain import build_tiny_pipeline
    from tiny.world import VOCAB_WORDS
    d = tmp_path_factory.mktemp("tiny_pipe")
    build_tiny_pipeline(d, words=VOCAB_WORDS, seed=0, num_layers=2)
    return d


@pytest.fixture
def policy(tiny_pipe_dir):
    from sde_sampler import load_policy
    return load_policy(str(tiny_pipe_dir), device="cpu")


def random_teacher(policy, folder, name, seed, r, alpha, targets=None, rank_pattern=None, alpha_pattern=None):
    """A random LoRA saved as a diffusers folder; the live adapter stays on the policy."""
    from peft import LoraConfig
    from lora import LORA_TARGETS, save_adapter
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or LORA_TARGETS, rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {}, init_lora_weights="gaussian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy.transformer.add_adapter(config, adapter_name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if f".{name}." in n:
                p.normal_(std=0.1)
    return save_adapter(policy, name, folder)


@pytest.fixture
def teachers(policy, tmp_path):
    """Two teachers of different ranks and alphas; one has a per-layer rank and alpha."""
    t1 = random_teacher(policy, tmp_path / "count", "count", 1, r=4, alpha=8,
                        rank_pattern={"transformer_blocks.0.attn.to_q": 2}, alpha_pattern={"transformer_blocks.0.attn.to_q": 6})
    t2 = random_teacher(policy, tmp_path / "text", "text", 2, r=3, alpha=3)
    return t1, t2
