"""
Rewards: every reward is one function with one signature,

    scores, info = reward(images, prompts, metadata)

images: a list of PIL images, or a uint8 tensor (B, 3, H, W) or (B, H, W, 3);
prompts: list[str]; metadata: list[dict], one per image (None for rewards that ignore it);
scores: float32 tensor (B,) in [0, 1]; info: one dict per image (what was read or
detected, and "strict": the pass/fail an evaluation counts).

    from rewards import get_reward, parse_reward_spec
    scores, info = get_reward("ocr")(images, prompts, metadata)
    reward = parse_reward_spec("ocr:0.8,pickscore:0.2")   # weighted sum

Models load lazily, once per process, into MODELS (tests put tiny models there) on
DEVICE (set_device changes it, e.g. to each rank's GPU under torchrun).
"""

import re

import numpy as np
import torch
from PIL import Image
from rapidfuzz.distance import Levenshtein

# -----------------------------------------------------------------------------
# defaults
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# OCR: RapidOCR's bundled PP-OCR models; any of its config keys can be overridden here.
# Detection runs at the image's own size up to 960 px (PaddleOCR's default, which Flow-GRPO
# used) instead of RapidOCR's upscaling to 736 px, which costs 2x at 512 px for nothing.
OCR_PARAMS = {"Global.log_level": "critical",  # RapidOCR logs every call at "info"
              "Det.limit_type": "max", "Det.limit_side_len": 960}
# GenEval: detector, colour classifier and the constants of GenEval's evaluate_images.py
GENEVAL_DETECTOR_ID = "facebook/mask2former-swin-small-coco-instance"
GENEVAL_CLIP_ID = "openai/clip-vit-large-patch14"
GENEVAL_THRESHOLD = 0.3           # detection score threshold
GENEVAL_COUNT_THRESHOLD = 0.9     # stricter threshold for "counting" prompts
GENEVAL_MAX_OBJECTS = 16          # most confident detections kept per class
GENEVAL_POSITION_THRESHOLD = 0.1  # dead zone, as a fraction of the two boxes' sizes
GENEVAL_CROP_BACKGROUND = "#999"  # what replaces the pixels outside an object's mask
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ["left of", "right of", "above", "below"]
# PickScore: the CLIP-H processor and the PickScore_v1 weights
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_SCALE = 26.0            # reward = PickScore / 26, as Flow-GRPO does
# -----------------------------------------------------------------------------

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
# detector label names that differ from GenEval's (COCO / transformers spellings)
LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                 "hair dryer": "hair drier", "sofa": "couch", "tvmonitor": "tv", "motorbike": "motorcycle",
                 "aeroplane": "airplane", "diningtable": "dining table", "pottedplant": "potted plant"}

MODELS = {}  # name -> loaded model(s); filled on first use, or by hand (tests)


def set_device(device):
    """Load reward models on `device` from now on, and move the ones already loaded."""
    global DEVICE
    DEVICE = device
    for entry in MODELS.values():
        for obj in (entry.values() if isinstance(entry, dict) else [entry]):
            if isinstance(obj, torch.nn.Module):
                obj.to(device)


def _models(name, load):
    """The cached models for `name`, loading them on first use."""
    if name not in MODELS:
        MODELS[name] = load()
    return MODELS[name]


def to_pil(images):
    """A list of RGB PIL images from PIL images or a uint8 (or [0,1] float) batch tensor."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 3 and x.shape[-1] != 3:  # (B, 3, H, W) -> (B, H, W, 3)
            x = x.permute(0, 2, 3, 1)
        return [Image.fromarray(a) for a in x.numpy()]
    return [im.convert("RGB") for im in images]


def _device(model):
    return next(model.parameters()).device


def _embeddings(out):
    """Unit-norm features; get_*_features returns a tensor in transformers 4, an output object in 5."""
    x = out if isinstance(out, torch.Tensor) else out.pooler_output
    return x / x.norm(dim=-1, keepdim=True)

# -----------------------------------------------------------------------------
# OCR


def quoted_text(prompt):
    """The first quoted span of a prompt, or None. Double quotes (straight or curly) win over
    single ones, and a straight single quote only opens a span at a word boundary, so that
    apostrophes (don't, shop's) are not read as quotes."""
    for patterns in ([r'"([^"]+)"', r"“([^”]+)”"], [r"‘([^’]+)’", r"(?<!\w)'([^']+)'(?!\w)"]):
        found = [m for m in (re.search(p, prompt) for p in patterns) if m and m.group(1).strip()]
        if found:
            return min(found, key=lambda m: m.start()).group(1)
    return None


def normalize_text(text):
    return "".join(text.lower().split())


def text_similarity(read, target):
    """1 - min(d, n) / n with d the edit distance between the normalised texts and n the target's
    length; full credit when the target occurs anywhere in what was read."""
    read, target = normalize_text(read), normalize_text(target)
    if target in read:
        return 1.0
    n = len(target)
    return 1.0 - min(Levenshtein.distance(read, target), n) / n


def reading_order(boxes):
    """Indices of (x0, y0, x1, y1) boxes top-to-bottom, then left-to-right within a line.
    A box joins the current line when its vertical centre falls inside the line's extent,
    so small vertical jitter between words of one line does not reorder them."""
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1] + boxes[i][3]) / 2)
    lines = []
    for i in order:
        cy = (boxes[i][1] + boxes[i][3]) / 2
        if lines and lines[-1]["y0"] <= cy <= lines[-1]["y1"]:
            lines[-1]["items"].append(i)
        else:
            lines.append({"y0": boxes[i][1], "y1": boxes[i][3], "items": [i]})
    return [i for line in lines for i in sorted(line["items"], key=lambda i: boxes[i][0])]


def _load_ocr():
    from rapidocr import RapidOCR
    return RapidOCR(params=OCR_PARAMS)


def read_text(engine, image):
    """All text RapidOCR finds in a PIL image, boxes joined in reading order."""
    out = engine(image)
    if not out.txts:
        return ""
    quads = np.asarray(out.boxes)  # (N, 4, 2) corner points
    boxes = [(q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()) for q in quads]
    return " ".join(out.txts[i] for i in reading_order(boxes))


def ocr_reward(images, prompts, metadata=None):
    """How well the image spells the prompt's first quoted span (RapidOCR, CPU, offline)."""
    engine = _models("ocr", _load_ocr)
    scores, info = [], []
    for image, prompt in zip(to_pil(images), prompts):
        target = quoted_text(prompt)
        if target is None:
            raise ValueError(f"ocr reward: no quoted text in prompt {prompt!r}")
        read = read_text(engine, image)
        score = text_similarity(read, target)
        scores.append(score)
        info.append({"target": target, "read": read, "strict": score == 1.0})
    return torch.tensor(scores, dtype=torch.float32), info

# -----------------------------------------------------------------------------
# GenEval: rules over detections (pure), then the models that produce the detections


def relative_position(box_a, box_b):
    """GenEval's relations of box A to box B ((x0, y0, x1, y1), image coordinates, y down):
    the centre offset, shrunk by a dead zone of POSITION_THRESHOLD times the boxes' summed
    sizes, must point mostly (cosine > 0.5) along an axis."""
    a, b = np.asarray(box_a[:4], float).reshape(2, 2), np.asarray(box_b[:4], float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(np.diff(a, axis=0)[0]) + np.abs(np.diff(b, axis=0)[0])
    revised = np.maximum(np.abs(offset) - GENEVAL_POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {rel for rel, ok in [("left of", dx < -0.5), ("right of", dx > 0.5),
                                ("above", dy < -0.5), ("below", dy > 0.5)] if ok}


def keep_objects(detections, tag):
    """GenEval's selection: detections above the threshold (stricter for counting prompts),
    grouped by class, most confident first, at most MAX_OBJECTS per class."""
    threshold = GENEVAL_COUNT_THRESHOLD if tag == "counting" else GENEVAL_THRESHOLD
    objects = {}
    for det in sorted(detections, key=lambda d: -d["score"]):
        group = objects.setdefault(det["class"], [])
        if det["score"] > threshold and len(group) < GENEVAL_MAX_OBJECTS:
            group.append(det)
    return {c: group for c, group in objects.items() if group}


def geneval_rules(objects, metadata):
    """Score kept objects ({class: [{"box", "score", "color"?}, ...]}, most confident first)
    against GenEval metadata. Returns (partial, strict, reasons).

    strict is GenEval's pass/fail: every include clause needs `count` objects of its class;
    the top `count` must all have the clause's colour and stand in the clause's relation to
    every object of the (passed) target clause; an exclude clause fails at `count` objects.
    partial is the mean of one term per check, each in [0, 1], equal to 1 exactly when the
    check passes: count min(n, k)/k; colour (right-coloured among the top k)/k; position the
    fraction of (object, target) pairs in the relation; exclude 1 - excess/allowed for an
    excess over allowed = count - 1 objects (0 when nothing is allowed)."""
    terms, reasons, groups = [], [], []
    for req in metadata.get("include", []):
        cls, k = req["class"], req["count"]
        found = objects.get(cls, [])
        top = found[:k]
        terms.append(min(len(found), k) / k)
        passed = len(found) >= k
        if not passed:
            reasons.append(f"expected {cls}>={k}, found {len(found)}")
        if "color" in req:
            right = sum(o.get("color") == req["color"] for o in top)
            terms.append(right / k)
            if passed and right < k:
                passed = False
                reasons.append(f"expected {k} {req['color']} {cls}, found {right}: "
                               + ", ".join(str(o.get("color")) for o in top))
        if "position" in req:
            rel, target = req["position"]
            target_passed, target_top = groups[target]
            pairs = [(o, t) for o in top for t in target_top]
            good = sum(rel in relative_position(o["box"], t["box"]) for o, t in pairs)
            terms.append(good / len(pairs) if pairs else 0.0)
            if passed and not target_passed:
                passed = False
                reasons.append(f"no target for {cls} to be {rel}")
            elif passed and good < len(pairs):
                passed = False
                reasons.append(f"expected {cls} {rel} target, {good} of {len(pairs)} pairs are")
        groups.append((passed, top))
    strict = all(passed for passed, _ in groups)
    for req in metadata.get("exclude", []):
        n, allowed = len(objects.get(req["class"], [])), req["count"] - 1
        terms.append(1.0 if n <= allowed else max(0.0, 1 - (n - allowed) / max(allowed, 1)))
        if n > allowed:
            strict = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    partial = sum(terms) / len(terms) if terms else float(strict)
    return partial, strict, reasons


def _load_geneval():
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation
    return {
        "detector": Mask2FormerForUniversalSegmentation.from_pretrained(GENEVAL_DETECTOR_ID).to(DEVICE).eval(),
        "detector_processor": AutoImageProcessor.from_pretrained(GENEVAL_DETECTOR_ID),
        "clip": CLIPModel.from_pretrained(GENEVAL_CLIP_ID).to(DEVICE).eval(),
        "clip_processor": CLIPProcessor.from_pretrained(GENEVAL_CLIP_ID),
    }


def _class_name(label):
    name = LABEL_ALIASES.get(label, label)
    return name if name in COCO_CLASSES else None


@torch.no_grad()
def detect(images, models):
    """Mask2Former instances above the lower GenEval threshold: per image a list of
    {"class", "score", "box" (x0, y0, x1, y1 in pixels, from the mask), "mask" (bool HxW)}."""
    det, proc = models["detector"], models["detector_processor"]
    inputs = proc(images=images, return_tensors="pt")
    out = det(pixel_values=inputs["pixel_values"].to(_device(det), det.dtype))
    results = proc.post_process_instance_segmentation(
        out, threshold=min(GENEVAL_THRESHOLD, GENEVAL_COUNT_THRESHOLD),
        target_sizes=[im.size[::-1] for im in images], return_binary_maps=True)
    batch = []
    for res in results:
        dets = []
        for j, seg in enumerate(res["segments_info"]):
            cls = _class_name(det.config.id2label[seg["label_id"]])
            mask = res["segmentation"][j].bool().cpu().numpy()
            ys, xs = np.nonzero(mask)
            if cls is None or len(xs) == 0:
                continue
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            dets.append({"class": cls, "score": float(seg["score"]), "box": box, "mask": mask})
        batch.append(dets)
    return batch


@torch.no_grad()
def _color_classifier(cls, models):
    """Per class, the unit text embedding of each colour averaged over GenEval's templates."""
    cache = models.setdefault("color_classifiers", {})
    if cls not in cache:
        clip, proc = models["clip"], models["clip_processor"]
        templates = [f"a photo of a {{}} {cls}", f"a photo of a {{}}-colored {cls}", "a photo of a {} object"]
        texts = [t.format(c) for c in COLORS for t in templates]
        tokens = proc(text=texts, padding=True, return_tensors="pt").to(_device(clip))
        emb = _embeddings(clip.get_text_features(**tokens)).view(len(COLORS), len(templates), -1).mean(1)
        cache[cls] = emb / emb.norm(dim=-1, keepdim=True)
    return cache[cls]


@torch.no_grad()
def classify_colors(image, objects, cls, models):
    """Zero-shot colour of each object: CLIP on its box crop, grey outside its mask (GenEval)."""
    clip, proc = models["clip"], models["clip_processor"]
    blank = Image.new("RGB", image.size, GENEVAL_CROP_BACKGROUND)
    crops = [Image.composite(image, blank, Image.fromarray(o["mask"])).crop(tuple(o["box"])) for o in objects]
    pixels = proc(images=crops, return_tensors="pt")["pixel_values"].to(_device(clip), clip.dtype)
    feats = _embeddings(clip.get_image_features(pixel_values=pixels))
    return [COLORS[i] for i in (feats @ _color_classifier(cls, models).to(feats).T).argmax(1).tolist()]


def geneval_reward(images, prompts, metadata):
    """GenEval on each image against its metadata (GenEval jsonl form): partial credit as the
    score, GenEval's pass/fail as info["strict"]."""
    if metadata is None:
        raise ValueError("geneval reward: needs GenEval metadata (tag, include, exclude) for every image")
    models = _models("geneval", _load_geneval)
    images = to_pil(images)
    scores, info = [], []
    for image, dets, meta in zip(images, detect(images, models), metadata):
        objects = keep_objects(dets, meta["tag"])
        colors = {}
        for req in meta.get("include", []):
            top = objects.get(req["class"], [])[:req["count"]]
            if "color" in req and top:
                for o, c in zip(top, classify_colors(image, top, req["class"], models)):
                    o["color"] = c
                colors[req["class"]] = [o["color"] for o in top]
        partial, strict, reasons = geneval_rules(objects, meta)
        scores.append(partial)
        info.append({"tag": meta["tag"], "strict": strict, "reasons": reasons, "colors": colors,
                     "detected": {c: [o["box"] for o in group] for c, group in objects.items()}})
    return torch.tensor(scores, dtype=torch.float32), info

# -----------------------------------------------------------------------------
# PickScore


def _load_pickscore():
    from transformers import CLIPModel, CLIPProcessor
    return {"model": CLIPModel.from_pretrained(PICKSCORE_MODEL_ID).to(DEVICE).eval(),
            "processor": CLIPProcessor.from_pretrained(PICKSCORE_PROCESSOR_ID)}


@torch.no_grad()
def pickscore_reward(images, prompts, metadata=None):
    """PickScore (logit_scale * cosine(image, prompt)) / 26, clipped to [0, 1]; the raw score is
    info["pickscore"]. Real images score about 18-24, so the clip never binds in practice."""
    m = _models("pickscore", _load_pickscore)
    model, proc = m["model"], m["processor"]
    dev = _device(model)
    pixels = proc(images=to_pil(images), return_tensors="pt")["pixel_values"].to(dev, model.dtype)
    tokens = proc(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(dev)
    cos = (_embeddings(model.get_image_features(pixel_values=pixels))
           * _embeddings(model.get_text_features(**tokens))).sum(-1)
    raw = (model.logit_scale.exp() * cos).float().cpu()
    return (raw / PICKSCORE_SCALE).clamp(0, 1), [{"pickscore": float(r)} for r in raw]

def brightness_reward(images, prompts=None, metadata=None):
    """Mean pixel brightness in [0, 1], whatever the prompt. Not a task: a reward with an obvious
    optimum, to check that an RL loop learns at all (the tests' learning check uses it)."""
    scores = torch.tensor([np.asarray(im, dtype=np.float32).mean() / 255 for im in to_pil(images)])
    return scores, [{"brightness": float(s)} for s in scores]

# -----------------------------------------------------------------------------
# registry and combinations


def _tiny(name):
    """The tiny world's reward `name`, imported on first call so this module stands alone."""
    def reward(images, prompts, metadata=None):
        import tinyworld  # numpy only: it gets PIL images and returns a numpy array
        scores, info = getattr(tinyworld, f"{name}_reward")(to_pil(images), prompts, metadata)
        return torch.from_numpy(scores), info
    reward.__name__ = f"{name}_reward"
    return reward


REWARDS = {
    "ocr": ocr_reward,
    "geneval": geneval_reward,
    "pickscore": pickscore_reward,
    "count": _tiny("count"),
    "text": _tiny("text"),
    "clean": _tiny("clean"),
    "brightness": brightness_reward,
}


def get_reward(name):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def first_line(error):
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def preload(specs):
    """Load the models of every reward in `specs` (names or "name:weight,..." specs) now, so a
    model the hub cannot give (offline, gated, a typo in an id) stops the run at start-up with one
    line naming the reward and the model, not after the pipeline loaded and sampled."""
    loaders = {"ocr": (_load_ocr, "RapidOCR's bundled models"),
               "geneval": (_load_geneval, f"{GENEVAL_DETECTOR_ID} and {GENEVAL_CLIP_ID}"),
               "pickscore": (_load_pickscore, f"{PICKSCORE_MODEL_ID} and {PICKSCORE_PROCESSOR_ID}")}
    names = [item.partition(":")[0].strip() for spec in specs for item in spec.split(",")]
    for name in dict.fromkeys(filter(None, names)):
        get_reward(name)
        if name in loaders and name not in MODELS:
            load, models = loaders[name]
            try:
                _models(name, load)
            except Exception as e:  # OSError offline, GatedRepoError, HFValidationError, ...
                raise ValueError(f"reward {name!r} cannot load {models} ({first_line(e)}); it needs the "
                                 f"hub once, or HF_HOME with a copy; or leave {name} out of the tasks") from None


def parse_reward_spec(spec):
    """A reward from "name" or "name:weight,name:weight,...": the weighted sum of the scores
    (in [0, 1] when the weights are non-negative and sum to at most 1). Each image's info holds
    every part's info (with its score) under the part's name; "strict" is the AND of the
    parts' strict verdicts, present when any part gives one."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            parts.append((name.strip(), get_reward(name.strip()), float(weight) if weight else 1.0))
        except ValueError as e:
            raise ValueError(f"bad reward spec {spec!r}: {e}") from None

    def reward(images, prompts, metadata=None):
        total, info = 0.0, [{} for _ in prompts]
        for name, fn, weight in parts:
            scores, part_info = fn(images, prompts, metadata)
            total = total + weight * scores
            for row, part, s in zip(info, part_info, scores.tolist()):
                row[name] = {**part, "score": s}
        for row in info:
            verdicts = [part["strict"] for part in row.values() if "strict" in part]
            if verdicts:
                row["strict"] = all(verdicts)
        return total.float(), info

    reward.__name__ = "reward_" + "_".join(name for name, _, _ in parts)
    return reward
