"""The README's paper-table command, as written, on the SD3.5-M miniature: the official prompt files'
formats (GenEval's metadata .jsonl, Flow-GRPO's .txt), the rewards and quality metrics as tiny
random models of their real classes, the hub checkpoints as local random LoRAs; cut short only by
flags added at the end (fewer prompts and steps, the miniature's size)."""
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

import common
import eval as evaluation
import rewards
from lora import add_student, save_adapter
from tools.sd35_miniature import build_sd35_miniature
from sde_sampler import load_policy
from test_metrics import (lively_clip, original_imagereward_state, random_head_state, tiny_bert_tokenizer,
                          tiny_blip_config)
from test_rewards import tiny_clip, tiny_mask2former

REPO = Path(__file__).resolve().parents[1]
METRICS = ["pickscore", "imagereward", "hps", "aesthetic", "clipscore"]


def readme_command():
    """The arguments of the README's `python eval.py ...` under "The paper's table in one command"."""
    section = (REPO / "README.md").read_text().split("**The paper's table in one command.**")[1]
    command = re.search(r"\n    (python eval\.py .*?)\n\n", section.replace("\\\n", " "), re.S).group(1)
    return shlex.split(command)[2:]


@pytest.fixture
def tiny_reward_models(tmp_path, monkeypatch):
    """Every reward and metric the command names, as a tiny random model of its real class."""
    detector, detector_processor = tiny_mask2former("dog")
    clip, clip_processor = tiny_clip(tmp_path)
    monkeypatch.setitem(rewards.MODELS, "geneval", {"detector": detector, "detector_processor": detector_processor,
                                                    "clip": clip, "clip_processor": clip_processor})
    pick, pick_processor = tiny_clip(tmp_path, seed=1)
    with torch.no_grad():
        pick.logit_scale.fill_(math.log(100.0))
    monkeypatch.setitem(rewards.MODELS, "pickscore", {"model": pick, "processor": pick_processor})
    tokenizer = tiny_bert_tokenizer(tmp_path)
    config = tiny_blip_config(len(tokenizer))
    imagereward = rewards.ImageRewardModel(config).eval()
    imagereward.load_state_dict(rewards.imagereward_state_dict(original_imagereward_state(config)))
    monkeypatch.setitem(rewards.MODELS, "imagereward", {"model": imagereward, "tokenizer": tokenizer})
    hps, hps_tokenizer = lively_clip(tmp_path, seed=1)
    monkeypatch.setitem(rewards.MODELS, "hps", {"model": hps, "tokenizer": hps_tokenizer})
    aesthetic_clip, _ = lively_clip(tmp_path, seed=2)
    head = rewards.RatingHead(16).eval()
    head.load_state_dict(random_head_state(16))
    monkeypatch.setitem(rewards.MODELS, "aesthetic", {"model": aesthetic_clip, "head": head})
    clipscore, clip_tokenizer = lively_clip(tmp_path, seed=3)
    monkeypatch.setitem(rewards.MODELS, "clipscore", {"model": clipscore, "tokenizer": clip_tokenizer})


def test_the_readme_paper_command_on_the_miniature(tmp_path, tiny_reward_models, monkeypatch):
    args = readme_command()
    cfg = common.parse_config(evaluation.DEFAULTS, evaluation.PRESETS, args)
    # the paper's settings are the defaults: 40 ODE steps, CFG 4.5, 512 px; 4 images per GenEval prompt
    assert (cfg["eval_steps"], cfg["guidance"], cfg["resolution"], cfg["images_per_prompt"]) == (40, 4.5, 512,
                                                                                                 "geneval=4")
    assert cfg["metrics"].split(",") == METRICS and cfg["tasks"] == "geneval,ocr,pickapic"

    # the official files, in their formats, at the paths the command names (relative: run from tmp_path)
    monkeypatch.chdir(tmp_path)
    files = dict(spec.split("=", 1) for spec in cfg["prompts"])
    geneval = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
               {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
                "prompt": "a photo of two dogs"}]
    for name, lines in [("geneval", [json.dumps(m) for m in geneval]),
                        ("ocr", ['A storefront sign reading "OPEN"', 'A poster with the words "Flow OPD"']),
                        ("pickapic", ["a cozy cabin in the snow", "an astronaut riding a horse"])]:
        Path(files[name]).parent.mkdir(parents=True, exist_ok=True)
        Path(files[name]).write_text("\n".join(lines) + "\n")
    # the hub teachers and runs/opd/final as random LoRAs on the miniature, under the command's names
    build_sd35_miniature(tmp_path / "mini")
    policy = load_policy(str(tmp_path / "mini"), device="cpu", t5_tokens=8)
    params = add_student(policy, rank=4, alpha=8)
    sources = {}
    for k, spec in enumerate(s for s in cfg["ckpt"] if "=" in s):
        name, source = spec.split("=", 1)
        torch.manual_seed(k)
        with torch.no_grad():
            for p in params:
                p.normal_(std=0.05)
        folder = Path(source) if source.startswith("runs/") else tmp_path / "hub" / name
        sources[source] = str(save_adapter(policy, "student", folder))

    def local(arg):
        name, sep, source = arg.partition("=")
        return f"{name}={sources[source]}" if sep and source in sources else arg
    args = [local(a) for a in args]

    results = evaluation.main(args + ["--model", str(tmp_path / "mini"), "--num_prompts", "2", "--eval_steps", "2",
                                      "--resolution", "64", "--t5_tokens", "8", "--batch_size", "4",
                                      "--grid_prompts", "1"])
    assert list(results) == ["base", "ocr", "geneval", "student"]
    for res in results.values():
        assert list(res) == ["geneval", "ocr", *METRICS]  # pickapic has no reward: only the metrics score it
        assert res["geneval"]["n"] == 2 * 4 and res["ocr"]["n"] == 2 and "strict" in res["geneval"]
        for m in METRICS:
            assert {s: v["n"] for s, v in res[m]["sets"].items()} == {"geneval": 8, "ocr": 2, "pickapic": 2}
    details = [json.loads(line) for line in open(cfg["out"] + "/details.jsonl")]
    pick = [d for d in details if d["task"] == "pickscore"]
    assert len(pick) == 4 * 12 and all(d["score"] == d["info"]["pickscore"] for d in pick)  # its published scale
    assert any(abs(d["score"]) > 1 for d in pick)  # not the reward's / 26 clipped to [0, 1]
    table = (Path(cfg["out"]) / "results.md").read_text()
    assert all(f"`{m}` per prompt set" in table for m in METRICS)
    assert "images per prompt geneval 4, ocr 1, pickapic 1" in table


@pytest.mark.parametrize("metric, model_id", [
    ("imagereward", "THUDM/ImageReward"), ("hps", "xswu/HPSv2"), ("aesthetic", "camenduru/improved-aesthetic-predictor"),
    ("clipscore", "openai/clip-vit-large-patch14"), ("pickscore", "yuvalkirstain/PickScore_v1")])
def test_eval_refuses_a_metric_offline_in_one_line(tiny_pipe_dir, tmp_path, metric, model_id, monkeypatch):
    """Offline (the tests run with HF_HUB_OFFLINE=1) eval.py --metrics stops at start-up, before any
    sampling, in one line naming the metric and the model id it could not load."""
    monkeypatch.delitem(rewards.MODELS, metric, raising=False)
    monkeypatch.delitem(rewards.MODELS, "aesthetic" if metric == "clipscore" else "clipscore", raising=False)
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--model", str(tiny_pipe_dir), "--tasks", "count", "--metrics", metric, "--out",
                         str(tmp_path / "e")])
    message = str(stop.value)
    assert message.startswith(f"error: reward {metric!r} cannot load") and model_id in message
    assert "\n" not in message and not (tmp_path / "e" / "cache").exists()
