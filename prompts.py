"""
Prompt sets. A row is {"prompt": str, "task": str, "metadata": dict}; the task routes the
prompt to its reward and its teacher, the metadata is what the reward needs.

    from prompts import load_prompts
    rows = load_prompts("ocr", "train")        # generated here, deterministic
    rows = load_prompts("geneval", "test")     # GenEval-style metadata, GenEval's jsonl form
    rows = load_prompts("count", "train")      # the tiny world's sets (tinyworld.prompt_set)
    rows = load_prompts("geneval", "test", path="evaluation_metadata.jsonl")  # a user's file

User files use Flow-GRPO's formats: a .txt with one prompt per line (OCR), or a .jsonl with
one JSON object per line holding a "prompt" (GenEval: the evaluation metadata); a folder
is read as <folder>/<split>.txt, <split>.jsonl or <split>_metadata.jsonl. Files are checked
line by line on load, so a bad prompt fails with file:line before any model loads.
"""

import json
import os
import random
import re
import zlib

# -----------------------------------------------------------------------------
# defaults
SPLITS = ("train", "test")
TEST_EVERY = 10  # a text or prompt is in the test split when its crc32 % TEST_EVERY == 0
OCR_SIZE = {"train": 5000, "test": 500}
GENEVAL_SIZE_PER_TAG = {"train": 1000, "test": 100}  # fewer where a tag has fewer prompts
GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
TINY_TASKS = ("count", "text", "clean")


# -----------------------------------------------------------------------------
# the vocabulary that prompts and rewards share: GenEval's classes, colours and relations, and
# the text an OCR prompt asks for (rewards.py reads them from here: a word list needs no torch)

# GenEval's 80 COCO class names, in COCO order (GenEval renames mouse/remote/keyboard)
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ["left of", "right of", "above", "below"]


def quoted_text(prompt):
    """The text an OCR prompt asks for, or None.

    Flow-GRPO's rule wherever the prompt has a straight double quote: the text after the first
    one, up to the next or, when the quote is never closed, to the end (its
    `prompt.split('"')[1]`). Beyond Flow-GRPO, which stops with an IndexError on a prompt without
    one: the first span in curly double quotes, else in single quotes (a straight one only opens
    at a word boundary, so that apostrophes in don't or shop's are not quotes). None when there is
    no such span or it is empty once spaces are removed (Flow-GRPO would divide by zero)."""
    if '"' in prompt:
        text = prompt.split('"')[1]
        return text if normalize_text(text) else None
    for patterns in ([r"“([^”]+)”"], [r"‘([^’]+)’", r"(?<!\w)'([^']+)'(?!\w)"]):
        found = [m for m in (re.search(p, prompt) for p in patterns) if m and normalize_text(m.group(1))]
        if found:
            return min(found, key=lambda m: m.start()).group(1)
    return None


def normalize_text(text):
    """Lower case without spaces, as Flow-GRPO compares texts. Only the space character goes: a
    tab or a newline stays and costs an edit, as it does there."""
    return text.replace(" ", "").lower()


# -----------------------------------------------------------------------------


def split_of(key):
    """The split a text belongs to, from a stable hash: splits never share a text, and growing
    a set never moves a text from one split to the other."""
    return "test" if zlib.crc32(key.encode()) % TEST_EVERY == 0 else "train"


def _draw(make, split, n, key, seed):
    """Up to n distinct rows of `split` from the generator make(rng); a bounded number of draws,
    so that small pools (80 single objects) end the loop."""
    rng, seen, rows = random.Random(seed), set(), []
    for _ in range(20 * n):
        row = make(rng)
        k = key(row)
        if k not in seen and split_of(k) == split:
            seen.add(k)
            rows.append(row)
            if len(rows) == n:
                break
    return rows

# -----------------------------------------------------------------------------
# OCR: a quoted text in a scene template


OCR_WORDS = """
open closed welcome coffee bakery books garden ocean river forest mountain sunset sunrise
happy birthday love peace hope dream music dance pizza burger tacos sushi donuts market
station library museum hotel cinema theater pharmacy school exit entrance stop slow caution
danger quiet sale fresh bread milk honey lemon apple cherry mango summer winter autumn spring
north south east west city street avenue road bridge harbor island valley desert canyon
galaxy planet rocket robot dragon tiger eagle wolf panda koala thanks friends family home
hello world future vintage classic studio records radio pixel magic wonder golden silver
midnight morning evening lucky brave bright cozy wild free
""".split()

OCR_TEMPLATES = [
    'A storefront sign that reads "{}"',
    'A neon sign glowing with the words "{}" on a brick wall',
    'A coffee mug with "{}" printed on it',
    'A chalkboard menu with "{}" written in white chalk',
    'A vintage poster with the title "{}"',
    'A T-shirt with the slogan "{}"',
    'A book cover titled "{}"',
    'A birthday cake decorated with the words "{}" in icing',
    'A wooden signpost carved with "{}"',
    'A street banner that says "{}"',
    'A license plate that reads "{}"',
    'A handwritten note saying "{}" on a desk',
    'A billboard on a highway displaying "{}"',
    'A cereal box with the brand name "{}"',
    'A greeting card that says "{}"',
    'A graffiti mural spelling "{}" on a concrete wall',
    'A movie marquee announcing "{}"',
    'A bottle label printed with "{}"',
    'A road sign that says "{}"',
    'A sand beach with "{}" written in the sand',
]


def _ocr_text(rng):
    """One to three words, sometimes with a number, in a random letter case."""
    words = rng.sample(OCR_WORDS, rng.choice([1, 1, 2, 2, 3]))
    if rng.random() < 0.2:
        words.append(str(rng.choice([rng.randint(1, 99), rng.randint(100, 2099)])))
    text = " ".join(words)
    return rng.choice([text.lower(), text.upper(), text.title()])


def _ocr_row(rng):
    text = _ocr_text(rng)
    return {"prompt": rng.choice(OCR_TEMPLATES).format(text), "task": "ocr", "metadata": {"text": text}}


def ocr_prompts(split):
    """OCR prompts, split by their (normalised) text, so a test text never appears in training."""
    key = lambda row: "".join(row["metadata"]["text"].lower().split())
    return _draw(_ocr_row, split, OCR_SIZE[split], key, seed="ocr")

# -----------------------------------------------------------------------------
# GenEval: metadata in GenEval's jsonl form from its six templates


NUMBERS = {2: "two", 3: "three", 4: "four"}
COLORABLE = [c for c in COCO_CLASSES if c != "person"]  # GenEval has no "a red person"


def with_article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(name):
    irregular = {"person": "people", "sheep": "sheep", "skis": "pairs of skis", "knife": "knives"}
    if name in irregular:
        return irregular[name]
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def _single_object(rng):
    c = rng.choice(COCO_CLASSES)
    return {"tag": "single_object", "include": [{"class": c, "count": 1}], "prompt": f"a photo of {with_article(c)}"}


def _two_object(rng):
    a, b = rng.sample(COCO_CLASSES, 2)
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}


def _counting(rng):
    c, n = rng.choice(COCO_CLASSES), rng.randint(2, 4)
    return {"tag": "counting", "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(c)}"}


def _colors(rng):
    c, color = rng.choice(COLORABLE), rng.choice(COLORS)
    return {"tag": "colors", "include": [{"class": c, "count": 1, "color": color}],
            "prompt": f"a photo of {with_article(color)} {c}"}


def _position(rng):
    a, b = rng.sample(COCO_CLASSES, 2)
    rel = rng.choice(RELATIONS)
    # the target comes first in "include": the position clause points at it by index
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"}


def _color_attr(rng):
    (a, b), (ca, cb) = rng.sample(COLORABLE, 2), rng.sample(COLORS, 2)
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"}


GENEVAL_MAKERS = {"single_object": _single_object, "two_object": _two_object, "counting": _counting,
                  "colors": _colors, "position": _position, "color_attr": _color_attr}


def geneval_prompts(split):
    """GenEval-style rows, up to GENEVAL_SIZE_PER_TAG[split] per tag, split by prompt."""
    rows = []
    for tag in GENEVAL_TAGS:
        metas = _draw(GENEVAL_MAKERS[tag], split, GENEVAL_SIZE_PER_TAG[split], lambda m: m["prompt"], seed=f"geneval-{tag}")
        rows += [{"prompt": m["prompt"], "task": "geneval", "metadata": m} for m in metas]
    return rows


BUILTIN = {"ocr": ocr_prompts, "geneval": geneval_prompts}

# -----------------------------------------------------------------------------
# validation and user files


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def geneval_problem(meta):
    """What is wrong with one GenEval metadata dict, or None."""
    if meta.get("tag") not in GENEVAL_TAGS:
        return f"tag {meta.get('tag')!r} is not one of {GENEVAL_TAGS}"
    include, exclude = meta.get("include"), meta.get("exclude", [])
    if not isinstance(include, list) or not include:
        return "'include' must be a non-empty list"
    if not isinstance(exclude, list):
        return "'exclude' must be a list"
    for field, clauses in (("include", include), ("exclude", exclude)):
        for i, req in enumerate(clauses):
            where = f"{field}[{i}]"
            if not isinstance(req, dict) or "class" not in req or "count" not in req:
                return f"{where} needs 'class' and 'count'"
            if req["class"] not in COCO_CLASSES:
                return f"{where}: unknown class {req['class']!r}"
            if not _is_count(req["count"]):
                return f"{where}: count must be a positive integer"
            if "color" in req and req["color"] not in COLORS:
                return f"{where}: colour {req['color']!r} is not one of {COLORS}"
            if "position" in req:
                pos = req["position"]
                if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                        and isinstance(pos[1], int) and 0 <= pos[1] < i and field == "include"):
                    return f"{where}: position must be [relation, index of an earlier include clause]"
    return None


def make_row(task, prompt, metadata, where):
    """A checked row; `where` ("file:line") prefixes the error."""
    if not prompt.strip():
        raise ValueError(f"{where}: empty prompt")
    if task == "ocr":
        text = quoted_text(prompt)
        if text is None:
            raise ValueError(f"{where}: OCR prompt has no quoted text: {prompt!r}")
        metadata = {**metadata, "text": text}
    if task == "geneval":
        problem = geneval_problem(metadata)
        if problem:
            raise ValueError(f"{where}: {problem}")
    return {"prompt": prompt, "task": task, "metadata": metadata}


def _split_file(folder, split):
    for name in (f"{split}.txt", f"{split}.jsonl", f"{split}_metadata.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(f"{folder}: no {split}.txt, {split}.jsonl or {split}_metadata.jsonl")


def read_prompt_file(path, task, split="train"):
    """Rows from a user file (.txt: a prompt per line; .jsonl: an object with "prompt" per line,
    the object being the metadata), every line checked; blank lines are skipped."""
    if os.path.isdir(path):
        path = _split_file(path, split)
    jsonl = path.endswith(".jsonl")
    if task == "geneval" and not jsonl:
        raise ValueError(f"{path}: GenEval prompts need a metadata .jsonl file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            if jsonl:
                try:
                    meta = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
                if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                    raise ValueError(f"{where}: expected a JSON object with a string 'prompt'")
                rows.append(make_row(task, meta["prompt"], meta, where))
            else:
                rows.append(make_row(task, line.strip(), {}, where))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def held_out_note(path):
    """A line for the log when a training run's prompt path is one file: its prompts then serve
    as the test prompts too, and periodic evals measure fit, not generalisation. None for the
    built-in sets and for a folder with train and test files."""
    if path and not os.path.isdir(path):
        return (f"note: {path} is one file, so the periodic evals score training prompts; a folder "
                "with train and test files (train.txt, test.txt or .jsonl) holds prompts out")
    return None


def spread(rows, n):
    """n rows evenly spaced over `rows` (all of them if n is 0 or too large), each with "index",
    its place in `rows`. Periodic evals use it instead of a prefix, since a set grouped by tag
    (tiny count: single, counting, two-object, position) would be judged on its easy tags only;
    the index seeds a prompt's noise as eval.py seeds it (scoring.seeded_jobs), so a prompt both
    score is sampled from the same noise in both."""
    picked = range(len(rows)) if not n or n >= len(rows) else [i * len(rows) // n for i in range(n)]
    return [{**rows[k], "index": k} for k in picked]


def load_prompts(task, split, path=None):
    """The prompt rows of `task` for `split`: from `path` when given, else the built-in set."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if path is not None:
        return read_prompt_file(path, task, split)
    if task in BUILTIN:
        return BUILTIN[task](split)
    if task in TINY_TASKS:
        import tiny.world as tinyworld
        return tinyworld.prompt_set(task, split)
    raise ValueError(f"no built-in prompts for task {task!r}; built-in tasks: "
                     f"{', '.join(list(BUILTIN) + list(TINY_TASKS))} (or pass a file)")
