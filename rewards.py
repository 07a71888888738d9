"""
Rewards: every reward is one function with one signature,

    scores, info = reward(images, prompts, metadata)

images: a list of PIL images, or a uint8 tensor (B, 3, H, W) or (B, H, W, 3);
prompts: list[str]; metadata: list[dict], one per image (None for rewards that ignore it);
scores: float32 tensor (B,), in [0, 1] except `geneval`, which keeps the reward server's
negative scores for many extra objects, and the quality metrics (METRICS: `imagereward`, `hps`,
`aesthetic`, `clipscore`), which keep their published scales; info: one dict per image (what was
read or detected, the metric's value under its name, and "strict": the pass/fail an evaluation
counts).

`ocr`, `geneval` and `pickscore` score as Flow-GRPO's training code does (its OCR scorer, the
GenEval reward server it calls, its PickScore scorer); docs/reference.md lists what still differs.

    from rewards import get_reward, parse_reward_spec
    scores, info = get_reward("ocr")(images, prompts, metadata)
    reward = parse_reward_spec("ocr:0.8,pickscore:0.2")   # weighted sum

Models load lazily, once per process, into MODELS (tests put tiny models there) on
DEVICE (set_device changes it, e.g. to each rank's GPU under torchrun).
"""

import re
import warnings

import numpy as np
import torch
from PIL import Image
from rapidfuzz.distance import Levenshtein

from prompts import COCO_CLASSES, COLORS, RELATIONS, normalize_text, quoted_text  # the prompts' vocabulary

# -----------------------------------------------------------------------------
# defaults
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# OCR: RapidOCR with the models its wheel ships (offline), set like Flow-GRPO's PaddleOCR 2.9
# (lang="en", use_angle_cls=False, otherwise PaddleOCR's defaults) where RapidOCR has the knob;
# any RapidOCR config key can be overridden here.
OCR_PARAMS = {"Global.log_level": "critical",       # RapidOCR logs every call at "info"
              "Global.use_cls": False,              # Flow-GRPO: no angle classifier
              # PaddleOCR has neither RapidOCR's resize to [30, 2000] px nor its padding of flat images
              "Global.use_preprocess_img": False, "Global.use_vertical_padding": False,
              # PaddleOCR's detector defaults: the image's own size up to 960 px (RapidOCR upscales
              # to 736 px, 2x the cost at 512 px), box threshold 0.6, unclip 1.5, no dilation
              "Det.limit_type": "max", "Det.limit_side_len": 960,
              "Det.box_thresh": 0.6, "Det.unclip_ratio": 1.5, "Det.use_dilation": False}
OCR_LINE_PX = 10  # PaddleOCR's sorted_boxes: boxes whose tops are closer than this read left to right
# GenEval: detector, colour classifier and the constants of GenEval's evaluate_images.py
GENEVAL_DETECTOR_ID = "facebook/mask2former-swin-small-coco-instance"
GENEVAL_CLIP_ID = "openai/clip-vit-large-patch14"
GENEVAL_THRESHOLD = 0.3           # detection score threshold
GENEVAL_COUNT_THRESHOLD = 0.9     # stricter threshold for "counting" prompts
GENEVAL_MAX_OBJECTS = 16          # most confident detections kept per class
GENEVAL_POSITION_THRESHOLD = 0.1  # dead zone, as a fraction of the two boxes' sizes
GENEVAL_CROP_BACKGROUND = "#999"  # what replaces the pixels outside an object's mask
# PickScore: the CLIP-H processor and the PickScore_v1 weights, run in float32 as Flow-GRPO does
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_SCALE = 26.0            # reward = PickScore / 26, as Flow-GRPO does
# The quality metrics (METRICS), each on its published scale. CLIP's image normalisation, which
# all of them use (OpenAI's constants, also open_clip's OPENAI_DATASET_MEAN/STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageReward v1.0: the checkpoint ImageReward.load("ImageReward-v1.0") downloads, BLIP's tokenizer
IMAGEREWARD_MODEL_ID = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_TOKENIZER_ID = "bert-base-uncased"
IMAGEREWARD_MAX_TOKENS = 35       # ImageReward pads and truncates every prompt to 35 tokens
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # its reward standardisation
# ImageReward's BLIP: create_vit("large", 224) and its med_config.json (BERT-base, 30522 words plus
# BLIP's [DEC] and [ENC], cross-attention to the image in every layer)
IMAGEREWARD_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
IMAGEREWARD_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12,
                        hidden_act="gelu", pad_token_id=0)
# HPS v2.1: open_clip ViT-H-14 fine-tuned by HPSv2 (its checkpoint), in transformers' CLIP with the
# config and tokenizer of the open_clip model it starts from
HPS_MODEL_ID = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_CLIP_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# the LAION aesthetic predictor v2: OpenAI CLIP ViT-L/14 and the sac+logos+ava1 linear-MSE head,
# from a hub copy of the file in christophschuhmann/improved-aesthetic-predictor
AESTHETIC_CLIP_ID = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_ID = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
# CLIPScore as Flow-GRPO's clip_scorer.py: OpenAI CLIP ViT-L/14, logit_scale * cosine / 30
CLIPSCORE_MODEL_ID = "openai/clip-vit-large-patch14"
CLIPSCORE_SCALE = 30.0
# -----------------------------------------------------------------------------

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


def text_similarity(read, target):
    """Flow-GRPO's OCR score, 1 - min(d, n) / n, with d the edit distance between the normalised
    texts and n the normalised target's length; full credit when the target occurs anywhere in
    what was read."""
    read, target = normalize_text(read), normalize_text(target)
    if target in read:
        return 1.0
    n = len(target)
    return 1.0 - min(Levenshtein.distance(read, target), n) / n


def paddle_order(corners):
    """Indices of text boxes in PaddleOCR's reading order (its sorted_boxes, the order of the
    texts that Flow-GRPO joins), from each box's first corner (x, y), the top-left of a detected
    quad. The rule: sort by (y, x); then take each box in turn and move it left past its
    predecessors while the two tops are less than OCR_LINE_PX apart and it lies further left,
    stopping at the first predecessor where that fails. So a line is only read left to right when
    its words' tops agree within 10 px; a taller word whose top sits higher is read first."""
    order = sorted(range(len(corners)), key=lambda i: (corners[i][1], corners[i][0]))
    for i in range(len(order) - 1):
        for j in range(i, -1, -1):
            (xa, ya), (xb, yb) = corners[order[j]][:2], corners[order[j + 1]][:2]
            if not (abs(yb - ya) < OCR_LINE_PX and xb < xa):
                break
            order[j], order[j + 1] = order[j + 1], order[j]
    return order


def _load_ocr():
    from rapidocr import RapidOCR
    return RapidOCR(params=OCR_PARAMS)


def read_text(engine, image):
    """All text the OCR engine finds in a PIL image, as Flow-GRPO reads it: the boxes' texts in
    PaddleOCR's order, joined with no separator. The engine gets the RGB array as it is, which
    RapidOCR, like PaddleOCR (handed np.array(image) by Flow-GRPO), takes for BGR."""
    out = engine(np.asarray(image))
    if not out.txts:
        return ""
    corners = [quad[0] for quad in np.asarray(out.boxes)]  # (N, 4, 2) corner points, top-left first
    return "".join(out.txts[i] for i in paddle_order(corners))


def ocr_reward(images, prompts, metadata=None):
    """Flow-GRPO's OCR reward: text_similarity between read_text's reading of the image and the
    prompt's quoted_text (RapidOCR on the CPU, offline). An image the engine fails on scores 0,
    as in Flow-GRPO, with a warning and info "failed": True (eval.py counts them): one bad image
    must not stop a multi-GPU run. A prompt without quoted text raises before any image is read:
    that is bad data, not a bad image (prompts.py rejects such a line when it reads the file)."""
    targets = [quoted_text(p) for p in prompts]
    for prompt, target in zip(prompts, targets):
        if target is None:
            raise ValueError(f"ocr reward: no quoted text in prompt {prompt!r}")
    engine = _models("ocr", _load_ocr)
    scores, info = [], []
    for i, (image, target) in enumerate(zip(to_pil(images), targets)):
        try:
            read = read_text(engine, image)
        except Exception as e:  # whatever the engine raises on an image it cannot handle
            warnings.warn(f"ocr reward: the OCR engine failed on image {i} of the batch, scored 0 "
                          f"({first_line(e)})", RuntimeWarning, stacklevel=2)
            scores.append(0.0)
            info.append({"target": target, "read": "", "strict": False, "failed": True, "error": first_line(e)})
            continue
        score = text_similarity(read, target)
        scores.append(score)
        info.append({"target": target, "read": read, "strict": score == 1.0, "failed": False})
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
    """GenEval's selection: per class, the detections in GenEval's order of confidence, those
    above the threshold (stricter for counting prompts), at most MAX_OBJECTS. The order is
    GenEval's own call, np.argsort(scores)[::-1] over the class's scores in the detector's order,
    so that of two equal scores the later detection comes first, as there."""
    threshold = GENEVAL_COUNT_THRESHOLD if tag == "counting" else GENEVAL_THRESHOLD
    by_class = {}
    for det in detections:
        by_class.setdefault(det["class"], []).append(det)
    objects = {}
    for cls, dets in by_class.items():
        order = np.argsort(np.asarray([d["score"] for d in dets], np.float32))[::-1]  # float32, as mmdet's scores
        kept = [dets[i] for i in order if dets[i]["score"] > threshold][:GENEVAL_MAX_OBJECTS]
        if kept:
            objects[cls] = kept
    return objects


def geneval_verdict(objects, metadata):
    """GenEval's pass/fail (evaluate_images.py) for kept objects ({class: [{"box", "score",
    "color"?}, ...]}, keep_objects' order) against GenEval metadata. Returns (passed, reasons).
    Every include clause needs `count` objects of its class; its top `count` must all have the
    clause's colour, and stand in the clause's relation to every top object of the target clause,
    which must itself have passed; an exclude clause fails at `count` objects."""
    reasons, groups = [], []
    for req in metadata.get("include", []):
        cls, k = req["class"], req["count"]
        top = objects.get(cls, [])[:k]
        passed = len(top) == k
        if not passed:
            reasons.append(f"expected {cls}>={k}, found {len(objects.get(cls, []))}")
        if passed and "color" in req:
            right = sum(o.get("color") == req["color"] for o in top)
            if right < k:
                passed = False
                reasons.append(f"expected {k} {req['color']} {cls}, found {right}: "
                               + ", ".join(str(o.get("color")) for o in top))
        if passed and "position" in req:
            rel, target = req["position"]
            if groups[target] is None:
                passed = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                good = sum(rel in relative_position(o["box"], t["box"]) for o in top for t in groups[target])
                if good < k * len(groups[target]):
                    passed = False
                    reasons.append(f"expected {cls} {rel} target, {good} of {k * len(groups[target])} pairs are")
        groups.append(top if passed else None)
    passed = all(g is not None for g in groups)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            passed = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return passed, reasons


def geneval_server_partial(objects, metadata):
    """The partial score of Flow-GRPO's GenEval reward server (reward-server, gen_eval.py), the
    reward the published GenEval teacher and the paper's GRPO baselines were trained on. The
    mean of one term per rule below, 0 when there is no include clause. Its quirks are kept, as
    they are what those models learned:
    - count: per include clause of k objects with n kept (all n, up to MAX_OBJECTS, not the top
      k), 1 - |k - n| / k. Extra objects cost as much as missing ones, and below 0 past 2k: two
      extra dogs for "a dog" give -1.
    - n != k fails the clause: a colour or a position clause adds one 0 (one, even with both) and
      checks nothing more, so three red cars for "two red cars" lose the colour credit too.
    - colour (n == k): right / k, the share of the k objects of the clause's colour; the clause
      fails unless all of them are.
    - position (n == k and the colour, if any, right): a 0 when the target clause failed;
      otherwise a 0 when some (object, target object) pair is not in the relation (the check
      stops there, so one 0 however many pairs fail), then a 1 in any case: a failed position
      adds [0, 1], a passed one [1].
    - exclude clauses are ignored (a counting prompt's extras already cost through its count).
    The strict verdict (geneval_verdict) is separate: 1 here needs exact counts, GenEval only
    at least k outside counting prompts."""
    terms, groups = [], []
    for req in metadata.get("include", []):
        found, k = objects.get(req["class"], []), req["count"]
        terms.append(1 - abs(k - len(found)) / k)
        passed = len(found) == k
        if not passed and ("color" in req or "position" in req):
            terms.append(0.0)
        if passed and "color" in req:
            right = sum(o.get("color") == req["color"] for o in found)
            terms.append(1 - abs(k - right) / k)
            passed = right == k
        if passed and "position" in req:
            rel, target = req["position"]
            if groups[target] is None:
                terms.append(0.0)
                passed = False
            else:
                if not all(rel in relative_position(o["box"], t["box"]) for o in found for t in groups[target]):
                    terms.append(0.0)
                    passed = False
                terms.append(1.0)
        groups.append(found if passed else None)
    return sum(terms) / len(terms) if terms else 0.0


def geneval_aligned_partial(objects, metadata):
    """A partial credit whose terms each lie in [0, 1] and reach 1 exactly when GenEval's own
    check passes, so the score is 1 exactly when geneval_verdict passes and never punishes what
    GenEval accepts. The mean of one term per check: count min(n, k) / k; colour the share of
    the top k with the clause's colour, (right) / k; position the fraction of (top object,
    target's top object) pairs in the relation (0 without pairs); exclude (at most count - 1
    allowed) 1 - excess / allowed for an excess over the allowed, 0 when none is allowed."""
    terms, tops = [], []
    for req in metadata.get("include", []):
        found, k = objects.get(req["class"], []), req["count"]
        top = found[:k]
        terms.append(min(len(found), k) / k)
        if "color" in req:
            terms.append(sum(o.get("color") == req["color"] for o in top) / k)
        if "position" in req:
            rel, target = req["position"]
            pairs = [(o, t) for o in top for t in tops[target]]
            terms.append(sum(rel in relative_position(o["box"], t["box"]) for o, t in pairs) / len(pairs)
                         if pairs else 0.0)
        tops.append(top)
    for req in metadata.get("exclude", []):
        n, allowed = len(objects.get(req["class"], [])), req["count"] - 1
        terms.append(1.0 if n <= allowed else max(0.0, 1 - (n - allowed) / max(allowed, 1)))
    return sum(terms) / len(terms) if terms else float(geneval_verdict(objects, metadata)[0])


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


def _geneval(images, metadata, partial, name):
    """Detections, colours and GenEval's verdict for each image; `partial` gives its score."""
    if metadata is None:
        raise ValueError(f"{name} reward: needs GenEval metadata (tag, include, exclude) for every image")
    models = _models("geneval", _load_geneval)
    images = to_pil(images)
    scores, info = [], []
    for image, dets, meta in zip(images, detect(images, models), metadata):
        objects = keep_objects(dets, meta["tag"])
        colors = {}
        for req in meta.get("include", []):
            # the top k's colours: all the verdict looks at, and all n = k objects when the
            # server's colour term counts
            top = objects.get(req["class"], [])[:req["count"]]
            if "color" in req and top:
                for o, c in zip(top, classify_colors(image, top, req["class"], models)):
                    o["color"] = c
                colors[req["class"]] = [o["color"] for o in top]
        strict, reasons = geneval_verdict(objects, meta)
        scores.append(partial(objects, meta))
        info.append({"tag": meta["tag"], "strict": strict, "reasons": reasons, "colors": colors,
                     "detected": {c: [o["box"] for o in group] for c, group in objects.items()}})
    return torch.tensor(scores, dtype=torch.float32), info


def geneval_reward(images, prompts, metadata):
    """GenEval with the reward server's partial score (geneval_server_partial: what Flow-GRPO's
    GenEval teacher learned from; it can go below 0) and GenEval's pass/fail as info["strict"]."""
    return _geneval(images, metadata, geneval_server_partial, "geneval")


def geneval_aligned_reward(images, prompts, metadata):
    """GenEval with geneval_aligned_partial as the score and GenEval's pass/fail as
    info["strict"]. The better signal when the aim is GenEval's accuracy itself: the score is 1
    exactly when the image passes and stays in [0, 1], where the server's partial asks for more
    than GenEval does (exactly k objects, so a second dog for "a dog" costs as much as no dog and
    extras push it below 0) and gives a failed position half its credit."""
    return _geneval(images, metadata, geneval_aligned_partial, "geneval_aligned")

# -----------------------------------------------------------------------------
# PickScore


def _load_pickscore():
    from transformers import CLIPModel, CLIPProcessor
    # float32 whatever the stored dtype (transformers 5 loads that by default), as Flow-GRPO pins it
    model = CLIPModel.from_pretrained(PICKSCORE_MODEL_ID).to(DEVICE, torch.float32).eval()
    return {"model": model,
            "processor": CLIPProcessor.from_pretrained(PICKSCORE_PROCESSOR_ID)}


@torch.no_grad()
def pickscore_reward(images, prompts, metadata=None):
    """Flow-GRPO's PickScore reward: (logit_scale * cosine(image, prompt)) / 26 in float32, here
    clipped to [0, 1]; the raw score is info["pickscore"]. Real images score about 18-24, so the
    clip never binds in practice."""
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
# Quality metrics: ImageReward, HPS v2.1, the LAION aesthetic predictor, CLIPScore. Each returns
# the metric on its published scale (score == info[name]), to be compared with papers, not trained
# on. The maintained packages (image-reward, hpsv2, open_clip_torch) all require torchvision, so
# the models run in transformers' classes, their original checkpoints renamed key by key, and the
# preprocessing is written out here as the originals' torchvision transforms compute it.


def _to_tensor(image):
    """torchvision's ToTensor: an RGB PIL image as a (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def _normalize(x):
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _short_side_size(height, width, size):
    """torchvision's Resize(size) output (h, w): the short side becomes `size`, the long side
    int(size * long / short), truncated as torchvision does."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _crop_box(height, width, size):
    """torchvision's CenterCrop offsets: round((side - size) / 2) on each axis."""
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return top, left


def clip_pixels(images, size):
    """CLIP's preprocessing on PIL images, as clip.load's transform and ImageReward's _transform
    compute it: torchvision's Resize(size, BICUBIC) on the PIL image (so PIL's bicubic filter on
    uint8), CenterCrop(size), ToTensor, CLIP's normalisation. (B, 3, size, size)."""
    batch = []
    for image in images:
        h, w = _short_side_size(image.height, image.width, size)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.BICUBIC)
        top, left = _crop_box(h, w, size)
        batch.append(_normalize(_to_tensor(image.crop((left, top, left + size, top + size)))))
    return torch.stack(batch)


def _resize_tensor(x, hw, mode):
    """torchvision's tensor resize (antialias on, its default since 0.17): F.interpolate on the
    float image, unclamped."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return torch.nn.functional.interpolate(x[None], size=tuple(hw), mode=mode, align_corners=False,
                                           antialias=True)[0]


def hps_pixels(images, size):
    """HPSv2's preprocess_val (light_augmentation, so ResizeMaxSize): ToTensor first, then the
    longest side resized to `size` (each side round(side * size / longest)) with bicubic
    interpolation on the float tensor, centred on black (0 before normalisation) to size x size,
    then CLIP's normalisation. (B, 3, size, size)."""
    batch = []
    for image in images:
        x = _to_tensor(image)
        h, w = x.shape[-2:]
        scale = size / max(h, w)
        if scale != 1.0:
            h, w = round(h * scale), round(w * scale)
            x = _resize_tensor(x, (h, w), "bicubic")
            dh, dw = size - h, size - w
            x = torch.nn.functional.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=0.0)
        batch.append(_normalize(x))
    return torch.stack(batch)


def clipscore_pixels(images, size):
    """Flow-GRPO's ClipScorer transform: the image as a [0, 1] float tensor, torchvision's
    Resize(size) (bilinear, its default, on the tensor), CenterCrop(size), CLIP's normalisation.
    (B, 3, size, size)."""
    batch = []
    for image in images:
        x = _to_tensor(image)
        h, w = _short_side_size(*x.shape[-2:], size)
        x = _resize_tensor(x, (h, w), "bilinear")
        top, left = _crop_box(h, w, size)
        batch.append(_normalize(x[:, top:top + size, left:left + size]))
    return torch.stack(batch)


class RatingHead(torch.nn.Module):
    """The MLP that ImageReward and the aesthetic predictor put on a feature vector (the same
    class in both): Linear layers width -> 1024 -> 128 -> 64 -> 16 -> 1 with only dropout between
    them (their ReLUs are commented out), so an affine map when evaluating. `layers` keeps the
    originals' state-dict names (layers.0, .2, .4, .6, .7)."""

    def __init__(self, width):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x).squeeze(-1)


class ImageRewardModel(torch.nn.Module):
    """ImageReward's score in transformers' BLIP classes: BLIP's ViT (BlipVisionModel) encodes
    the image, BLIP's BERT (BlipTextModel, the port of BLIP's med.py BertModel) reads the prompt
    with cross-attention to every image token, and the RatingHead on the [CLS] token's last hidden
    state gives the reward, standardised by ImageReward's mean and std."""

    def __init__(self, config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.config = config
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.mlp = RatingHead(config.text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        # ImageReward passes an all-ones image mask, the same as none
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image).last_hidden_state
        return (self.mlp(text[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_config():
    """ImageReward's BLIP (BlipConfig also sets the text's cross-attention width to the ViT's)."""
    from transformers import BlipConfig
    return BlipConfig(vision_config=IMAGEREWARD_VISION, text_config=IMAGEREWARD_TEXT)


# BLIP's timm-style ViT names -> transformers' BlipVisionModel names
_BLIP_VIT = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_BLIP_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                   "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# in ImageReward.pt but not in its score: BLIP's contrastive projections, and a buffer that
# transformers rebuilds (persistent in BLIP's med.py)
_IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def imagereward_state_dict(original):
    """ImageReward.pt (the state dict of ImageReward's ImageReward module: blip.visual_encoder.*,
    blip.text_encoder.*, mlp.layers.*) in ImageRewardModel's names. The ViT's keys are renamed
    (its fused qkv is laid out as transformers' BlipAttention reads it, so it is kept whole), the
    text encoder's and the head's keep their names. An unknown key is an error, not dropped."""
    out = {}
    for key, value in original.items():
        if key.startswith(_IMAGEREWARD_UNUSED):
            continue
        if key.startswith(("blip.text_encoder.", "mlp.layers.")):
            out[key.removeprefix("blip.")] = value
            continue
        name = key.removeprefix("blip.visual_encoder.")
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if name != key and name in _BLIP_VIT:
            out["vision_model." + _BLIP_VIT[name]] = value
        elif name != key and block and block[2] in _BLIP_VIT_BLOCK:
            out[f"vision_model.encoder.layers.{block[1]}.{_BLIP_VIT_BLOCK[block[2]]}.{block[3]}"] = value
        else:
            raise ValueError(f"imagereward: unexpected key {key!r} in {IMAGEREWARD_FILE}")
    return out


# open_clip CLIP names -> transformers' CLIPModel names (the projections are handled apart)
_OPEN_CLIP = {"logit_scale": "logit_scale",
              "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias",
              "visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
              "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
              "visual.ln_post.weight": "vision_model.post_layernorm.weight",
              "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}
# open_clip multiplies x @ proj; a Linear stores the transpose
_OPEN_CLIP_PROJ = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def _open_clip_block(prefix, name, value):
    """One open_clip resblock entry (`name` after resblocks.N.) as {transformers key: tensor},
    or None when it is not one of a plain ViT block's."""
    part, _, kind = name.rpartition(".")
    if part == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
        # nn.MultiheadAttention packs the q, k, v projections along the output dimension, in that order
        kind = kind.removeprefix("in_proj_")
        return {f"{prefix}self_attn.{q}_proj.{kind}": t for q, t in zip("qkv", value.chunk(3))}
    if part in _OPEN_CLIP_BLOCK and kind in ("weight", "bias"):
        return {f"{prefix}{_OPEN_CLIP_BLOCK[part]}.{kind}": value}
    return None


def open_clip_state_dict(original):
    """An open_clip CLIP state dict (ViT towers, as HPSv2's checkpoint holds ViT-H-14) in
    transformers' CLIPModel names: each block's packed attention input projection split into
    q_proj, k_proj, v_proj, the two projections transposed, the rest renamed. An unknown key (an
    attention pooler, layer scale, another text tower) is an error, not dropped."""
    out = {}
    for key, value in original.items():
        block = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if key in _OPEN_CLIP_PROJ:
            found = {_OPEN_CLIP_PROJ[key]: value.T.contiguous()}
        elif key in _OPEN_CLIP:
            found = {_OPEN_CLIP[key]: value}
        elif block:
            tower = "vision_model" if block[1] else "text_model"
            found = _open_clip_block(f"{tower}.encoder.layers.{block[2]}.", block[3], value)
        else:
            found = None
        if found is None:
            raise ValueError(f"hps: unexpected key {key!r} in an open_clip state dict")
        out.update(found)
    return out


def _from_state_dict(build, state):
    """The module `build()` makes, holding exactly `state` (strict: a missing or a left-over key
    raises), in float32, eval mode, on DEVICE. Built with empty weights, so that a 1-billion
    parameter model is not first initialised at random only to be overwritten."""
    from accelerate import init_empty_weights
    with init_empty_weights():  # parameters on the meta device; buffers (position ids) real
        model = build()
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(DEVICE, torch.float32).eval()


def _hub_checkpoint(repo, filename):
    """A torch checkpoint from the hub, tensors only (weights_only), on the CPU (the aesthetic
    head was saved from CUDA tensors)."""
    from huggingface_hub import hf_hub_download
    return torch.load(hf_hub_download(repo, filename), map_location="cpu", weights_only=True)


def _load_imagereward():
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(IMAGEREWARD_TOKENIZER_ID)
    # BLIP's init_tokenizer adds [DEC] and [ENC] (ids 30522 and 30523): a prompt holding them reads them so
    tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)
    state = imagereward_state_dict(_hub_checkpoint(IMAGEREWARD_MODEL_ID, IMAGEREWARD_FILE))
    return {"model": _from_state_dict(lambda: ImageRewardModel(imagereward_config()), state), "tokenizer": tokenizer}


def _load_hps():
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    config = CLIPConfig.from_pretrained(HPS_CLIP_ID)
    for tower in (config.text_config, config.vision_config):
        tower.hidden_act = "gelu"  # open_clip's ViT-H-14: nn.GELU (HPSv2 sets force_quick_gelu=False)
    state = open_clip_state_dict(_hub_checkpoint(HPS_MODEL_ID, HPS_FILE)["state_dict"])
    return {"model": _from_state_dict(lambda: CLIPModel(config), state),
            "tokenizer": CLIPTokenizer.from_pretrained(HPS_CLIP_ID)}


def _load_clip_l14():
    from transformers import CLIPModel, CLIPTokenizer
    return {"model": CLIPModel.from_pretrained(CLIPSCORE_MODEL_ID).to(DEVICE, torch.float32).eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(CLIPSCORE_MODEL_ID)}


def _load_clipscore():
    return _models("clip_l14", _load_clip_l14)  # one copy of CLIP ViT-L/14 for clipscore and aesthetic


def _load_aesthetic():
    clip = _models("clip_l14", _load_clip_l14)["model"]
    head = RatingHead(clip.config.projection_dim)
    head.load_state_dict(_hub_checkpoint(AESTHETIC_HEAD_ID, AESTHETIC_HEAD_FILE), strict=True)
    return {"model": clip, "head": head.to(DEVICE, torch.float32).eval()}


def _scored(name, raw):
    raw = raw.float().cpu()
    return raw, [{name: float(r)} for r in raw]


@torch.no_grad()
def imagereward_reward(images, prompts, metadata=None):
    """ImageReward v1.0 on its published scale: the standardised reward of ImageReward's
    score()/inference_rank() (about -2 to 2; not clipped). Reads the prompt, padded and truncated
    to 35 BERT tokens; the image through CLIP's bicubic resize and centre crop to 224 px."""
    m = _models("imagereward", _load_imagereward)
    model, tokenizer = m["model"], m["tokenizer"]
    dev = _device(model)
    pixels = clip_pixels(to_pil(images), model.config.vision_config.image_size).to(dev)
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                       return_tensors="pt").to(dev)
    return _scored("imagereward", model(pixels, tokens["input_ids"], tokens["attention_mask"]))


@torch.no_grad()
def hps_reward(images, prompts, metadata=None):
    """HPS v2.1 on its published scale: the cosine of image and prompt embeddings, as HPSv2's
    score() reports it (about 0.2-0.35; no logit scale, not clipped). Reads the prompt (77 CLIP
    tokens, truncated); the image through HPSv2's letterbox to 224 px."""
    m = _models("hps", _load_hps)
    model, tokenizer = m["model"], m["tokenizer"]
    dev = _device(model)
    pixels = hps_pixels(to_pil(images), model.config.vision_config.image_size).to(dev)
    # open_clip's tokenizer pads to the context length, and its text tower masks nothing but the
    # future: under the causal mask the end token never sees the padding, so no padding mask
    ids = tokenizer(list(prompts), padding="max_length", truncation=True,
                    max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")["input_ids"]
    cos = (_embeddings(model.get_image_features(pixel_values=pixels))
           * _embeddings(model.get_text_features(input_ids=ids.to(dev)))).sum(-1)
    return _scored("hps", cos)


@torch.no_grad()
def aesthetic_reward(images, prompts=None, metadata=None):
    """The LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) on its published 1-10
    scale: its MLP on the unit-norm CLIP ViT-L/14 image embedding (not clipped). Ignores the
    prompt; the image through CLIP's bicubic resize and centre crop to 224 px."""
    m = _models("aesthetic", _load_aesthetic)
    model, head = m["model"], m["head"]
    pixels = clip_pixels(to_pil(images), model.config.vision_config.image_size).to(_device(model))
    return _scored("aesthetic", head(_embeddings(model.get_image_features(pixel_values=pixels))))


@torch.no_grad()
def clipscore_reward(images, prompts, metadata=None):
    """CLIPScore as Flow-GRPO's clip_scorer.py defines it, its scale: OpenAI CLIP ViT-L/14's
    logit_scale (100) times the cosine of image and prompt, divided by 30 (about 0.7-1.2; not
    clipped at 0). info also holds the cosine, from which the other conventions follow (100 x
    cosine as torchmetrics, 2.5 x max(cosine, 0) as Hessel et al. with ViT-B/32). Reads the prompt
    (77 tokens, truncated); the image through a bilinear resize and centre crop to 224 px."""
    m = _models("clipscore", _load_clipscore)
    model, tokenizer = m["model"], m["tokenizer"]
    dev = _device(model)
    pixels = clipscore_pixels(to_pil(images), model.config.vision_config.image_size).to(dev)
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True,
                       max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(dev)
    cos = (_embeddings(model.get_image_features(pixel_values=pixels))
           * _embeddings(model.get_text_features(**tokens))).sum(-1).float().cpu()
    scores, info = _scored("clipscore", model.logit_scale.exp().float().cpu() * cos / CLIPSCORE_SCALE)
    for row, c in zip(info, cos.tolist()):
        row["cosine"] = c
    return scores, info

# -----------------------------------------------------------------------------
# registry and combinations


def _tiny(name):
    """The tiny world's reward `name`, imported on first call so this module stands alone."""
    def reward(images, prompts, metadata=None):
        import tiny.world as tinyworld  # numpy only: it gets PIL images and returns a numpy array
        scores, info = getattr(tinyworld, f"{name}_reward")(to_pil(images), prompts, metadata)
        return torch.from_numpy(scores), info
    reward.__name__ = f"{name}_reward"
    return reward


# the rewards that score GenEval's prompts: eval reports GenEval's overall for them, the mean of
# the per-tag pass rates (scoring.summarise)
GENEVAL_REWARDS = ("geneval", "geneval_aligned")
REWARDS = {
    "ocr": ocr_reward,
    "geneval": geneval_reward,
    "geneval_aligned": geneval_aligned_reward,
    "pickscore": pickscore_reward,
    "imagereward": imagereward_reward,
    "hps": hps_reward,
    "aesthetic": aesthetic_reward,
    "clipscore": clipscore_reward,
    "count": _tiny("count"),
    "text": _tiny("text"),
    "clean": _tiny("clean"),
    "brightness": brightness_reward,
}
# the scorers that judge any image (no prompt set of their own), each on its published scale in
# info[name] (pickscore's score is scaled by 1/26, its info is not)
METRICS = ("imagereward", "hps", "aesthetic", "clipscore", "pickscore")


def get_reward(name):
    if name not in REWARDS:
        # listed apart: on their published scales, not [0, 1] (pickscore's score is), they weigh
        # differently in a spec
        metrics = [m for m in METRICS if m != "pickscore"]
        raise ValueError(f"unknown reward {name!r}; valid rewards: "
                         f"{', '.join(sorted(set(REWARDS) - set(metrics)))}; "
                         f"quality metrics on their published scales: {', '.join(sorted(metrics))}")
    return REWARDS[name]


def first_line(error):
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def preload(specs):
    """Load the models of every reward in `specs` (names or "name:weight,..." specs) now, so a
    model the hub cannot give (offline, gated, a typo in an id) stops the run at start-up with one
    line naming the reward and the model, not after the pipeline loaded and sampled."""
    geneval = ("geneval", _load_geneval, f"{GENEVAL_DETECTOR_ID} and {GENEVAL_CLIP_ID}")
    loaders = {"ocr": ("ocr", _load_ocr, "RapidOCR's bundled models"),  # reward: (MODELS key, loader, models)
               "geneval": geneval, "geneval_aligned": geneval,
               "pickscore": ("pickscore", _load_pickscore, f"{PICKSCORE_MODEL_ID} and {PICKSCORE_PROCESSOR_ID}"),
               "imagereward": ("imagereward", _load_imagereward,
                               f"{IMAGEREWARD_MODEL_ID} ({IMAGEREWARD_FILE}) and {IMAGEREWARD_TOKENIZER_ID}"),
               "hps": ("hps", _load_hps, f"{HPS_MODEL_ID} ({HPS_FILE}) and {HPS_CLIP_ID}"),
               "aesthetic": ("aesthetic", _load_aesthetic,
                             f"{AESTHETIC_CLIP_ID} and {AESTHETIC_HEAD_ID} ({AESTHETIC_HEAD_FILE})"),
               "clipscore": ("clipscore", _load_clipscore, CLIPSCORE_MODEL_ID)}
    names = [item.partition(":")[0].strip() for spec in specs for item in spec.split(",")]
    for name in dict.fromkeys(filter(None, names)):
        get_reward(name)
        if name in loaders and loaders[name][0] not in MODELS:
            key, load, models = loaders[name]
            try:
                _models(key, load)
            except Exception as e:  # OSError offline, GatedRepoError, HFValidationError, ...
                raise ValueError(f"reward {name!r} cannot load {models} ({first_line(e)}); it needs the "
                                 f"hub once, or HF_HOME with a copy; or leave {name} out of the tasks") from None


def parse_reward_spec(spec):
    """A reward from "name" or "name:weight,name:weight,...": the weighted sum of the scores
    (in [0, 1] when the weights are non-negative and sum to at most 1, and no part is `geneval`
    or one of the quality metrics on its own scale). Each image's info holds every part's info
    (with its score) under the part's name; "strict" is the AND of the parts' strict verdicts,
    present when any part gives one."""
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
