"""Rewards: OCR on Pillow-rendered text, GenEval rules on hand-built detections, GenEval and
PickScore plumbing on tiny random models built in-process, combinations, the registry."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import rewards

# -----------------------------------------------------------------------------
# helpers


def render(text, size=512, font_size=56):
    """Black text centred on white, in Pillow's bundled font (there on any machine)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - (x1 - x0)) / 2 - x0, (size - (y1 - y0)) / 2 - y0), text, fill="black", font=font)
    return image


def noise_images(n, size=96, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_clip(tmp_path, seed=0):
    """A random CLIPModel and a CLIPProcessor whose tokenizer is built from files written here."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    chars = [chr(i) for i in range(33, 127)]  # printable ASCII: byte-level symbols equal the chars
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_mask2former(favourite="dog", seed=0):
    """A random Mask2Former (tiny Swin backbone) labelled with detector-style COCO names, whose
    class head is biased so that every query says `favourite`: random weights alone never
    clear GenEval's 0.3 threshold, and the test needs detections to flow through."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessor, SwinConfig)
    names = ["mouse" if c == "computer mouse" else c for c in rewards.COCO_CLASSES]
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32,
                               encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=8, common_stride=4,
                               id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[rewards.COCO_CLASSES.index(favourite)] = 20.0
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    return model, processor

# -----------------------------------------------------------------------------
# OCR


def test_quoted_text_variants():
    assert rewards.quoted_text('a sign that says "Hello World" and "Bye"') == "Hello World"
    assert rewards.quoted_text("a mug with “Good Morning” on it") == "Good Morning"
    assert rewards.quoted_text("a shop's sign reading 'OPEN now'") == "OPEN now"
    assert rewards.quoted_text("a 'fancy' banner saying \"SALE\"") == "SALE"  # double quotes win
    assert rewards.quoted_text("don't stop, it's late") is None
    assert rewards.quoted_text('an empty "" sign') is None


def test_text_similarity_by_hand():
    assert rewards.text_similarity("Helo World", "hello world") == pytest.approx(1 - 1 / 10)
    assert rewards.text_similarity("WELCOME TO hello world ok", "Hello World") == 1.0  # substring
    assert rewards.text_similarity("", "cat") == 0.0
    assert rewards.text_similarity("dogdogdogdog", "cat") == 0.0  # distance capped at n
    assert rewards.text_similarity("cut", "cat") == pytest.approx(2 / 3)


def test_reading_order():
    # two lines; the second word of line one sits 6 px higher than the first, a real OCR jitter
    boxes = [(300, 100, 400, 140), (10, 200, 90, 240), (10, 106, 200, 146), (120, 205, 220, 245)]
    assert rewards.reading_order(boxes) == [2, 0, 1, 3]


def test_ocr_right_text_high_other_word_low_blank_zero():
    images = [render("Hello World"), render("OPEN 24"), render("Banana"), Image.new("RGB", (512, 512), "white")]
    prompts = ['A sign that reads "Hello World"', 'A shop sign saying "open 24"',
               'A sign that reads "Hello World"', 'A sign that reads "Hello World"']
    scores, info = rewards.get_reward("ocr")(images, prompts, None)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores[0] >= 0.9 and scores[1] >= 0.9, info
    assert scores[2] <= 0.5, info
    assert scores[3] == 0.0 and info[3]["read"] == ""
    assert info[0]["target"] == "Hello World" and info[0]["strict"] is bool(scores[0] == 1)


def test_ocr_tensor_input_matches_pil():
    image = render("Hello World")
    batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    pil_scores, pil_info = rewards.ocr_reward([image], ['"Hello World"'])
    t_scores, t_info = rewards.ocr_reward(batch, ['"Hello World"'])
    assert torch.equal(pil_scores, t_scores) and pil_info[0]["read"] == t_info[0]["read"]


def test_ocr_rejects_unquoted_prompt():
    with pytest.raises(ValueError, match="no quoted text"):
        rewards.ocr_reward([render("Hi")], ["a sign that says hi"])

# -----------------------------------------------------------------------------
# GenEval rules on hand-built detections


def obj(box, color=None, score=0.95):
    return {"box": box, "score": score, "color": color}


LEFT, RIGHT = (0, 200, 100, 300), (300, 200, 400, 300)  # same row, far apart
TOP, BOTTOM = (200, 0, 300, 100), (200, 300, 300, 400)  # same column, far apart


def two_cats():
    return {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}


@pytest.mark.parametrize("n, partial, strict", [
    (0, (0 + 1) / 2, False),         # count term 0/2, exclude fine
    (1, (0.5 + 1) / 2, False),       # under: 1/2
    (2, 1.0, True),
    (3, (1 + 0.5) / 2, False),       # over: 1 excess over 2 allowed
    (4, (1 + 0.0) / 2, False),       # 2 excess over 2 allowed
])
def test_rules_counting_over_and_under(n, partial, strict):
    objects = {"cat": [obj((i * 50, 0, i * 50 + 40, 40)) for i in range(n)]} if n else {}
    got = rewards.geneval_rules(objects, two_cats())
    assert got[0] == pytest.approx(partial) and got[1] is strict


def test_rules_wrong_colour():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert rewards.geneval_rules({"car": [obj(LEFT, "red")]}, meta)[:2] == (1.0, True)
    partial, strict, reasons = rewards.geneval_rules({"car": [obj(LEFT, "blue")]}, meta)
    assert (partial, strict) == (0.5, False) and "red" in reasons[0]
    # only the most confident object counts: a red car behind a blue one does not help
    partial, strict, _ = rewards.geneval_rules({"car": [obj(LEFT, "blue"), obj(RIGHT, "red", 0.5)]}, meta)
    assert (partial, strict) == (0.5, False)


def test_rules_colour_attribution():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "dog", "count": 1, "color": "blue"}]}
    good = {"car": [obj(LEFT, "red")], "dog": [obj(RIGHT, "blue")]}
    swapped = {"car": [obj(LEFT, "blue")], "dog": [obj(RIGHT, "red")]}
    assert rewards.geneval_rules(good, meta)[:2] == (1.0, True)
    assert rewards.geneval_rules(swapped, meta)[:2] == (0.5, False)  # terms 1, 0, 1, 0


def position(rel):
    """'a dog <rel> a cat': the cat (target) is clause 0."""
    return {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": [rel, 0]}]}


@pytest.mark.parametrize("dog, cat, rel, strict", [
    (LEFT, RIGHT, "left of", True), (RIGHT, LEFT, "left of", False),
    (RIGHT, LEFT, "right of", True), (LEFT, RIGHT, "right of", False),
    (TOP, BOTTOM, "above", True), (BOTTOM, TOP, "above", False),
    (BOTTOM, TOP, "below", True), (TOP, BOTTOM, "below", False),
])
def test_rules_positions(dog, cat, rel, strict):
    partial, ok, _ = rewards.geneval_rules({"dog": [obj(dog)], "cat": [obj(cat)]}, position(rel))
    assert ok is strict and partial == pytest.approx(1.0 if strict else 2 / 3)  # terms 1, 1, position


def test_rules_position_without_target():
    partial, strict, reasons = rewards.geneval_rules({"dog": [obj(LEFT)]}, position("left of"))
    assert partial == pytest.approx(1 / 3) and not strict  # cat 0, dog 1, no pair 0
    assert any("no target" in r for r in reasons)


def test_relative_position_by_hand():
    # centres 15 px apart, dead zone 0.1 * (100 + 100) = 20 px: no relation
    assert rewards.relative_position((0, 0, 100, 100), (15, 0, 115, 100)) == set()
    # offset (-100, -100), dead zone 2 px each way: (-98, -98) / 141.4 = -0.69 on both axes
    assert rewards.relative_position((0, 0, 10, 10), (100, 100, 110, 110)) == {"left of", "above"}
    # offset (-30, 0) with dead zone 20 -> (-10, 0) / 30: dx = -0.33, not enough
    assert rewards.relative_position((0, 0, 100, 100), (30, 0, 130, 100)) == set()


def test_rules_exclusions():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": 1}]}
    assert rewards.geneval_rules({"dog": [obj(LEFT)]}, meta)[:2] == (1.0, True)
    partial, strict, reasons = rewards.geneval_rules({"dog": [obj(LEFT)], "cat": [obj(RIGHT)]}, meta)
    assert (partial, strict) == (0.5, False) and "cat<1" in reasons[0]


def test_keep_objects_thresholds_and_cap():
    dets = [{"class": "cat", "score": s, "box": (0, 0, 1, 1)} for s in (0.5, 0.95, 0.2)]
    dets += [{"class": "dog", "score": 0.99, "box": (0, 0, 1, 1)} for _ in range(20)]
    counting, other = rewards.keep_objects(dets, "counting"), rewards.keep_objects(dets, "two_object")
    assert [d["score"] for d in counting["cat"]] == [0.95]
    assert [d["score"] for d in other["cat"]] == [0.95, 0.5]  # most confident first
    assert len(other["dog"]) == rewards.GENEVAL_MAX_OBJECTS == 16
    assert "cat" not in rewards.keep_objects(dets[2:3], "two_object")

# -----------------------------------------------------------------------------
# GenEval and PickScore plumbing on tiny random models


@pytest.fixture
def tiny_geneval(tmp_path, monkeypatch):
    detector, detector_processor = tiny_mask2former("computer mouse")
    clip, clip_processor = tiny_clip(tmp_path)
    models = {"detector": detector, "detector_processor": detector_processor, "clip": clip, "clip_processor": clip_processor}
    monkeypatch.setitem(rewards.MODELS, "geneval", models)
    return models


def test_geneval_plumbing_tiny_models(tiny_geneval):
    images = noise_images(4)
    metadata = [
        {"tag": "single_object", "include": [{"class": "computer mouse", "count": 1}]},  # via the "mouse" alias
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": "red"}]},
        {"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
         "exclude": [{"class": "computer mouse", "count": 3}]},
    ]
    scores, info = rewards.get_reward("geneval")(images, [""] * 4, metadata)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    boxes = info[0]["detected"]["computer mouse"]
    assert 1 <= len(boxes) <= 8 and all(0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 for x0, y0, x1, y1 in boxes)
    assert (scores[0].item(), info[0]["strict"]) == (1.0, True)
    assert (scores[1].item(), info[1]["strict"]) == (0.0, False)
    [color] = info[2]["colors"]["computer mouse"]
    assert color in rewards.COLORS
    assert scores[2].item() == (1.0 if color == "red" else 0.5) and info[2]["strict"] is (color == "red")
    assert set(tiny_geneval["color_classifiers"]) == {"computer mouse"}  # text side cached per class
    # random masks score about 0.5: above 0.3, below the 0.9 that counting prompts use
    assert info[3]["detected"] == {} and scores[3].item() == 0.5


def test_geneval_tensor_input(tiny_geneval):
    images = noise_images(2)
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # (B, H, W, 3)
    meta = [{"tag": "single_object", "include": [{"class": "computer mouse", "count": 1}]}] * 2
    s_pil, i_pil = rewards.geneval_reward(images, ["", ""], meta)
    s_ten, i_ten = rewards.geneval_reward(batch, ["", ""], meta)
    assert torch.equal(s_pil, s_ten) and i_pil[0]["detected"] == i_ten[0]["detected"]


@pytest.fixture
def tiny_pickscore(tmp_path, monkeypatch):
    model, processor = tiny_clip(tmp_path, seed=0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    monkeypatch.setitem(rewards.MODELS, "pickscore", {"model": model, "processor": processor})
    return model, processor


def test_pickscore_plumbing_tiny_clip(tiny_pickscore):
    model, processor = tiny_pickscore
    images, prompts = noise_images(3, seed=1), ["a red dog", "two cats on a mat", "hello"]
    scores, info = rewards.get_reward("pickscore")(images, prompts, None)
    with torch.no_grad():  # one pair at a time, by hand: 100 * cosine
        expected = []
        for image, prompt in zip(images, prompts):
            pix = processor(images=[image], return_tensors="pt")["pixel_values"]
            tok = processor(text=[prompt], return_tensors="pt")
            i = rewards._embeddings(model.get_image_features(pixel_values=pix))
            t = rewards._embeddings(model.get_text_features(**tok))
            expected.append(100.0 * (i * t).sum().item())
    raw = torch.tensor([row["pickscore"] for row in info])
    assert torch.allclose(raw, torch.tensor(expected), atol=1e-4)
    assert torch.allclose(scores, (raw / 26).clamp(0, 1))
    _, reversed_info = rewards.pickscore_reward(images, prompts[::-1])
    assert reversed_info[0]["pickscore"] != pytest.approx(raw[0].item())  # image i is paired with prompt i

# -----------------------------------------------------------------------------
# combinations and registry


def fake(values, strict=None):
    def reward(images, prompts, metadata=None):
        info = [{} if strict is None else {"strict": s} for s in (strict or values)]
        return torch.tensor(values, dtype=torch.float32), info
    return reward


def test_weighted_combination_by_hand(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "a", fake([1.0, 0.5], strict=[True, False]))
    monkeypatch.setitem(rewards.REWARDS, "b", fake([0.0, 1.0]))
    scores, info = rewards.parse_reward_spec("a:0.8, b:0.2")([None, None], ["", ""], None)
    assert torch.allclose(scores, torch.tensor([0.8, 0.6]))
    assert info[0]["a"]["score"] == 1.0 and info[1]["b"]["score"] == 1.0
    assert [row["strict"] for row in info] == [True, False]
    only_b = rewards.parse_reward_spec("b")([None, None], ["", ""], None)
    assert torch.equal(only_b[0], torch.tensor([0.0, 1.0])) and "strict" not in only_b[1][0]


def test_combination_ocr_and_pickscore(tiny_pickscore):
    images, prompts = [render("Hello World"), render("Banana")], ['"Hello World"', '"Hello World"']
    ocr, _ = rewards.ocr_reward(images, prompts)
    pick, _ = rewards.pickscore_reward(images, prompts)
    scores, info = rewards.parse_reward_spec("ocr:0.8,pickscore:0.2")(images, prompts, None)
    assert torch.allclose(scores, 0.8 * ocr + 0.2 * pick)
    assert info[0]["strict"] is info[0]["ocr"]["strict"] and "pickscore" in info[0]["pickscore"]


def test_unknown_reward_and_bad_specs():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*geneval.*ocr.*pickscore"):
        rewards.get_reward("nope")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.parse_reward_spec("ocr:0.5,nope:0.5")
    with pytest.raises(ValueError, match="bad reward spec"):
        rewards.parse_reward_spec("ocr:lots")


def test_tiny_world_rewards_are_registered_and_imported_lazily(monkeypatch):
    assert {"count", "text", "clean"} <= set(rewards.REWARDS)
    calls = []
    world = types.SimpleNamespace(text_reward=lambda *a: calls.append(a) or (np.ones(1, np.float32), [{}]))
    monkeypatch.setitem(sys.modules, "tinyworld", world)
    image = Image.new("RGB", (4, 4))
    scores, _ = rewards.get_reward("text")([image], ['"ab"'], [{}])
    # called on first use, with PIL images; its numpy scores come back as a tensor
    assert isinstance(scores, torch.Tensor) and scores.tolist() == [1.0] and calls == [([image], ['"ab"'], [{}])]


def test_to_pil_layouts():
    x = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    a, b = rewards.to_pil(x), rewards.to_pil(x.permute(0, 3, 1, 2))
    c = rewards.to_pil(x.float() / 255)
    assert a[0].size == (7, 5) and np.array_equal(np.asarray(a[1]), x[1].numpy())
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(a + a, b + c))


def test_set_device_moves_loaded_models(monkeypatch):
    layer = torch.nn.Linear(2, 2)
    monkeypatch.setitem(rewards.MODELS, "probe", {"model": layer, "processor": object()})
    monkeypatch.setattr(rewards, "DEVICE", rewards.DEVICE)
    rewards.set_device("meta")
    assert rewards.DEVICE == "meta" and layer.weight.device.type == "meta"
