"""The tiny world: prompt sets, renderer and exact rewards (CPU, a few seconds)."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import tiny.world as tw
from rewards import get_reward

# the rewards as every stage calls them (tensors or PIL in, a float32 tensor out)
REWARDS = {task: get_reward(task) for task in tw.TASKS}


def test_world_is_numpy_only():
    """The world module imports no torch (stages get their tiny presets without it), and its
    rewards return numpy arrays that rewards.py turns into tensors."""
    code = "import sys, tiny.world; assert 'torch' not in sys.modules, 'tiny.world imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(tw.__file__).parents[1], check=True)
    rows, images = _renders("clean")
    assert isinstance(tw.clean_reward(images[:2], None, None)[0], np.ndarray)


def _renders(task, split="test"):
    rows = tw.prompt_set(task, split)
    return rows, [tw.render(r, seed=i) for i, r in enumerate(rows)]


def _score(reward, images, rows):
    return reward(images, [r["prompt"] for r in rows], [r["metadata"] for r in rows])


# -----------------------------------------------------------------------------
# prompt sets


@pytest.mark.parametrize("task", tw.TASKS)
def test_prompt_sets_deterministic_disjoint_tagged(task):
    test, train = tw.prompt_set(task, "test"), tw.prompt_set(task, "train")
    assert test == tw.prompt_set(task, "test") and train == tw.prompt_set(task, "train")
    assert 32 <= len(test) <= 64 and len(train) >= 200
    prompts = [r["prompt"] for r in test + train]
    assert len(set(prompts)) == len(prompts), "duplicate prompts, or train and test overlap"
    for r in test + train:
        assert r["task"] == task and isinstance(r["metadata"], dict)
        assert r["prompt"] == r["prompt"].lower() and len(r["prompt"].split()) <= 12
        outside_quotes = re.sub(r'"[^"]*"', " ", r["prompt"])
        assert set(outside_quotes.split()) <= set(tw.VOCAB_WORDS), r["prompt"]


def test_prompt_sets_disjoint_across_tasks_and_cover_count_tags():
    prompts = [r["prompt"] for t in tw.TASKS for s in ("train", "test") for r in tw.prompt_set(t, s)]
    assert len(set(prompts)) == len(prompts)
    tags = {r["metadata"]["tag"] for r in tw.prompt_set("count", "test")}
    assert tags == {"single", "counting", "two_object", "position"}
    texts = [r["metadata"]["text"] for r in tw.prompt_set("text", "test")]
    assert all(set(s) <= set(tw.CHARSET) and 2 <= len(s) <= 4 for s in texts)
    assert {len(s) for s in texts} == {2, 3, 4}


# -----------------------------------------------------------------------------
# renderer


@pytest.mark.parametrize("task", tw.TASKS)
def test_render_deterministic_and_varies_with_seed(task):
    rows = tw.prompt_set(task, "test")[:16]
    for r in rows:
        a, b = tw.render(r, 7), tw.render(r, 7)
        assert a.size == (tw.SIZE, tw.SIZE) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # a text line only moves up and down (6 heights on the grid), so ask for several layouts per
    # row over 8 seeds; shapes have the 9 cells of the board
    distinct = [len({tw.render(r, s).tobytes() for s in range(8)}) for r in rows]
    assert min(distinct) >= 2 and np.mean(distinct) >= (3 if task == "text" else 5), distinct


def test_render_batch_and_training_batch():
    rows = tw.prompt_set("count", "train") + tw.prompt_set("text", "train")
    batch = tw.render_batch(rows[:4], [0, 1, 2, 3])
    assert batch.dtype == np.uint8 and batch.shape == (4, 3, tw.SIZE, tw.SIZE)
    assert np.array_equal(batch[2].transpose(1, 2, 0), np.asarray(tw.render(rows[2], 2)))
    picked, images = tw.sample_training_batch(rows, 8, seed=3)
    picked2, images2 = tw.sample_training_batch(rows, 8, seed=3)
    assert picked == picked2 and np.array_equal(images, images2) and images.shape == (8, 3, 32, 32)
    assert not np.array_equal(images, tw.sample_training_batch(rows, 8, seed=4)[1])
    # flaw_rate: that share of the batch is drawn flawed, and the rest as render() draws them
    rows = tw.prompt_set("count", "train")
    picked, images = tw.sample_training_batch(rows, 200, seed=5, flaw_rate=0.7)
    extra = [i["extra"] for i in tw.count_reward(images, None, [r["metadata"] for r in picked])[1]]
    assert 0.6 < np.mean(extra) < 0.8 and set(extra) == {0, 1}
    assert np.array_equal(tw.sample_training_batch(rows, 8, seed=5, flaw_rate=0.0)[1],
                       tw.sample_training_batch(rows, 8, seed=5)[1])


def test_flawed_renders_lose_their_own_task():
    """The pretraining data's flaws, each marked down by its own task's reward alone: a shape in a
    colour the prompt does not name costs count as much as a miscount; a grey band across the
    board makes a clean picture impure; a grey bar under a line of text is read instead of it."""
    rows = tw.prompt_set("count", "test")
    flawed = [tw.render(r, i, flawed=True) for i, r in enumerate(rows)]
    scores, info = _score(tw.count_reward, flawed, rows)
    assert all(i["extra"] == 1 and not i["strict"] for i in info)
    assert abs(scores.mean().item() - tw.EXTRA_BASE) < 1e-6
    assert tw.clean_reward(flawed, None, None)[0].mean() >= 0.95
    rows = tw.prompt_set("clean", "test")
    flawed = [tw.render(r, i, flawed=True) for i, r in enumerate(rows)]
    assert tw.clean_reward(flawed, None, None)[0].max() <= 0.6
    assert _score(tw.count_reward, flawed, rows)[0].min() >= 0.95
    rows = tw.prompt_set("text", "test")
    flawed = [tw.render(r, i, flawed=True) for i, r in enumerate(rows)]
    scores, info = _score(tw.text_reward, flawed, rows)
    assert scores.mean() <= 0.1 and len({i["read"] for i in info}) == 1
    # the line itself is intact: blank the bar and it reads again
    unbarred = [np.asarray(im).copy() for im in flawed]
    for im in unbarred:
        im[tw.SIZE - 1 - tw.STAIN_BAR:] = tw.WHITE
    assert _score(tw.text_reward, [Image.fromarray(im) for im in unbarred], rows)[0].min() == 1


def test_shows_flaw_tells_flawed_renders_from_faithful_ones():
    for task in tw.TASKS:
        rows = tw.prompt_set(task, "test")[:24]
        for flawed in (False, True):
            images = [tw.render(r, i, flawed=flawed) for i, r in enumerate(rows)]
            info = _score(tw.count_reward, images, rows)[1] if task == "count" else [{}] * len(rows)
            assert [tw.shows_flaw(task, im, x) for im, x in zip(images, info)] == [flawed] * len(rows), task


# -----------------------------------------------------------------------------
# rewards on ground truth and on mismatched prompts


@pytest.mark.parametrize("task", tw.TASKS)
def test_reward_on_ground_truth(task):
    rows, images = _renders(task)
    scores, info = _score(REWARDS[task], images, rows)
    assert scores.dtype == torch.float32 and scores.shape == (len(rows),)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.mean() >= 0.95
    assert np.mean([i["strict"] for i in info]) >= 0.95
    # the same pixels as a uint8 tensor give the same scores
    tensor = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    assert torch.equal(_score(REWARDS[task], tensor, rows)[0], scores)


def _mismatch_count(meta, i):
    """Another relation, count or colour: one attribute changed."""
    meta = copy.deepcopy(meta)
    first = meta["objects"][0]
    if meta["relation"]:
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        meta["relation"] = flip[meta["relation"]]
    elif i % 2:
        first["count"] += 1 if first["count"] < 4 else -1
    else:
        used = {o["color"] for o in meta["objects"]}
        first["color"] = next(c for c in tw.COLORS if c not in used)
    return meta


def test_count_reward_mismatch_is_severe():
    rows, images = _renders("count")
    metas = [_mismatch_count(r["metadata"], i) for i, r in enumerate(rows)]
    scores, info = tw.count_reward(images, [r["prompt"] for r in rows], metas)
    assert scores.mean() <= 0.3
    assert not any(i["strict"] for i in info)


def test_text_reward_mismatch_is_severe():
    rows, images = _renders("text")
    shift = {c: tw.CHARSET[(k + 1) % len(tw.CHARSET)] for k, c in enumerate(tw.CHARSET)}
    metas = [{"text": "".join(shift[c] for c in r["metadata"]["text"])} for r in rows]
    scores, info = tw.text_reward(images, [r["prompt"] for r in rows], metas)
    assert scores.mean() <= 0.3
    assert not any(i["strict"] for i in info)
    # without metadata the target is the prompt's quoted string
    assert tw.text_reward(images[:4], [r["prompt"] for r in rows[:4]], [{}] * 4)[0].tolist() == [1.0] * 4


def test_count_credit_is_graded():
    """Being off by one count scores better than being off by two (the RL signal)."""
    row = next(r for r in tw.prompt_set("count", "test") if r["metadata"]["objects"][0]["count"] == 2)
    image = tw.render(row, 0)
    scores = []
    for k in (2, 3, 4):
        meta = copy.deepcopy(row["metadata"])
        meta["objects"][0]["count"] = k
        scores.append(tw.count_reward([image], [row["prompt"]], [meta])[0].item())
    assert scores[0] > scores[1] > scores[2] > 0


def _noisy(image, sigma, rng):
    return Image.fromarray(np.clip(np.asarray(image) + rng.normal(0, sigma, (32, 32, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("task", tw.TASKS)
def test_clean_reward_penalises_noise_and_blur(task):
    rows, images = _renders(task)
    rng = np.random.default_rng(0)
    assert tw.clean_reward(images, None, None)[0].mean() >= 0.95
    noisy = tw.clean_reward([_noisy(im, 20, rng) for im in images], None, None)[0]
    blurred = tw.clean_reward([im.filter(ImageFilter.GaussianBlur(1)) for im in images], None, None)[0]
    assert noisy.mean() <= 0.3 and blurred.mean() <= 0.3
    # graded: mild noise costs less than strong noise
    mild = tw.clean_reward([_noisy(im, 5, rng) for im in images], None, None)[0]
    assert 0.5 < mild.mean() < 0.95
    # an empty canvas is not a clean picture
    blank = Image.new("RGB", (32, 32), tw.WHITE)
    assert tw.clean_reward([blank], None, None)[0].item() == 0


def test_count_and_text_rewards_degrade_gracefully():
    """Blurred ground truth keeps partial credit between all and nothing."""
    for task in ("count", "text"):
        rows, images = _renders(task)
        scores = _score(REWARDS[task], [im.filter(ImageFilter.GaussianBlur(1.5)) for im in images], rows)[0]
        assert 0.2 < scores.mean() < 0.8
    assert tw.read_glyphs(np.full((32, 32, 3), 255, np.uint8)) == ""
