"""Shared fixtures: one tiny random SD3 pipeline folder per test session (built offline)."""
import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    from sde_sampler import build_tiny_pipeline
    from tinyworld import VOCAB_WORDS
    d = tmp_path_factory.mktemp("tiny_pipe")
    build_tiny_pipeline(d, words=VOCAB_WORDS, seed=0, num_layers=2)
    return d


@pytest.fixture
def policy(tiny_pipe_dir):
    from sde_sampler import load_policy
    return load_policy(str(tiny_pipe_dir), device="cpu")
