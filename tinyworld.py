"""
The tiny world: a miniature of the paper's text-to-image setting that runs on a laptop CPU.

Images are 32x32 RGB on a white background. Three tasks mirror the paper's reward axes:

- count (GenEval analogue): solid shapes (circle, square, triangle) in five well separated
  colours, counts 1-4, two-object prompts and relative positions, e.g.
  "two red circles and a blue square", "a red circle left of a blue square".
- text (OCR analogue): 2-4 characters (digits and ten letters) drawn in the world's own 3x5
  bitmap font at scale 2, e.g. 'the text "a3k"'.
- clean (aesthetic analogue): a task-agnostic quality score: flat background, pure palette
  colours, crisp edges, no speckle. Its prompts are simple scenes ("a clean picture of ...").

Everything is exact and programmatic: render(row, seed) draws a picture that satisfies a
prompt row, and the rewards parse pictures back (palette segmentation, connected components,
template matching), so a render of the prompt scores 1 and the same render under another
prompt scores low. Rewards share the project-wide signature

    scores, info = count_reward(images, prompts, metadata)

with scores a float32 tensor (B,) in [0, 1] (graded partial credit, the training signal) and
info one dict per image with "strict" (exact pass/fail, the eval metric) and what was read.

    import tinyworld
    rows = tinyworld.prompt_set("count", "test")          # [{"prompt", "task", "metadata"}]
    images = [tinyworld.render(row, seed=0) for row in rows]
    scores, info = tinyworld.count_reward(images, [r["prompt"] for r in rows],
                                          [r["metadata"] for r in rows])

The tiny base model is pretrained here too (flow matching on rendered prompts, about 20 minutes
of CPU), then sampled on the test prompts. Like web data, the pictures of its last stretch of
training are not all faithful: from step PRETRAIN["flaw_from"] on, a share PRETRAIN["flaw_rate"]
of them carry their task's flaw, which that task's reward alone marks down: an extra shape in a
colour the prompt does not name (count), a grey band across the board (clean), a grey bar under
the line that the reader takes for the text (text). No prompt mentions them, so guidance does not
ask them away: the base draws them often, and a teacher can learn not to, one change shared by
every prompt of its task. (Flawed pictures from step 0 cost the base its glyphs and counts, and
then GRPO had nothing to build on.) The shipped assets/tiny/base was made by

    python tinyworld.py --out assets/tiny/base --steps 4600 --seed 0

which also writes assets/tiny/base_scores.json (the base's test scores and this command) and
assets/tiny/base_grid.png (64 test samples).
"""

import argparse
import itertools
import json
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rapidfuzz.distance import Levenshtein

# -----------------------------------------------------------------------------
# the world

SIZE = 32
TASKS = ("count", "text", "clean")
WHITE = (255, 255, 255)  # every render's background
INK = (20, 20, 20)       # the text colour
STAIN = (150, 150, 150)  # the flaw of text and clean pictures: a grey no palette colour is near
STAIN_BAR = 8            # rows of the grey bar across the bottom of a flawed text picture
# Pairwise RGB distances are >= 115 (blue-purple), so nearest-colour segmentation is unambiguous.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
OBJECT_SIZE = 8  # side of a shape's bounding box in pixels
# Text lines sit on the 4 px grid of the base's patches (patch size 4), so the k-th glyph always
# has the same place inside its tokens; shapes sit in the cells of a 3x3 board on that grid,
# each exactly 2x2 tokens with a token of space around it. With shapes anywhere on the grid, a
# 20-minute base still drew merged and broken blobs (count 0.24 after 4800 steps), errors no
# teacher could fix in 15 minutes; off the grid it drew ragged blobs (count 0.15, text 0.09).
GRID = 4
CELLS = [(x, y) for y in (0, 12, 24) for x in (0, 12, 24)]  # top-left corners (x, y) of the board

# A 3x5 font. Every glyph touches all four sides of its box and has ink in every row and
# column, so a line of text is exactly 10 px tall at scale 2 and glyphs are separated by the
# empty spacing columns alone. Letters look like capitals but are keyed lowercase, because
# the CLIP tokenizer lowercases prompts. Letters that are one pixel from another glyph
# (e, u, n, r against c, 0, a) are left out; the digits keep their classic 3x5 forms.
GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"],
    "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"],
    "7": ["###", "..#", "..#", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"],
    "9": ["###", "#.#", "###", "..#", "###"],
    "a": [".#.", "#.#", "###", "#.#", "#.#"],
    "c": ["###", "#..", "#..", "#..", "###"],
    "f": ["###", "#..", "##.", "#..", "#.."],
    "h": ["#.#", "#.#", "###", "#.#", "#.#"],
    "k": ["#.#", "##.", "#..", "##.", "#.#"],
    "l": ["#..", "#..", "#..", "#..", "###"],
    "p": ["###", "#.#", "###", "#..", "#.."],
    "t": ["###", ".#.", ".#.", ".#.", ".#."],
    "x": ["#.#", "#.#", ".#.", "#.#", "#.#"],
    "y": ["#.#", "#.#", ".#.", ".#.", ".#."],
}
CHARSET = "".join(GLYPHS)
GLYPH_BITS = {c: np.array([[p == "#" for p in r] for r in g]) for c, g in GLYPHS.items()}
GLYPH_SCALE = 2
GLYPH_SPACING = 2  # empty columns between glyphs; a 4-character line is 4*6 + 3*2 = 30 px
TEXT_LEFT = 1      # the line starts here; glyph k then spans columns 8k+1 .. 8k+6, inside 2 patches

TEXT_TEMPLATES = ('the text "{}"', 'a sign that says "{}"')
CLEAN_TEMPLATES = ("a clean picture of {}", "a neat drawing of {}")

# Prompt set sizes (test, train); test sets are modest because evaluation runs on CPU. None
# means every remaining prompt of the grammar. Count is split per GenEval-like tag.
COUNT_SPLIT = {"single": (8, None), "counting": (16, None), "two_object": (20, 150),
               "position": (20, 150)}
TEXT_SPLIT = (64, 400)
CLEAN_SPLIT = (32, None)
TEXT_LENGTHS = (2, 3, 4)

# reward constants (see count_reward / text_reward / clean_reward for why)
MATCH_DIST = 90        # a pixel belongs to a palette colour if closer than this (RGB L2)
MIN_OBJECT_AREA = 16   # smaller blobs are speckle, not objects (the smallest shape is 40 px)
COUNT_BASE = 0.25      # credit per spec is COUNT_BASE ** |detected - asked|
SHAPE_FLOOR = 0.25     # credit of a spec whose objects all have the wrong shape
EXTRA_BASE = 0.25      # credit factor per object of a colour nobody asked for (as a miscount)
POSITION_MARGIN = 2    # px the centroids must be apart along the relation's axis
POSITION_FLOOR = 0.1   # credit of a relation that is clearly violated or unmeasurable
INK_DIST = 128         # a pixel is ink if this far from the background (RGB L2)
FLAT_DIST = 8          # within this of a palette colour counts as a pure, flat pixel
PURE_RANGE = 24        # purity falls linearly to 0 over this many RGB units beyond FLAT_DIST
SPECKLE_WEIGHT = 20    # 5% isolated pixels zero the clean score
MIN_CONTENT = 40       # an image needs this much ink (one triangle) to be a picture; less
                       # let a clean-reward teacher win by leaving the canvas empty
CLEAN_STRICT = 0.9

# -----------------------------------------------------------------------------
# prompts


def _noun(thing, count):
    return f"{NUMBER_WORDS[count]} {thing}{'s' if count > 1 else ''}"


def _phrase(objects):
    return " and ".join(_noun(f"{o['color']} {o['shape']}", o["count"]) for o in objects)


def _count_row(tag, objects, relation=None):
    prompt = f" {relation} ".join(_phrase([o]) for o in objects) if relation else _phrase(objects)
    return {"prompt": prompt, "task": "count",
            "metadata": {"tag": tag, "objects": objects, "relation": relation}}


def _obj(color, shape, count=1):
    return {"color": color, "shape": shape, "count": count}


def _count_rows_by_tag():
    """Every count prompt the grammar can say, grouped by GenEval-like tag."""
    kinds = list(itertools.product(COLORS, SHAPES))
    pairs = [(a, b) for a, b in itertools.product(kinds, kinds) if a[0] != b[0]]
    count_pairs = [(n, m) for n in range(1, 4) for m in range(1, 4) if n + m <= 4]
    return {
        "single": [_count_row("single", [_obj(c, s)]) for c, s in kinds],
        "counting": [_count_row("counting", [_obj(c, s, n)]) for c, s in kinds for n in (2, 3, 4)],
        "two_object": [_count_row("two_object", [_obj(*a, n), _obj(*b, m)])
                       for a, b in pairs for n, m in count_pairs],
        "position": [_count_row("position", [_obj(*a), _obj(*b)], rel)
                     for a, b in pairs for rel in RELATIONS],
    }


def _text_strings(n, rng):
    """n distinct random strings over CHARSET, lengths spread evenly over TEXT_LENGTHS."""
    out = {}
    while len(out) < n:
        length = TEXT_LENGTHS[len(out) % len(TEXT_LENGTHS)]
        s = "".join(rng.choice(list(CHARSET), size=length))
        out.setdefault(s, None)
    return list(out)


def _text_row(s, template):
    return {"prompt": template.format(s), "task": "text", "metadata": {"tag": "text", "text": s}}


def _clean_rows():
    """Simple scenes: one shape, a few of one shape, or two different single shapes."""
    kinds = list(itertools.product(COLORS, SHAPES))
    scenes = ([[_obj(c, s, n)] for c, s in kinds for n in (1, 2, 3)]
              + [[_obj(*a), _obj(*b)] for a, b in itertools.combinations(kinds, 2) if a[0] != b[0]])
    return [{"prompt": t.format(_phrase(objs)), "task": "clean",
             "metadata": {"tag": "clean", "objects": objs, "relation": None}}
            for objs in scenes for t in CLEAN_TEMPLATES]


def _split(rows, sizes, seed):
    """Shuffle with a fixed seed; the first n_test rows are the test set, the next n_train
    (all of them if None) the train set."""
    n_test, n_train = sizes
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows[:n_test], rows[n_test:None if n_train is None else n_test + n_train]


def prompt_set(task, split):
    """The deterministic prompt rows of a task ("count", "text", "clean") and split ("train",
    "test"). Train and test prompts never overlap. Rows are fresh dicts on every call."""
    assert task in TASKS and split in ("train", "test"), (task, split)
    if task == "count":
        # split per tag so every tag is in the test set in a fixed proportion
        test, train = [], []
        for i, (tag, rows) in enumerate(_count_rows_by_tag().items()):
            te, tr = _split(rows, COUNT_SPLIT[tag], seed=100 + i)
            test += te
            train += tr
    elif task == "text":
        rng = np.random.default_rng(200)
        strings = _text_strings(sum(TEXT_SPLIT), rng)
        templates = itertools.cycle(TEXT_TEMPLATES)
        rows = [_text_row(s, next(templates)) for s in strings]
        test, train = _split(rows, TEXT_SPLIT, seed=201)
    else:
        test, train = _split(_clean_rows(), CLEAN_SPLIT, seed=300)
    return test if split == "test" else train


def _vocab():
    words = set(NUMBER_WORDS.values()) | set(COLORS) | {"and"}
    words |= {w for s in SHAPES for w in (s, s + "s")}
    words |= {w for r in RELATIONS for w in r.split()}
    words |= {w for t in TEXT_TEMPLATES + CLEAN_TEMPLATES for w in re.findall(r"[a-z]+", t)}
    return sorted(words)


# Every word a prompt uses outside quotes (the quoted strings are CHARSET characters).
VOCAB_WORDS = _vocab()

# -----------------------------------------------------------------------------
# rendering


def shape_mask(shape, w, h):
    """Boolean (h, w) mask of a shape filling a w x h box. Pixel centres decide membership,
    so the mask touches all four sides of its box (the detector relies on that)."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "circle":
        return ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2 <= 1
    # triangle, apex up: the half-width grows linearly to w/2 at the bottom row
    return np.abs(x - w / 2) <= (np.floor(y) + 1) / h * w / 2


def _rng(row, seed):
    """Mix the prompt in, so rows rendered with the same seed get different layouts."""
    return np.random.default_rng([seed, zlib.crc32(row["prompt"].encode())])


def relation_offset(relation, a, b):
    """Signed distance (px) by which centroid a = (x, y) satisfies `a <relation> b`;
    positive means satisfied. Image y grows downwards."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]


def _layout(n, rng, relation=None):
    """n boxes (x, y) drawn without replacement from the CELLS. With a relation, box 0 must be
    clearly on that side of box 1: a cell further along the relation's axis, and no further
    across it than along it, so the render is unambiguous."""
    while True:
        boxes = [CELLS[i] for i in rng.choice(len(CELLS), size=n, replace=False)]
        if relation:
            along = relation_offset(relation, boxes[0], boxes[1])
            across = abs(boxes[0][1] - boxes[1][1]) if relation in ("left of", "right of") else \
                abs(boxes[0][0] - boxes[1][0])
            if along <= 0 or across > along:
                continue
        return boxes


def _draw_shapes(img, objects, relation, rng, distractor=None):
    items = [(COLORS[o["color"]], o["shape"]) for o in objects for _ in range(o["count"])]
    items += [distractor] if distractor else []  # last, so the relation still holds for boxes 0 and 1
    for (rgb, shape), (x, y) in zip(items, _layout(len(items), rng, relation)):
        img[y:y + OBJECT_SIZE, x:x + OBJECT_SIZE][shape_mask(shape, OBJECT_SIZE, OBJECT_SIZE)] = rgb


def text_mask(text):
    """Boolean mask of a line of text in the world's font."""
    cols = []
    for i, c in enumerate(text):
        if i:
            cols.append(np.zeros((5, GLYPH_SPACING // GLYPH_SCALE), bool))
        cols.append(GLYPH_BITS[c])
    bits = np.concatenate(cols, axis=1)
    return bits.repeat(GLYPH_SCALE, 0).repeat(GLYPH_SCALE, 1)


def _draw_text(img, text, rng, bottom=SIZE - 1):
    mask = text_mask(text)
    h, w = mask.shape
    # left-aligned, at one of the heights 1 px below a grid line: the k-th character then has
    # the same columns whatever the string's length, which a tiny model (and its causal text
    # encoder, which has not read the end of the string at character k) can learn in minutes
    y = 1 + GRID * int(rng.integers(0, (bottom - h - 1) // GRID + 1))
    img[y:y + h, TEXT_LEFT:TEXT_LEFT + w][mask] = INK


def render(row, seed, flawed=False):
    """A 32x32 RGB PIL image satisfying the row's metadata; placement and sizes come from the
    seed, so the drawing is deterministic for (row, seed). flawed: add the task's flaw, as a
    share PRETRAIN["flaw_rate"] of the pretraining pictures have it (see the module docstring)."""
    rng = _rng(row, seed)
    img = np.full((SIZE, SIZE, 3), WHITE, np.uint8)
    meta = row["metadata"]
    if row["task"] == "text":
        # the flaw: a grey bar under the line, with more ink than any line, so the reader takes
        # it for the text
        bar = SIZE - 1 - STAIN_BAR
        _draw_text(img, meta["text"], rng, bottom=bar - 2 if flawed else SIZE - 1)
        if flawed:
            img[bar:SIZE - 1, TEXT_LEFT:SIZE - TEXT_LEFT] = STAIN
    else:
        distractor = None
        if flawed and row["task"] == "count":
            asked = {o["color"] for o in meta["objects"]}
            distractor = (COLORS[str(rng.choice([c for c in COLORS if c not in asked]))], str(rng.choice(SHAPES)))
        elif flawed:
            # a grey band over the gap between the board's top and middle rows, so no shape
            # hides it. Always in the same place, like the text bar: a flaw at random places
            # averages out in the model's prediction and guidance wipes it (a grey square in a
            # free cell survived in 3% of samples), a fixed one it keeps
            img[OBJECT_SIZE:CELLS[3][1]] = STAIN
        _draw_shapes(img, meta["objects"], meta.get("relation"), rng, distractor)
    return Image.fromarray(img)


def render_batch(rows, seeds, flawed=None):
    """uint8 tensor (B, 3, 32, 32) of render(row, seed, flawed) for each triple (flawed: None, no flaws)."""
    flawed = [False] * len(rows) if flawed is None else flawed
    arr = np.stack([np.asarray(render(r, s, f)) for r, s, f in zip(rows, seeds, flawed)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def sample_training_batch(rows, batch_size, seed, flaw_rate=0.0):
    """Pretraining data: batch_size rows drawn uniformly from `rows`, each rendered with a fresh
    seed and, with probability flaw_rate, with its task's flaw. Returns (rows, uint8 tensor
    (B, 3, 32, 32)). Deterministic for the seed."""
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.integers(0, len(rows), size=batch_size)]
    seeds = rng.integers(0, 2 ** 31, size=batch_size).tolist()
    return picked, render_batch(picked, seeds, (rng.random(batch_size) < flaw_rate).tolist())

# -----------------------------------------------------------------------------
# parsing images back


def to_uint8_images(images):
    """A list of PIL images or (3, H, W) tensors, or a (B, 3, H, W) tensor (uint8, or float in
    [0, 1]), as a numpy uint8 array (B, H, W, 3)."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
        images = torch.stack(list(images))
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round()
        return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


PALETTE_NAMES = ["white", "black", *COLORS]
PALETTE = np.array([WHITE, INK, *COLORS.values()], np.float32)


def palette_distances(img, palette=PALETTE):
    """(H, W, K) RGB distances of every pixel to every palette colour."""
    return np.linalg.norm(img[:, :, None, :].astype(np.float32) - palette, axis=-1)


def components(mask):
    """4-connected components of a boolean mask, as a list of (N, 2) arrays of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def classify_shape(mask):
    """The shape whose template, fitted to the blob's bounding box, overlaps it best (IoU).
    Returns (shape, iou)."""
    h, w = mask.shape
    ious = {s: (mask & (t := shape_mask(s, w, h))).sum() / (mask | t).sum() for s in SHAPES}
    best = max(ious, key=ious.get)
    return best, float(ious[best])


def detect_objects(img):
    """Solid blobs of each non-white palette colour: colour, shape, centroid, area."""
    d = palette_distances(img)
    label = np.where(d.min(-1) < MATCH_DIST, d.argmin(-1), -1)
    objects = []
    for k, name in enumerate(PALETTE_NAMES):
        if name == "white":
            continue
        for pix in components(label == k):
            if len(pix) < MIN_OBJECT_AREA:
                continue
            ys, xs = pix[:, 0], pix[:, 1]
            box = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), bool)
            box[ys - ys.min(), xs - xs.min()] = True
            shape, iou = classify_shape(box)
            objects.append({"color": name, "shape": shape, "iou": round(iou, 3), "area": len(pix),
                            "x": float(xs.mean() + 0.5), "y": float(ys.mean() + 0.5)})
    return objects


def _anchor(objects, spec):
    """The object standing for a spec in a relation: the largest of its colour, preferring
    the right shape."""
    mine = [o for o in objects if o["color"] == spec["color"]]
    return max(mine, key=lambda o: (o["shape"] == spec["shape"], o["area"]), default=None)


def score_count(objects, meta):
    """Partial credit and strict pass of detected objects against count metadata.

    The credit is a product of factors, so one wrong attribute (a count off by one, a wrong
    colour, a wrong shape, a flipped relation) caps the score at about 0.25, while each
    attribute still moves it gradually (being off by 1 beats being off by 2)."""
    specs = meta["objects"]
    score, strict = 1.0, True
    for spec in specs:
        mine = [o for o in objects if o["color"] == spec["color"]]
        right = sum(o["shape"] == spec["shape"] for o in mine)
        m, k = len(mine), spec["count"]
        score *= COUNT_BASE ** abs(m - k)
        if m:  # a missing object is already paid for by the count factor
            score *= SHAPE_FLOOR + (1 - SHAPE_FLOOR) * min(right, k) / min(m, k)
        strict &= m == k and right == k
    asked = {s["color"] for s in specs}
    extra = sum(o["color"] not in asked for o in objects)
    score *= EXTRA_BASE ** extra
    strict &= extra == 0
    info = {"detected": objects, "extra": extra}
    if meta.get("relation"):
        a, b = _anchor(objects, specs[0]), _anchor(objects, specs[1])
        offset = (relation_offset(meta["relation"], (a["x"], a["y"]), (b["x"], b["y"]))
                  if a and b else None)
        # graded: full credit from the margin on, fading to the floor a few px on the wrong side
        score *= POSITION_FLOOR if offset is None else float(
            np.clip((offset + 4) / (POSITION_MARGIN + 4), POSITION_FLOOR, 1))
        strict &= offset is not None and offset >= POSITION_MARGIN
        info["offset"] = offset
    return score, {"strict": bool(strict), **info}


def count_reward(images, prompts, metadata):
    """GenEval analogue: counts, colours, shapes and relative positions parsed from the image."""
    results = [score_count(detect_objects(img), meta)
               for img, meta in zip(to_uint8_images(images), metadata)]
    return torch.tensor([s for s, _ in results], dtype=torch.float32), [i for _, i in results]


def background(img):
    """The background colour: the median of the border pixels."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _runs(flags):
    """[start, stop) index pairs of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def read_glyph(cell):
    """The character whose 3x5 bitmap is closest (L1) to the ink coverage of a crop."""
    h, w = cell.shape
    # bin edges, each bin at least one pixel even when the crop is thinner than the glyph
    ys, xs = np.linspace(0, h, 6).round().astype(int), np.linspace(0, w, 4).round().astype(int)
    y0, x0 = np.minimum(ys[:-1], h - 1), np.minimum(xs[:-1], w - 1)
    y1, x1 = np.maximum(ys[1:], y0 + 1), np.maximum(xs[1:], x0 + 1)
    cover = np.array([[cell[y0[i]:y1[i], x0[j]:x1[j]].mean() for j in range(3)] for i in range(5)])
    return min(CHARSET, key=lambda c: np.abs(cover - GLYPH_BITS[c]).sum())


def read_text(img):
    """Read a line of text: take the band of ink rows with the most ink, cut it into glyphs at
    empty columns (a blob as wide as k glyphs is cut into k equal parts), and template-match
    each glyph against the font."""
    ink = np.linalg.norm(img.astype(np.float32) - background(img), axis=-1) > INK_DIST
    bands = _runs(ink.any(1))
    if not bands:
        return ""
    top, bottom = max(bands, key=lambda r: ink[r[0]:r[1]].sum())
    line = ink[top:bottom]
    pitch = (3 + GLYPH_SPACING // GLYPH_SCALE) * GLYPH_SCALE  # 8 px from glyph to glyph
    out = []
    for left, right in _runs(line.any(0)):
        n = max(1, round((right - left + GLYPH_SPACING) / pitch))
        cuts = np.linspace(left, right, n + 1).round().astype(int)
        for a, b in zip(cuts[:-1], cuts[1:]):
            if line[:, a:b].sum() >= GLYPH_SCALE ** 2:  # skip specks
                out.append(read_glyph(line[:, a:b]))
    return "".join(out)


def text_target(prompt, meta):
    """The string to draw: the metadata's, else the prompt's first quoted span."""
    if meta and "text" in meta:
        return meta["text"]
    quoted = re.search(r'"([^"]*)"', prompt)
    assert quoted, f"text prompt without a quoted string: {prompt!r}"
    return quoted.group(1)


def text_reward(images, prompts, metadata):
    """OCR analogue: 1 - normalised edit distance between the text read and the target."""
    scores, info = [], []
    for img, prompt, meta in zip(to_uint8_images(images), prompts, metadata):
        target = text_target(prompt, meta).lower()
        read = read_text(img)
        d = Levenshtein.distance(read, target)
        scores.append(1 - min(d, len(target)) / len(target))
        info.append({"strict": read == target, "read": read, "target": target, "distance": d})
    return torch.tensor(scores, dtype=torch.float32), info


def score_clean(img):
    """Task-agnostic cleanliness of one image in [0, 1], and its parts.

    purity: pixels that are not flat background should be pure palette (or background)
    colours; noise, blur and smear make in-between colours. speckle: pixels whose colour class
    none of their 4 neighbours share. content: an empty canvas is not a clean picture."""
    bg = background(img).astype(np.float32)
    palette = PALETTE
    if palette_distances(bg[None, None], palette).min() > FLAT_DIST + PURE_RANGE:
        # an off-palette flat background is fine too; near a palette colour it would only
        # split that colour into two classes and fake speckle
        palette = np.concatenate([PALETTE, bg[None]])
    d = palette_distances(img, palette)
    nearest = d.min(-1)
    foreground = np.linalg.norm(img - bg, axis=-1) > FLAT_DIST
    pure = np.clip(1 - (nearest - FLAT_DIST) / PURE_RANGE, 0, 1)
    purity = float(pure[foreground].mean()) if foreground.any() else 1.0
    label = np.where(nearest < FLAT_DIST + PURE_RANGE, d.argmin(-1), -1)
    padded = np.pad(label, 1, constant_values=-2)
    same = [padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx] == label
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    speckle = float((~np.any(same, axis=0)).mean())
    content = min(1.0, foreground.sum() / MIN_CONTENT)
    score = content * purity ** 2 * max(0.0, 1 - SPECKLE_WEIGHT * speckle)
    return score, {"purity": round(purity, 4), "speckle": round(speckle, 4), "content": content}


def clean_reward(images, prompts, metadata):
    """Aesthetic analogue: flat background, pure colours, crisp edges, no speckle. Ignores the
    prompt, so it scores images of any task."""
    results = [score_clean(img) for img in to_uint8_images(images)]
    scores = torch.tensor([s for s, _ in results], dtype=torch.float32)
    return scores, [{"strict": s >= CLEAN_STRICT, **i} for s, i in results]

# -----------------------------------------------------------------------------
# the tiny base: sampling constants and pretraining

# What every stage uses with --preset tiny. Training rollouts keep SD3.5-M's 10 SDE steps;
# evaluation uses 20 ODE steps (the tiny model's samples stop improving around there).
# Without T5 an SD3 pipeline pads every prompt with max_sequence_length identical zero tokens;
# the tiny base is trained and sampled with one, which is 2-3x cheaper than SD3's 256.
SAMPLING = dict(resolution=SIZE, num_steps=10, eval_steps=20, guidance=4.5, noise_level=0.7, t5_tokens=1)
# build_tiny_pipeline's size arguments for the base
BASE_MODEL = dict(patch_size=4, num_layers=6, heads=4, head_dim=32, text_dim=32, text_layers=2, max_tokens=32)
PRETRAIN = dict(
    steps=4600,         # about 19 minutes of 2 CPU cores (README)
    batch_size=32,
    lr=1e-3,            # AdamW, constant after the warmup, so a run of N steps is a prefix of a longer one
    warmup=50,
    weight_decay=0.01,
    grad_clip=1.0,
    dropout=0.1,        # share of prompts replaced by "", the negative prompt of our CFG
    flaw_rate=0.4,      # share of renders drawn with their task's flaw (render(..., flawed=True))...
    flaw_from=4000,     # ...from this step on; before it every render is faithful (see pretrain)
    ema=0.99,           # the saved weights are this EMA of the trained ones
    seed=0,
)
EVAL_BATCH = 32
EVAL_SEED = 0  # test row i (tasks concatenated in TASKS order) starts from initial_noise seed EVAL_SEED + i


def new_base(seed, **model):
    """A randomly initialised tiny pipeline whose tokenizer knows every prompt word and character.
    The transformer gets DiT's adaLN-zero initialisation (every block starts as the identity,
    the output at zero), which trains several times faster than diffusers' default init."""
    from sde_sampler import build_tiny_pipeline
    pipe = build_tiny_pipeline(None, words=VOCAB_WORDS + list(CHARSET), seed=seed,
                               **{**BASE_MODEL, **model})
    tr = pipe.transformer
    zero = [m.linear for m in tr.modules() if type(m).__name__.startswith(("AdaLayerNorm", "SD35AdaLayerNorm"))]
    for layer in zero + [tr.proj_out]:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return pipe


def embed_prompts(pipe, prompts):
    """Prompt embeddings exactly as sde_sampler.encode computes them (the same encode_prompt call),
    but with gradients, so the text encoders train with the transformer."""
    e, _, p, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                    do_classifier_free_guidance=False, device=pipe.transformer.device,
                                    max_sequence_length=SAMPLING["t5_tokens"])
    return e, p


def flow_matching_loss(pipe, prompts, images, generator, dropout):
    """Rectified-flow loss on a batch of uint8 renders: x_s = (1 - s) x0 + s eps, target
    v = eps - x0, logit-normal s (SD3's training density), timestep s * 1000."""
    x0 = images.float() / 127.5 - 1
    b = x0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    drop = torch.rand(b, generator=generator) < dropout
    e, p = embed_prompts(pipe, ["" if d else t for t, d in zip(prompts, drop.tolist())])
    sv = s.view(-1, 1, 1, 1)
    v = pipe.transformer(hidden_states=(1 - sv) * x0 + sv * eps, timestep=s * 1000,
                         encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]
    return torch.nn.functional.mse_loss(v, eps - x0)


def pretrain(out, steps, batch_size, lr, seed, model=None, warmup=PRETRAIN["warmup"],
             weight_decay=PRETRAIN["weight_decay"], grad_clip=PRETRAIN["grad_clip"],
             dropout=PRETRAIN["dropout"], ema=PRETRAIN["ema"], flaw_rate=PRETRAIN["flaw_rate"],
             flaw_from=PRETRAIN["flaw_from"], snapshots=(), progress=True):
    """Train a tiny base from scratch on renders of every task's train prompts and save its EMA
    weights (fp16) as a diffusers pipeline folder at `out` (None: don't save). The text encoders
    are random too, so they train jointly. Deterministic for the seed. Returns (pipe, losses);
    the pipe holds the saved weights. After each step N in `snapshots` the EMA weights also go
    to `{out}_step{N}`: the same folder as a run with steps=N (the lr is constant after warmup),
    which is how one run picks how early to stop. Renders are faithful before step flaw_from and
    flawed at flaw_rate from it on."""
    from tqdm import tqdm
    pipe = new_base(seed, **(model or {}))
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    averaged = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup)))
    rows = [r for t in TASKS for r in prompt_set(t, "train")]
    g = torch.Generator().manual_seed(seed)
    losses, avg = [], None
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for step in bar:
        rate = flaw_rate if step >= flaw_from else 0.0
        picked, images = sample_training_batch(rows, batch_size, seed=[seed, step], flaw_rate=rate)
        loss = flow_matching_loss(pipe, [r["prompt"] for r in picked], images, g, dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))  # short memory early, while weights move fast
        torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        avg = losses[-1] if avg is None else 0.95 * avg + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{avg:.4f}")
        if out is not None and step + 1 in snapshots and step + 1 < steps:
            trained = [p.detach().clone() for p in params]
            _save_weights(pipe, params, averaged, f"{out}_step{step + 1}")
            _load_weights(params, trained)
    for m in modules:
        m.eval()
    _load_weights(params, averaged)
    if out is not None:
        _save_weights(pipe, params, averaged, out)
    return pipe, losses


@torch.no_grad()
def _load_weights(params, values):
    for p, v in zip(params, values):
        p.copy_(v)


def _save_weights(pipe, params, values, path):
    """Save the pipeline holding `values` in fp16 (half the folder; load_policy reads it back in
    fp32, and so does the pipe left behind, which holds the rounded weights)."""
    _load_weights(params, values)
    pipe.to(torch.float16).save_pretrained(path)
    pipe.to(torch.float32)


@torch.no_grad()
def sample_test_set(policy, eval_steps=SAMPLING["eval_steps"], guidance=SAMPLING["guidance"]):
    """ODE samples of every task's test prompts (TASKS order) from fixed per-prompt noise.
    Returns (rows, PIL images)."""
    from sde_sampler import decode, initial_noise, rollout
    rows = [r for t in TASKS for r in prompt_set(t, "test")]
    images = []
    for i in range(0, len(rows), EVAL_BATCH):
        chunk = rows[i:i + EVAL_BATCH]
        x = initial_noise(policy, range(EVAL_SEED + i, EVAL_SEED + i + len(chunk)))
        out = rollout(policy, [r["prompt"] for r in chunk], eval_steps, guidance, 0.0, latents=x)
        images += decode(policy, out["latents"])
    return rows, images


def shows_flaw(task, img, info):
    """Whether a sample carries its task's pretraining flaw: a shape in a colour nobody asked for
    (count; `info` is its count_reward info), or a grey bar or band (text, clean)."""
    if task == "count":
        return info["extra"] > 0
    grey = palette_distances(np.asarray(img, np.float32), np.array([STAIN], np.float32))[..., 0] < MATCH_DIST / 2
    return int(grey.sum()) >= MIN_OBJECT_AREA


def score_test_set(rows, images):
    """Each task's own reward on its test prompts (mean and strict pass rate, and the share of
    samples with the task's flaw), plus the clean score of every test image (the anchor's view
    of all tasks)."""
    rewards = {"count": count_reward, "text": text_reward, "clean": clean_reward}
    scores = {}
    for task in TASKS:
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        s, info = rewards[task]([images[i] for i in idx], [rows[i]["prompt"] for i in idx],
                                [rows[i]["metadata"] for i in idx])
        scores[task] = {"mean": round(s.mean().item(), 4),
                        "strict": round(float(np.mean([x["strict"] for x in info])), 4), "n": len(idx),
                        "flawed": round(float(np.mean([shows_flaw(task, images[i], x) for i, x in zip(idx, info)])), 4)}
    s, info = clean_reward(images, None, None)
    scores["clean_all_tasks"] = {"mean": round(s.mean().item(), 4),
                                 "strict": round(float(np.mean([x["strict"] for x in info])), 4),
                                 "n": len(images)}
    return scores


def grid(images, cols=8, scale=2, gap=2):
    """Images side by side on a grey canvas (the renders' background is white)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (w * scale + gap) + gap, rows * (h * scale + gap) + gap), (128,) * 3)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(im.resize((w * scale, h * scale), Image.NEAREST),
                     (gap + c * (w * scale + gap), gap + r * (h * scale + gap)))
    return canvas


def grid_selection(rows, images):
    """64 test samples for the grid: 3 rows of count, 3 of text, 2 of clean."""
    per_task = {"count": 24, "text": 24, "clean": 16}
    return [im for task, n in per_task.items()
            for im in [im for r, im in zip(rows, images) if r["task"] == task][:n]]


def report(folder, record, pipe=None):
    """Sample and score the base saved in `folder`; write {folder}_grid.png and {folder}_scores.json
    (the scores added to `record`). `pipe`, the pipeline in memory that was saved there, if given,
    must embed prompts as the loaded folder does (fp16 storage aside)."""
    from sde_sampler import encode, load_policy
    policy = load_policy(str(folder), device="cpu", t5_tokens=SAMPLING["t5_tokens"])
    if pipe is not None:
        probe = [r["prompt"] for t in TASKS for r in prompt_set(t, "test")[:4]] + [""]
        with torch.no_grad():
            want = embed_prompts(pipe, probe)
        got = encode(policy, probe)[:2]
        assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(got, want)), "encode != training embeddings"
    test_rows, images = sample_test_set(policy)
    scores = score_test_set(test_rows, images)
    grid(grid_selection(test_rows, images)).save(f"{folder}_grid.png")
    Path(f"{folder}_scores.json").write_text(json.dumps({**record, "scores": scores}, indent=2) + "\n")
    for task, s in scores.items():
        flawed = f"  flawed {s['flawed']:.2f}" if "flawed" in s else ""
        print(f"{task:16s} mean {s['mean']:.3f}  strict {s['strict']:.3f}  (n={s['n']}){flawed}")
    print(f"wrote {folder}_grid.png and {folder}_scores.json")


def main():
    parser = argparse.ArgumentParser(description="Pretrain the tiny base, then sample and score it.")
    parser.add_argument("--out", default="assets/tiny/base")
    for k in ("steps", "batch_size", "lr", "seed", "flaw_rate", "flaw_from"):
        parser.add_argument(f"--{k}", type=type(PRETRAIN[k]), default=PRETRAIN[k])
    parser.add_argument("--snapshots", default="", help="also save and score the EMA weights after these "
                        "steps (comma-separated), to {out}_stepN; each equals a run with --steps N")
    args = parser.parse_args()
    # the budget the base is sized for is 2 CPU cores; OMP_NUM_THREADS=1 lets two runs share them
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    snapshots = sorted(int(n) for n in args.snapshots.split(",") if n)
    out = Path(args.out)
    rows = sum(len(prompt_set(t, "train")) for t in TASKS)
    print(f"pretraining {out}: {args.steps} steps x batch {args.batch_size} = "
          f"{args.steps * args.batch_size} renders of {rows} train prompts, lr {args.lr}, seed {args.seed}")
    t0 = time.time()
    pipe, losses = pretrain(out, args.steps, args.batch_size, args.lr, args.seed, flaw_rate=args.flaw_rate,
                            flaw_from=args.flaw_from, snapshots=snapshots)
    train_s = time.time() - t0
    n_params = sum(p.numel() for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                   for p in m.parameters())

    def command(steps):
        changed = [f" --{k} {getattr(args, k)}" for k in ("batch_size", "lr", "flaw_rate", "flaw_from")
                   if getattr(args, k) != PRETRAIN[k]]
        return f"python tinyworld.py --out {args.out} --steps {steps} --seed {args.seed}" + "".join(changed)

    record = {"pretrain": {**PRETRAIN, **vars(args)}, "model": BASE_MODEL, "params": n_params, "sampling": SAMPLING}
    for n in snapshots:
        if n < args.steps:
            print(f"snapshot after {n} steps:")
            report(f"{out}_step{n}", {**record, "command": command(n),
                                      "final_loss": round(float(np.mean(losses[n - 50:n])), 4)})
    report(out, {**record, "command": command(args.steps), "pretrain_seconds": round(train_s),
                 "final_loss": round(float(np.mean(losses[-50:])), 4)}, pipe)
    print(f"pretraining {train_s:.0f} s, total wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
