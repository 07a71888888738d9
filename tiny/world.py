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

with scores a float32 array (B,) in [0, 1] (graded partial credit, the training signal; rewards.py
hands them to the stages as a tensor) and info one dict per image with "strict" (exact pass/fail,
the eval metric) and what was read. The module is only the world: numpy, Pillow and rapidfuzz,
no torch. Like web data, the world also draws each task's *flaw* (render(row, seed, flawed=True)),
which that task's reward alone marks down: an extra shape in a colour the prompt does not name
(count), a grey band across the board (clean), a grey bar under the line that the reader takes
for the text (text). tiny/pretrain.py (stage 0) trains the tiny base on these pictures.

    import tiny.world as tinyworld
    rows = tinyworld.prompt_set("count", "test")          # [{"prompt", "task", "metadata"}]
    images = [tinyworld.render(row, seed=0) for row in rows]
    scores, info = tinyworld.count_reward(images, [r["prompt"] for r in rows],
                                          [r["metadata"] for r in rows])
"""

import itertools
import re
import zlib

import numpy as np
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
    share of the pretraining pictures have it (tiny.pretrain.PRETRAIN["flaw_rate"])."""
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
    """uint8 array (B, 3, 32, 32) of render(row, seed, flawed) for each triple (flawed: None, no flaws)."""
    flawed = [False] * len(rows) if flawed is None else flawed
    arr = np.stack([np.asarray(render(r, s, f)) for r, s, f in zip(rows, seeds, flawed)])
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def sample_training_batch(rows, batch_size, seed, flaw_rate=0.0):
    """Pretraining data: batch_size rows drawn uniformly from `rows`, each rendered with a fresh
    seed and, with probability flaw_rate, with its task's flaw. Returns (rows, uint8 array
    (B, 3, 32, 32)). Deterministic for the seed."""
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.integers(0, len(rows), size=batch_size)]
    seeds = rng.integers(0, 2 ** 31, size=batch_size).tolist()
    return picked, render_batch(picked, seeds, (rng.random(batch_size) < flaw_rate).tolist())

# -----------------------------------------------------------------------------
# parsing images back


def to_uint8_images(images):
    """A list of PIL images, or a uint8 array (B, H, W, 3) or (B, 3, H, W) as render_batch makes,
    as a numpy uint8 array (B, H, W, 3). (rewards.py hands the tiny rewards PIL images.)"""
    if isinstance(images, np.ndarray):
        return images.transpose(0, 2, 3, 1) if images.shape[1] == 3 and images.shape[-1] != 3 else images
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
    return np.array([s for s, _ in results], np.float32), [i for _, i in results]


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


def read_glyphs(img):
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
        read = read_glyphs(img)
        d = Levenshtein.distance(read, target)
        scores.append(1 - min(d, len(target)) / len(target))
        info.append({"strict": read == target, "read": read, "target": target, "distance": d})
    return np.array(scores, np.float32), info


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
    scores = np.array([s for s, _ in results], np.float32)
    return scores, [{"strict": s >= CLEAN_STRICT, **i} for s, i in results]

def shows_flaw(task, img, info):
    """Whether a sample carries its task's pretraining flaw: a shape in a colour nobody asked for
    (count; `info` is its count_reward info), or a grey bar or band (text, clean)."""
    if task == "count":
        return info["extra"] > 0
    grey = palette_distances(np.asarray(img, np.float32), np.array([STAIN], np.float32))[..., 0] < MATCH_DIST / 2
    return int(grey.sum()) >= MIN_OBJECT_AREA


# -----------------------------------------------------------------------------
# what every stage samples with under --preset tiny (pretraining is tiny/pretrain.py)

# Training rollouts keep SD3.5-M's 10 SDE steps; evaluation uses 20 ODE steps (the tiny model's
# samples stop improving around there). Without T5 an SD3 pipeline pads every prompt with
# max_sequence_length identical zero tokens; the tiny base is trained and sampled with one, which
# is 2-3x cheaper than SD3's 256.
SAMPLING = dict(resolution=SIZE, num_steps=10, eval_steps=20, guidance=4.5, noise_level=0.7, t5_tokens=1)
EVAL_BATCH = 32
