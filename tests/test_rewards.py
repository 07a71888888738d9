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
import tiny

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
    assert rewards.quoted_text('a neon sign saying "OPEN LATE') == "OPEN LATE"  # unclosed: to the end
    assert rewards.quoted_text('a "Hi \tthere" mug') == "Hi \tthere"  # kept as written; normalize_text trims
    assert rewards.quoted_text("a mug with “Good Morning” on it") == "Good Morning"
    assert rewards.quoted_text("a shop's sign reading 'OPEN now'") == "OPEN now"
    assert rewards.quoted_text("a 'fancy' banner saying \"SALE\"") == "SALE"  # a straight double quote wins
    assert rewards.quoted_text("don't stop, it's late") is None
    assert rewards.quoted_text('an empty "" sign') is None  # Flow-GRPO would divide by zero
    assert rewards.quoted_text('a blank "  " sign') is None


def test_text_similarity_by_hand():
    assert rewards.text_similarity("Helo World", "hello world") == pytest.approx(1 - 1 / 10)
    assert rewards.text_similarity("WELCOME TO hello world ok", "Hello World") == 1.0  # substring
    assert rewards.text_similarity("", "cat") == 0.0
    assert rewards.text_similarity("dogdogdogdog", "cat") == 0.0  # distance capped at n
    assert rewards.text_similarity("cut", "cat") == pytest.approx(2 / 3)
    # only spaces are removed, as in Flow-GRPO: a tab costs one edit on either side
    assert rewards.text_similarity("hello\tworld", "hello world") == pytest.approx(1 - 1 / 10)
    assert rewards.text_similarity("hello world", "hello\tworld") == pytest.approx(1 - 1 / 11)


def corners(*tops):
    """Quads' first corners (top-left) from (x, y) pairs."""
    return [np.array([x, y], float) for x, y in tops]


def test_paddle_order_by_hand():
    # one line with 4 px jitter: sorted by top (C, B, A), each box then moves left past the
    # boxes before it while the tops are within 10 px: B before C, A before C and before B
    assert rewards.paddle_order(corners((10, 108), (150, 104), (300, 100))) == [0, 1, 2]
    # tops 8 px apart in a row, 16 px end to end: B moves before C; A stops at C (16 px) and
    # never reaches B, so a slanted line reads B C A
    assert rewards.paddle_order(corners((100, 16), (200, 8), (300, 0))) == [1, 2, 0]
    # a big word whose top is 15 px above its smaller neighbour on the left is read first
    assert rewards.paddle_order(corners((20, 115), (300, 100))) == [1, 0]
    # two lines: by top; the second line's words left to right
    assert rewards.paddle_order(corners((200, 300), (10, 10), (20, 305), (300, 12))) == [1, 3, 2, 0]


class FakeOCR:
    """Stands in for RapidOCR's engine: each call returns the next layout, a list of (text, x, y,
    width, height) boxes as RapidOCR gives them (quads, top-left corner first), or raises it
    when it is an exception. Keeps what it was called with."""

    def __init__(self, *layouts):
        self.layouts, self.calls = list(layouts), []

    def __call__(self, image):
        self.calls.append(image)
        layout = self.layouts.pop(0)
        if isinstance(layout, Exception):
            raise layout
        quads = [[[x, y], [x + w, y], [x + w, y + h], [x, y + h]] for _, x, y, w, h in layout]
        return types.SimpleNamespace(txts=tuple(t for t, *_ in layout), boxes=np.array(quads, float).reshape(-1, 4, 2),
                                     scores=tuple(0.99 for _ in layout))


def test_ocr_reward_scores_as_flow_grpo_on_faked_layouts(monkeypatch):
    """Expected values by hand from Flow-GRPO's rule: the texts joined in PaddleOCR's order with
    no separator, spaces removed, lower case, 1 - min(edit distance, n) / n."""
    engine = FakeOCR(
        [("AB", 20, 115, 120, 50), ("C", 300, 100, 80, 80)],   # C's top is 15 px higher: read "cab"
        [("C", 300, 0, 60, 40), ("B", 200, 8, 60, 40), ("A", 100, 16, 60, 40)],  # slanted: "bca"
        [("THREE", 300, 100, 150, 40), ("TWO", 150, 104, 120, 40), ("ONE", 10, 108, 120, 40)],
        [("HELLO WORLD", 10, 10, 300, 40)],
        [("HELLO\tWORLD", 10, 10, 300, 40)],
        [("LATE", 200, 50, 100, 40), ("OPEN", 10, 52, 100, 40)],
        [],
    )
    monkeypatch.setitem(rewards.MODELS, "ocr", engine)
    prompts = ['"ABC"', '"ABC"', 'a sign, "one two three"', 'a sign "HELLO\tWORLD"', '"HELLO WORLD"',
               'a neon sign saying "OPEN LATE', '"x"']
    images = [Image.new("RGB", (64, 64), (i, 2 * i, 3 * i)) for i in range(len(prompts))]
    scores, info = rewards.ocr_reward(images, prompts)
    # "cab" -> "abc" and "bca" -> "abc": every position differs, so 2 edits (delete one end, add the other)
    expected = [1 - 2 / 3, 1 - 2 / 3, 1.0,
                1 - 1 / 11,  # target "hello\tworld" keeps its tab, the read text has none: 1 insertion
                1 - 1 / 10,  # the read tab against "helloworld": 1 deletion
                1.0,         # unclosed quote: the target runs to the end
                0.0]
    assert scores.tolist() == pytest.approx(expected)
    assert [i["read"] for i in info[:3]] == ["CAB", "BCA", "ONETWOTHREE"] and info[5]["read"] == "OPENLATE"
    assert [i["strict"] for i in info] == [s == 1.0 for s in expected] and not any(i["failed"] for i in info)
    # the engine gets each image's RGB array as it is (Flow-GRPO hands PaddleOCR np.array(image))
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, np.asarray(im)) for a, im in zip(engine.calls, images))


def test_ocr_failed_read_scores_zero_with_a_warning(monkeypatch):
    engine = FakeOCR([("HI", 0, 0, 10, 10)], RuntimeError("onnxruntime: bad input\nmore"), [("HI", 0, 0, 10, 10)])
    monkeypatch.setitem(rewards.MODELS, "ocr", engine)
    with pytest.warns(RuntimeWarning, match=r"OCR engine failed on image 1 of the batch, scored 0 \(RuntimeError: onnxruntime: bad input\)"):
        scores, info = rewards.ocr_reward(noise_images(3, size=16), ['"hi"'] * 3)
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert [i["failed"] for i in info] == [False, True, False] and info[1]["strict"] is False
    assert info[1]["error"] == "RuntimeError: onnxruntime: bad input" and info[1]["read"] == ""


def test_ocr_engine_is_set_like_paddleocr():
    """Flow-GRPO's PaddleOCR 2.9 (lang="en", no angle classifier, default detector settings),
    as far as RapidOCR's own config goes."""
    engine = rewards._models("ocr", rewards._load_ocr)
    det = engine.cfg.Det
    assert engine.cfg.Global.use_cls is False and engine.use_cls is False
    assert (det.box_thresh, det.unclip_ratio, det.use_dilation, det.thresh) == (0.6, 1.5, False, 0.3)
    assert (det.limit_type, det.limit_side_len, engine.cfg.Global.text_score) == ("max", 960, 0.5)


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


def test_ocr_rejects_unquoted_prompt(monkeypatch):
    engine = FakeOCR([("HI", 0, 0, 10, 10)])
    monkeypatch.setitem(rewards.MODELS, "ocr", engine)
    with pytest.raises(ValueError, match="no quoted text"):
        rewards.ocr_reward([render("Hi"), render("Hi")], ['"hi"', "a sign that says hi"])
    assert engine.calls == []  # bad data stops the call before any image is read

# -----------------------------------------------------------------------------
# GenEval rules on hand-built detections


def obj(box, color=None, score=0.95):
    return {"box": box, "score": score, "color": color}


LEFT, MIDDLE, RIGHT = (0, 200, 100, 300), (150, 200, 250, 300), (300, 200, 400, 300)  # one row, apart
TOP, BOTTOM = (200, 0, 300, 100), (200, 300, 300, 400)  # same column, far apart


def rules(objects, meta):
    """(server partial, aligned partial, GenEval's verdict) of kept objects against metadata."""
    return (rewards.geneval_server_partial(objects, meta), rewards.geneval_aligned_partial(objects, meta),
            rewards.geneval_verdict(objects, meta)[0])


def two_cats():
    return {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}


@pytest.mark.parametrize("n, server, aligned, strict", [
    # server: 1 - |2 - n| / 2, the exclude clause ignored; aligned: (min(n, 2) / 2 + exclude term) / 2
    (0, 0.0, (0 + 1) / 2, False),
    (1, 0.5, (0.5 + 1) / 2, False),
    (2, 1.0, 1.0, True),
    (3, 0.5, (1 + 0.5) / 2, False),    # one extra: server 1 - 1/2; aligned: 1 excess over 2 allowed
    (4, 0.0, (1 + 0.0) / 2, False),
    (5, -0.5, (1 + 0.0) / 2, False),   # server below 0: 1 - 3/2
])
def test_rules_counting_over_and_under(n, server, aligned, strict):
    objects = {"cat": [obj((i * 50, 0, i * 50 + 40, 40)) for i in range(n)]} if n else {}
    assert rules(objects, two_cats()) == (pytest.approx(server), pytest.approx(aligned), strict)


def test_rules_extra_object_outside_counting():
    """GenEval passes "a dog" with two dogs; the server's count term sees every kept dog."""
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert rules({"dog": [obj(LEFT)]}, meta) == (1.0, 1.0, True)
    assert rules({"dog": [obj(LEFT), obj(RIGHT, score=0.5)]}, meta) == (0.0, 1.0, True)  # 1 - |1 - 2|
    assert rules({"dog": [obj(LEFT), obj(MIDDLE), obj(RIGHT)]}, meta)[0] == -1.0        # 1 - |1 - 3|
    assert rules({}, meta) == (0.0, 0.0, False)


def test_rules_colour():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert rules({"car": [obj(LEFT, "red")]}, meta) == (1.0, 1.0, True)
    assert rules({"car": [obj(LEFT, "blue")]}, meta) == (0.5, 0.5, False)  # terms count 1, colour 0
    assert "red" in rewards.geneval_verdict({"car": [obj(LEFT, "blue")]}, meta)[1][0]
    # a red car in front of a blue one passes GenEval (top 1 only); the server's count fails (n = 2), so
    # its colour term is a 0 without looking: terms 1 - |1 - 2| = 0 and 0
    assert rules({"car": [obj(LEFT, "red"), obj(RIGHT, "blue", 0.5)]}, meta) == (0.0, 1.0, True)
    # only the most confident object counts for GenEval: a red car behind a blue one does not help
    assert rules({"car": [obj(LEFT, "blue"), obj(RIGHT, "red", 0.5)]}, meta) == (0.0, 0.5, False)
    # two of two: the server's colour term is the right share, 1 - |2 - 1| / 2
    two = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    assert rules({"car": [obj(LEFT, "red"), obj(RIGHT, "blue")]}, two) == (0.75, 0.75, False)
    assert rules({"car": [obj(LEFT, "red"), obj(RIGHT, "red")]}, two) == (1.0, 1.0, True)


def test_rules_colour_attribution():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "dog", "count": 1, "color": "blue"}]}
    good = {"car": [obj(LEFT, "red")], "dog": [obj(RIGHT, "blue")]}
    swapped = {"car": [obj(LEFT, "blue")], "dog": [obj(RIGHT, "red")]}
    assert rules(good, meta) == (1.0, 1.0, True)
    assert rules(swapped, meta) == (0.5, 0.5, False)  # terms 1, 0, 1, 0 in both


def position(rel, dogs=1):
    """'<dogs> dog(s) <rel> a cat': the cat (target) is clause 0."""
    return {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": dogs, "position": [rel, 0]}]}


@pytest.mark.parametrize("dog, cat, rel, strict", [
    (LEFT, RIGHT, "left of", True), (RIGHT, LEFT, "left of", False),
    (RIGHT, LEFT, "right of", True), (LEFT, RIGHT, "right of", False),
    (TOP, BOTTOM, "above", True), (BOTTOM, TOP, "above", False),
    (BOTTOM, TOP, "below", True), (TOP, BOTTOM, "below", False),
])
def test_rules_positions(dog, cat, rel, strict):
    # server: cat 1, dog 1, then [1] when the pair holds, [0, 1] when not; aligned: 1, 1, the pair
    expected = (1.0, 1.0, True) if strict else (pytest.approx(3 / 4), pytest.approx(2 / 3), False)
    assert rules({"dog": [obj(dog)], "cat": [obj(cat)]}, position(rel)) == expected


def test_rules_position_failed_pairs_cost_one_zero():
    """Two dogs left of a cat: the server stops at the first failed pair, so one failed pair and
    two cost the same single 0 (terms cat 1, dog count 1, 0, 1); aligned counts the pairs."""
    one_bad = {"cat": [obj(MIDDLE)], "dog": [obj(LEFT), obj(RIGHT)]}
    two_bad = {"cat": [obj(LEFT)], "dog": [obj(MIDDLE), obj(RIGHT)]}
    assert rules(one_bad, position("left of", 2)) == (pytest.approx(3 / 4), pytest.approx((1 + 1 + 1 / 2) / 3), False)
    assert rules(two_bad, position("left of", 2)) == (pytest.approx(3 / 4), pytest.approx(2 / 3), False)


def test_rules_position_without_target():
    # cat missing: server cat 1 - |1 - 0| = 0, dog 1, no target 0; aligned cat 0, dog 1, no pair 0
    assert rules({"dog": [obj(LEFT)]}, position("left of")) == (pytest.approx(1 / 3), pytest.approx(1 / 3), False)
    assert any("no target" in r for r in rewards.geneval_verdict({"dog": [obj(LEFT)]}, position("left of"))[1])
    # an extra cat: GenEval's target is its top cat, so the dog passes; the server's cat clause
    # fails its count (0), so the dog has no target (0): terms 0, 1, 0
    two_cats_one_dog = {"dog": [obj(LEFT)], "cat": [obj(RIGHT), obj(MIDDLE, score=0.5)]}
    assert rules(two_cats_one_dog, position("left of")) == (pytest.approx(1 / 3), 1.0, True)
    # a position clause whose count fails adds one 0, even when it asks for a colour too
    both = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "color": "red", "position": ["left of", 0]}]}
    assert rewards.geneval_server_partial({"cat": [obj(RIGHT)]}, both) == pytest.approx((1 + 0 + 0) / 3)


def test_relative_position_by_hand():
    # centres 15 px apart, dead zone 0.1 * (100 + 100) = 20 px: no relation
    assert rewards.relative_position((0, 0, 100, 100), (15, 0, 115, 100)) == set()
    # offset (-100, -100), dead zone 2 px each way: (-98, -98) / 141.4 = -0.69 on both axes
    assert rewards.relative_position((0, 0, 10, 10), (100, 100, 110, 110)) == {"left of", "above"}
    # offset (-30, 0) with dead zone 20 -> (-10, 0) / 30: dx = -0.33, not enough
    assert rewards.relative_position((0, 0, 100, 100), (30, 0, 130, 100)) == set()


def test_rules_exclusions():
    """GenEval fails an image at `count` excluded objects; the server ignores exclude clauses."""
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": 1}]}
    assert rules({"dog": [obj(LEFT)]}, meta) == (1.0, 1.0, True)
    assert rules({"dog": [obj(LEFT)], "cat": [obj(RIGHT)]}, meta) == (1.0, 0.5, False)
    assert "cat<1" in rewards.geneval_verdict({"dog": [obj(LEFT)], "cat": [obj(RIGHT)]}, meta)[1][0]
    assert rewards.geneval_server_partial({}, {"tag": "x", "include": [], "exclude": meta["exclude"]}) == 0.0


def test_keep_objects_thresholds_and_cap():
    dets = [{"class": "cat", "score": s, "box": (0, 0, 1, 1)} for s in (0.5, 0.95, 0.2)]
    dets += [{"class": "dog", "score": 0.99, "box": (0, 0, 1, 1)} for _ in range(20)]
    counting, other = rewards.keep_objects(dets, "counting"), rewards.keep_objects(dets, "two_object")
    assert [d["score"] for d in counting["cat"]] == [0.95]
    assert [d["score"] for d in other["cat"]] == [0.95, 0.5]  # most confident first
    assert len(other["dog"]) == rewards.GENEVAL_MAX_OBJECTS == 16
    assert "cat" not in rewards.keep_objects(dets[2:3], "two_object")


def test_keep_objects_orders_tied_scores_as_geneval():
    """GenEval orders a class by np.argsort(scores)[::-1]: of equal scores the later detection
    first. Cars a (0.9), b (0.5), c (0.9) in the detector's order are kept as c, a, b."""
    dets = [{"class": "car", "score": s, "box": box, "name": name}
            for name, s, box in (("a", 0.9, LEFT), ("b", 0.5, MIDDLE), ("c", 0.9, RIGHT))]
    assert [d["name"] for d in rewards.keep_objects(dets, "colors")["car"]] == ["c", "a", "b"]
    # which of two equally confident cars is "the" car decides a colour prompt: the later, red one
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    tied = [{"class": "car", "score": 0.8, "box": LEFT, "color": "blue"},
            {"class": "car", "score": 0.8, "box": RIGHT, "color": "red"}]
    assert rewards.geneval_verdict(rewards.keep_objects(tied, "colors"), meta)[0] is True
    assert rewards.geneval_verdict(rewards.keep_objects(tied[::-1], "colors"), meta)[0] is False


def test_geneval_overall_is_the_mean_of_the_tag_accuracies():
    """GenEval's summary_scores.py: overall = the mean over tags of each tag's share of correct
    images. With 4, 2 and 3 images in three tags (4, 1 and 0 correct) that is (1 + 1/2 + 0) / 3
    = 0.5, where pooling the images gives 5/9. Another task with the same tags (the tiny count)
    keeps the pooled rate, and pickscore, scoring the same images, has no tags."""
    import scoring
    tags = ["single_object"] * 4 + ["counting"] * 2 + ["position"] * 3
    passed = [True] * 4 + [True, False] + [False] * 3
    jobs = [{"task": task, "row": i, "metadata": {"tag": tag}} for task in ("geneval", "count")
            for i, tag in enumerate(tags)]
    records = [{"job": j, "task": job["task"], "score": float(ok), "info": {"strict": ok}}
               for j, (job, ok) in enumerate(zip(jobs, passed * 2))]
    records += [{"job": j, "task": "pickscore", "score": 0.8, "info": {}} for j in range(len(tags))]
    res = scoring.summarise(records, jobs)
    assert res["geneval"]["strict"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert res["geneval"]["strict_pooled"] == pytest.approx(5 / 9) and res["count"]["strict"] == pytest.approx(5 / 9)
    assert [res["geneval"]["tags"][t]["strict"] for t in ("single_object", "counting", "position")] == [1.0, 0.5, 0.0]
    assert "strict_pooled" not in res["count"] and "tags" not in res["pickscore"]

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
    # the server's count term sees every kept mouse: 1 - |1 - n|; GenEval passes any n >= 1
    n = len(boxes)
    assert (scores[0].item(), info[0]["strict"]) == (1 - abs(1 - n), True)
    assert (scores[1].item(), info[1]["strict"]) == (0.0, False)
    [color] = info[2]["colors"]["computer mouse"]  # the top mouse's colour
    red = color == "red"
    n2 = len(info[2]["detected"]["computer mouse"])
    assert color in rewards.COLORS and info[2]["strict"] is red
    # n = 1: terms count 1 and colour; otherwise the count term and a 0 for the colour clause
    assert scores[2].item() == pytest.approx((1 + red) / 2 if n2 == 1 else (1 - abs(1 - n2)) / 2)
    assert set(tiny_geneval["color_classifiers"]) == {"computer mouse"}  # text side cached per class
    # random masks score about 0.5: above 0.3, below the 0.9 that counting prompts use; 1 - |2 - 0| / 2
    assert info[3]["detected"] == {} and scores[3].item() == 0.0
    # the aligned partial on the same detections: count min(n, 1), colour of the top one, exclude met
    aligned, aligned_info = rewards.get_reward("geneval_aligned")(images, [""] * 4, metadata)
    assert aligned.tolist() == pytest.approx([1.0, 0.0, (1 + red) / 2, (0 + 1) / 2])
    assert [i["strict"] for i in aligned_info] == [i["strict"] for i in info]


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


def test_pickscore_loads_in_float32(tmp_path, monkeypatch):
    """Flow-GRPO casts PickScore to float32; a checkpoint stored in bfloat16 is cast up too."""
    import transformers
    model, processor = tiny_clip(tmp_path)
    seen = []
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", lambda name, **kw: seen.append(name) or model.to(torch.bfloat16))
    monkeypatch.setattr(transformers.CLIPProcessor, "from_pretrained", lambda name, **kw: seen.append(name) or processor)
    loaded = rewards._load_pickscore()
    assert loaded["model"].dtype == torch.float32 and loaded["model"].logit_scale.dtype == torch.float32
    assert seen == [rewards.PICKSCORE_MODEL_ID, rewards.PICKSCORE_PROCESSOR_ID]

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
    with pytest.raises(ValueError, match="unknown reward 'nope'.*geneval, geneval_aligned, ocr, pickscore"):
        rewards.get_reward("nope")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.parse_reward_spec("ocr:0.5,nope:0.5")
    with pytest.raises(ValueError, match="bad reward spec"):
        rewards.parse_reward_spec("ocr:lots")


def test_tiny_world_rewards_are_registered_and_imported_lazily(monkeypatch):
    assert {"count", "text", "clean"} <= set(rewards.REWARDS)
    calls = []
    world = types.SimpleNamespace(text_reward=lambda *a: calls.append(a) or (np.ones(1, np.float32), [{}]))
    monkeypatch.setitem(sys.modules, "tiny.world", world)
    monkeypatch.setattr(tiny, "world", world)
    image = Image.new("RGB", (4, 4))
    scores, _ = rewards.get_reward("text")([image], ['"ab"'], [{}])
    # called on first use, with PIL images; its numpy scores come back as a tensor
    assert isinstance(scores, torch.Tensor) and scores.tolist() == [1.0] and calls == [([image], ['"ab"'], [{}])]


def test_preload_geneval_aligned_shares_geneval_models(monkeypatch):
    """geneval_aligned runs GenEval's models: preloading it fills (or finds) MODELS["geneval"]."""
    loads = []
    monkeypatch.setattr(rewards, "_load_geneval", lambda: loads.append(1) or {"detector": None})
    monkeypatch.delitem(rewards.MODELS, "geneval", raising=False)
    rewards.preload(["geneval_aligned", "geneval:0.5,geneval_aligned:0.5"])
    assert loads == [1] and rewards.MODELS.pop("geneval") == {"detector": None}  # monkeypatch restores the rest


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
