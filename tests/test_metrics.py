"""The quality metrics (ImageReward, HPS v2.1, the aesthetic predictor, CLIPScore) on tiny random
models of the real classes built in-process: each score against a direct computation from the
model's parts, the preprocessing against the originals' transforms, the checkpoint conversions
against forwards written here the way the original code computes them, and the offline refusal."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from test_rewards import noise_images, tiny_clip

PROMPTS = ["a red dog", "two cats on a mat", "hello blue sky"]

# -----------------------------------------------------------------------------
# helpers


def normalised(x):
    """CLIP's normalisation of a (3, H, W) tensor in [0, 1], written out."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    return (x - mean) / std


def pil_tensor(image):
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def head_by_hand(state, x, prefix="layers."):
    """The rating MLP from its original state dict: five affine maps, nothing between them."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"{prefix}{i}.weight"].T + state[f"{prefix}{i}.bias"]
    return x.squeeze(-1)


def random_head_state(width, seed=0):
    """An aesthetic/ImageReward head as the originals save it (layers.0 .2 .4 .6 .7)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [width, 1024, 128, 64, 16, 1]
    state = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def tiny_bert_tokenizer(tmp_path, blip_tokens=True):
    """bert-base-uncased's kind of tokenizer (WordPiece, lower case) from a vocab written here,
    with BLIP's [DEC] and [ENC] added as ImageReward's loader adds them (or not, as the hub has it)."""
    from transformers import BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "dog", "two", "cats", "on", "mat",
             "hello", "blue", "sky", "photo", "of", "the"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path))
    if blip_tokens:
        tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)
    return tokenizer


def tiny_blip_config(vocab_size):
    from transformers import BlipConfig
    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu"),
        text_config=dict(vocab_size=vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12,
                         hidden_act="gelu", pad_token_id=0))


def rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def layer_norm_params(g, state, prefix, width):
    state[prefix + "weight"] = 1 + rand(g, width, scale=0.1)
    state[prefix + "bias"] = rand(g, width, scale=0.1)


def original_imagereward_state(config, seed=0):
    """A state dict with ImageReward.pt's names and shapes: ImageReward's module (blip =
    BLIP_Pretrain with a timm-style ViT and med.py's BertModel, mlp = its MLP), as
    torch.save(model.state_dict()) writes it, written from the original code's layer
    definitions (vit.py, med.py, blip_pretrain.py, ImageReward.py), not from transformers."""
    g = torch.Generator().manual_seed(seed)
    v, t = config.vision_config, config.text_config
    d, h, p = v.hidden_size, t.hidden_size, v.patch_size
    n = (v.image_size // p) ** 2
    s = {}
    vit = "blip.visual_encoder."
    s[vit + "cls_token"] = rand(g, 1, 1, d)
    s[vit + "pos_embed"] = rand(g, 1, n + 1, d)
    s[vit + "patch_embed.proj.weight"] = rand(g, d, 3, p, p, scale=0.05)
    s[vit + "patch_embed.proj.bias"] = rand(g, d)
    for i in range(v.num_hidden_layers):
        b = f"{vit}blocks.{i}."
        layer_norm_params(g, s, b + "norm1.", d)
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = rand(g, 3 * d, d), rand(g, 3 * d)
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = rand(g, d, d), rand(g, d)
        layer_norm_params(g, s, b + "norm2.", d)
        s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = rand(g, v.intermediate_size, d), rand(g, v.intermediate_size)
        s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = rand(g, d, v.intermediate_size), rand(g, d)
    layer_norm_params(g, s, vit + "norm.", d)
    txt = "blip.text_encoder."
    s[txt + "embeddings.position_ids"] = torch.arange(t.max_position_embeddings).expand(1, -1)  # persistent in med.py
    s[txt + "embeddings.word_embeddings.weight"] = rand(g, t.vocab_size, h)
    s[txt + "embeddings.position_embeddings.weight"] = rand(g, t.max_position_embeddings, h)
    layer_norm_params(g, s, txt + "embeddings.LayerNorm.", h)
    for i in range(t.num_hidden_layers):
        b = f"{txt}encoder.layer.{i}."
        for att, kv_width in (("attention", h), ("crossattention", d)):  # cross-attention reads the image tokens
            s[f"{b}{att}.self.query.weight"], s[f"{b}{att}.self.query.bias"] = rand(g, h, h), rand(g, h)
            s[f"{b}{att}.self.key.weight"], s[f"{b}{att}.self.key.bias"] = rand(g, h, kv_width), rand(g, h)
            s[f"{b}{att}.self.value.weight"], s[f"{b}{att}.self.value.bias"] = rand(g, h, kv_width), rand(g, h)
            s[f"{b}{att}.output.dense.weight"], s[f"{b}{att}.output.dense.bias"] = rand(g, h, h), rand(g, h)
            layer_norm_params(g, s, f"{b}{att}.output.LayerNorm.", h)
        s[b + "intermediate.dense.weight"] = rand(g, t.intermediate_size, h)
        s[b + "intermediate.dense.bias"] = rand(g, t.intermediate_size)
        s[b + "output.dense.weight"], s[b + "output.dense.bias"] = rand(g, h, t.intermediate_size), rand(g, h)
        layer_norm_params(g, s, b + "output.LayerNorm.", h)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = rand(g, 256, d), rand(g, 256)  # embed_dim 256
    s["blip.text_proj.weight"], s["blip.text_proj.bias"] = rand(g, 256, h), rand(g, 256)
    s.update({"mlp." + k: x for k, x in random_head_state(h, seed).items()})
    return s


def blip_vit_by_hand(state, pixels, config):
    """BLIP's vit.py VisionTransformer.forward on the original weights: timm's PatchEmbed, the
    class token, the position embedding, pre-norm blocks whose fused qkv is split as
    reshape(B, N, 3, heads, d/heads).permute(2, 0, 3, 1, 4), LayerNorm eps 1e-6, exact GELU."""
    v = config.vision_config
    p = {k.removeprefix("blip.visual_encoder."): x for k, x in state.items() if k.startswith("blip.visual_encoder.")}
    d, heads = v.hidden_size, v.num_attention_heads
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)
    b, n = x.shape[0], x.shape[1] + 1
    x = torch.cat([p["cls_token"].expand(b, -1, -1), x], dim=1) + p["pos_embed"]
    for i in range(v.num_hidden_layers):
        k = f"blocks.{i}."
        y = F.layer_norm(x, (d,), p[k + "norm1.weight"], p[k + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, p[k + "attn.qkv.weight"], p[k + "attn.qkv.bias"])
        q, kk, vv = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kk.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        heads_out = (attn @ vv).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(heads_out, p[k + "attn.proj.weight"], p[k + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), p[k + "norm2.weight"], p[k + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, p[k + "mlp.fc1.weight"], p[k + "mlp.fc1.bias"])),
                         p[k + "mlp.fc2.weight"], p[k + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), p["norm.weight"], p["norm.bias"], eps=1e-6)


def tiny_gelu_clip_config(vocab_size, eos):
    """A tiny CLIP with open_clip ViT-H-14's activation (exact GELU) and its LayerNorm eps."""
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16)


def original_open_clip_state(config, seed=0):
    """An open_clip CLIP state dict with ViT towers (names and shapes as open_clip's CLIP and
    HPSv2's checkpoint['state_dict'] hold them; attn_mask is a non-persistent buffer there)."""
    g = torch.Generator().manual_seed(seed)
    t, v, e = config.text_config, config.vision_config, config.projection_dim
    s = {"logit_scale": torch.tensor(math.log(1 / 0.07))}

    def blocks(prefix, width, mlp, layers):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            layer_norm_params(g, s, b + "ln_1.", width)
            s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"] = rand(g, 3 * width, width), rand(g, 3 * width)
            s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"] = rand(g, width, width), rand(g, width)
            layer_norm_params(g, s, b + "ln_2.", width)
            s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"] = rand(g, mlp, width), rand(g, mlp)
            s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"] = rand(g, width, mlp), rand(g, width)

    s["token_embedding.weight"] = rand(g, t.vocab_size, t.hidden_size)
    s["positional_embedding"] = rand(g, t.max_position_embeddings, t.hidden_size)
    blocks("", t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    layer_norm_params(g, s, "ln_final.", t.hidden_size)
    s["text_projection"] = rand(g, t.hidden_size, e)
    n = (v.image_size // v.patch_size) ** 2
    s["visual.class_embedding"] = rand(g, v.hidden_size)
    s["visual.positional_embedding"] = rand(g, n + 1, v.hidden_size)
    s["visual.conv1.weight"] = rand(g, v.hidden_size, 3, v.patch_size, v.patch_size, scale=0.05)
    layer_norm_params(g, s, "visual.ln_pre.", v.hidden_size)
    blocks("visual.", v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    layer_norm_params(g, s, "visual.ln_post.", v.hidden_size)
    s["visual.proj"] = rand(g, v.hidden_size, e)
    return s


def open_clip_blocks(state, prefix, x, heads, layers, mask=None):
    """open_clip's ResidualAttentionBlocks, attention by torch's own nn.MultiheadAttention on the
    packed in_proj weights (so the q/k/v split is torch's, not ours)."""
    width = x.shape[-1]
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k: state[b + "attn." + k] for k in
                              ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        y = F.layer_norm(x, (width,), state[b + "ln_1.weight"], state[b + "ln_1.bias"])
        x = x + attn(y, y, y, attn_mask=mask, need_weights=False)[0]
        y = F.layer_norm(x, (width,), state[b + "ln_2.weight"], state[b + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(y, state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"])),
                         state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
    return x


def open_clip_by_hand(state, pixels, ids, config):
    """open_clip's CLIP.encode_image / encode_text on the original state dict (unnormalised)."""
    t, v = config.text_config, config.vision_config
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=v.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = F.layer_norm(x + state["visual.positional_embedding"], (v.hidden_size,),
                     state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = open_clip_blocks(state, "visual.", x, v.num_attention_heads, v.num_hidden_layers)
    image = F.layer_norm(x[:, 0], (v.hidden_size,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    image = image @ state["visual.proj"]
    n = ids.shape[1]
    y = state["token_embedding.weight"][ids] + state["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    y = open_clip_blocks(state, "", y, t.num_attention_heads, t.num_hidden_layers, mask=causal)
    y = F.layer_norm(y, (t.hidden_size,), state["ln_final.weight"], state["ln_final.bias"])
    text = y[torch.arange(len(ids)), ids.argmax(dim=-1)] @ state["text_projection"]  # the end token: the largest id
    return image, text


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def lively_clip(tmp_path, seed):
    """A tiny CLIPModel with weights drawn at a scale where every token and image matters
    (transformers' own init of so small a model gives near-identical image features), via the
    open_clip conversion, logit scale 100 as OpenAI's CLIP; and tiny_clip's tokenizer."""
    from transformers import CLIPModel
    tokenizer = tiny_clip(tmp_path)[1].tokenizer
    config = tiny_gelu_clip_config(len(tokenizer), tokenizer.eos_token_id)
    model = CLIPModel(config).eval()
    model.load_state_dict(rewards.open_clip_state_dict(original_open_clip_state(config, seed)))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    return model, tokenizer


def differ(a, b):
    return not torch.allclose(a, b, atol=1e-3)

# -----------------------------------------------------------------------------
# preprocessing


def test_clip_pixels_is_pil_bicubic_short_side_then_centre_crop():
    """torchvision's Resize(32, BICUBIC) on a PIL image is PIL's own resize to (51, 32) here
    (int(32 * 64 / 40)), CenterCrop takes columns round(19 / 2) = 10 onwards."""
    image = noise_images(1, size=64)[0].crop((0, 0, 64, 40))  # 64 wide, 40 high
    x = rewards.clip_pixels([image], 32)
    resized = image.resize((51, 32), Image.BICUBIC)
    expected = normalised(pil_tensor(resized)[:, :, 10:42])
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x[0], expected, atol=1e-6)
    # a flat colour stays that colour, normalised; an image already 32 px is only normalised
    flat = rewards.clip_pixels([Image.new("RGB", (48, 32), (255, 0, 51))], 32)[0]
    assert torch.allclose(flat, normalised(torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1).expand(3, 32, 32)), atol=1e-6)
    square = noise_images(1, size=32)[0]
    assert torch.equal(rewards.clip_pixels([square], 32)[0], normalised(pil_tensor(square)))


def test_hps_pixels_letterbox_on_black():
    """HPSv2's ResizeMaxSize: the longest side to 32, the other round(side * 32 / longest), then
    zero padding split pad // 2 before and the rest after, all before normalisation."""
    image = Image.new("RGB", (64, 30), (204, 102, 51))  # 64 x 30 -> 32 x 15, 17 rows of padding: 8 above, 9 below
    x = rewards.hps_pixels([image], 32)[0]
    black = normalised(torch.zeros(3, 1, 1)).squeeze()
    colour = normalised(torch.tensor([0.8, 0.4, 0.2]).view(3, 1, 1)).squeeze()
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, :8], black.view(3, 1, 1).expand(3, 8, 32))
    assert torch.allclose(x[:, 23:], black.view(3, 1, 1).expand(3, 9, 32))
    assert torch.allclose(x[:, 8:23], colour.view(3, 1, 1).expand(3, 15, 32), atol=1e-5)
    tall = rewards.hps_pixels([Image.new("RGB", (30, 64), (204, 102, 51))], 32)[0]
    assert torch.allclose(tall, x.transpose(1, 2), atol=1e-5)  # the same along the other axis
    # bicubic on the float tensor: a sharp edge overshoots outside [0, 1] (no clamp, as torchvision's float path)
    edge = Image.fromarray(np.repeat(np.repeat(np.array([[0, 255]], np.uint8), 32, 1), 64, 0)[..., None].repeat(3, 2))
    raw = rewards.hps_pixels([edge], 32)[0] * torch.tensor(rewards.CLIP_STD).view(3, 1, 1) \
        + torch.tensor(rewards.CLIP_MEAN).view(3, 1, 1)
    assert raw.min() < -1e-3 and raw.max() > 1 + 1e-3
    square = noise_images(1, size=32)[0]
    assert torch.equal(rewards.hps_pixels([square], 32)[0], normalised(pil_tensor(square)))


def test_clipscore_pixels_bilinear_short_side_then_centre_crop():
    """Flow-GRPO's ClipScorer transform: the short side to 32, the centre 32 x 32 kept."""
    bands = np.zeros((32, 96, 3), np.uint8)
    bands[:, :32], bands[:, 32:64], bands[:, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    x = rewards.clipscore_pixels([Image.fromarray(bands)], 32)[0]  # no resize: the green band
    assert torch.allclose(x, normalised(torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 32, 32)), atol=1e-6)
    big = Image.fromarray(bands).resize((192, 64), Image.NEAREST)  # 2x: resized back to 96 x 32, bilinear
    y = rewards.clipscore_pixels([big], 32)[0]
    assert y.shape == (3, 32, 32)
    assert torch.allclose(y[:, :, 2:-2], x[:, :, 2:-2], atol=1e-5)  # green away from the band edges
    # bilinear (torchvision's default), not bicubic: a sharp edge shrunk stays within [0, 1], blended
    edge = np.zeros((64, 128, 3), np.uint8)
    edge[:, 61:] = 255
    raw = rewards.clipscore_pixels([Image.fromarray(edge)], 32)[0] * torch.tensor(rewards.CLIP_STD).view(3, 1, 1) \
        + torch.tensor(rewards.CLIP_MEAN).view(3, 1, 1)
    assert raw.min() > -1e-6 and raw.max() < 1 + 1e-6 and ((raw > 0.05) & (raw < 0.95)).any()

# -----------------------------------------------------------------------------
# scores from the models' parts


@pytest.fixture
def tiny_imagereward(tmp_path, monkeypatch):
    tokenizer = tiny_bert_tokenizer(tmp_path)
    config = tiny_blip_config(len(tokenizer))
    model = rewards.ImageRewardModel(config).eval()  # weights at a scale where the image matters
    model.load_state_dict(rewards.imagereward_state_dict(original_imagereward_state(config)))
    monkeypatch.setitem(rewards.MODELS, "imagereward", {"model": model, "tokenizer": tokenizer})
    return model, tokenizer


def test_imagereward_scores_from_parts(tiny_imagereward):
    model, tokenizer = tiny_imagereward
    images = noise_images(3, size=40, seed=2)
    long = " ".join(["a red dog on the mat"] * 8)  # 48 words: read to 33, 35 tokens with [CLS] and [SEP]
    prompts = PROMPTS[:2] + [long]
    scores, info = rewards.get_reward("imagereward")(images, prompts)
    state = model.state_dict()
    with torch.no_grad():  # one image at a time, as ImageReward.score: ViT, BERT with cross-attention, [CLS], MLP
        expected = []
        for image, prompt in zip(images, prompts):
            pixels = rewards.clip_pixels([image], 32)
            tok = tokenizer([prompt], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert tok["input_ids"].shape == (1, 35)
            image_tokens = model.vision_model(pixel_values=pixels).last_hidden_state
            cls = model.text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                     encoder_hidden_states=image_tokens).last_hidden_state[:, 0]
            raw = head_by_hand(state, cls, prefix="mlp.layers.")
            expected.append(((raw - 0.16717362830052426) / 1.0333394966054072).item())
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)
    assert [row["imagereward"] for row in info] == scores.tolist()
    # the long prompt is read to 35 tokens: its first 33 words score the same
    truncated, _ = rewards.imagereward_reward(images[2:], [" ".join(long.split()[:33])])
    assert truncated[0].item() == pytest.approx(scores[2].item(), abs=1e-6)
    shuffled, _ = rewards.imagereward_reward(images, prompts[::-1])  # image i is read with prompt i
    assert differ(shuffled[[0, 2]], scores[[0, 2]])
    same_prompt, _ = rewards.imagereward_reward(images, prompts[:1] * 3)
    assert differ(same_prompt[1:], same_prompt[:1].expand(2))  # and the image is read
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    assert torch.allclose(rewards.imagereward_reward(batch, prompts)[0], scores, atol=1e-6)


def test_hps_scores_from_parts(tmp_path, monkeypatch):
    model, tokenizer = lively_clip(tmp_path, seed=1)  # logit scale 100: HPS reports the cosine, unscaled
    monkeypatch.setitem(rewards.MODELS, "hps", {"model": model, "tokenizer": tokenizer})
    images = noise_images(3, size=48, seed=3)
    scores, info = rewards.get_reward("hps")(images, PROMPTS)
    with torch.no_grad():
        expected = []
        for image, prompt in zip(images, PROMPTS):  # open_clip's tokenizer: padded to 77, no padding mask
            ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
            i = unit(rewards._embeddings(model.get_image_features(pixel_values=rewards.hps_pixels([image], 32))))
            t = unit(rewards._embeddings(model.get_text_features(input_ids=ids)))
            expected.append((i @ t.T).item())
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)
    assert [row["hps"] for row in info] == scores.tolist() and scores.abs().max() <= 1
    shuffled, _ = rewards.hps_reward(images, PROMPTS[::-1])
    assert differ(shuffled[[0, 2]], scores[[0, 2]])
    same_prompt, _ = rewards.hps_reward(images, PROMPTS[:1] * 3)
    assert differ(same_prompt[1:], same_prompt[:1].expand(2))


def test_aesthetic_scores_from_parts(tmp_path, monkeypatch):
    model, _ = lively_clip(tmp_path, seed=2)
    state = random_head_state(16)
    head = rewards.RatingHead(16).eval()
    head.load_state_dict(state)
    monkeypatch.setitem(rewards.MODELS, "aesthetic", {"model": model, "head": head})
    images = noise_images(3, size=40, seed=4)
    scores, info = rewards.get_reward("aesthetic")(images, PROMPTS)
    with torch.no_grad():  # the MLP on the unit-norm CLIP image embedding
        emb = torch.cat([model.get_image_features(pixel_values=rewards.clip_pixels([im], 32)).pooler_output
                         for im in images])
        expected = head_by_hand(state, emb / emb.norm(dim=-1, keepdim=True))
    assert torch.allclose(scores, expected, atol=1e-5)
    assert [row["aesthetic"] for row in info] == scores.tolist()
    assert torch.equal(rewards.aesthetic_reward(images, PROMPTS[::-1])[0], scores)  # the prompt plays no part
    assert torch.equal(rewards.aesthetic_reward(images)[0], scores)
    assert differ(scores[1:], scores[:1].expand(2))


def test_clipscore_scores_from_parts(tmp_path, monkeypatch):
    model, tokenizer = lively_clip(tmp_path, seed=3)
    monkeypatch.setitem(rewards.MODELS, "clipscore", {"model": model, "tokenizer": tokenizer})
    images = noise_images(3, size=40, seed=5)
    scores, info = rewards.get_reward("clipscore")(images, PROMPTS)
    with torch.no_grad():  # Flow-GRPO: logits_per_image's diagonal / 30
        pixels = rewards.clipscore_pixels(images, 32)
        tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
        logits = model(pixel_values=pixels, **tokens).logits_per_image
    assert torch.allclose(scores, logits.diagonal() / 30, atol=1e-4)
    cos = torch.tensor([row["cosine"] for row in info])
    assert torch.allclose(scores, 100 * cos / 30, atol=1e-5) and [row["clipscore"] for row in info] == scores.tolist()
    shuffled, _ = rewards.clipscore_reward(images, PROMPTS[::-1])
    assert differ(shuffled[[0, 2]], scores[[0, 2]])
    same_prompt, _ = rewards.clipscore_reward(images, PROMPTS[:1] * 3)
    assert differ(same_prompt[1:], same_prompt[:1].expand(2))

# -----------------------------------------------------------------------------
# checkpoint conversions and loaders


def test_imagereward_checkpoint_converts_strictly_and_runs_as_blip():
    config = tiny_blip_config(20)
    original = original_imagereward_state(config)
    converted = rewards.imagereward_state_dict(original)
    model = rewards.ImageRewardModel(config).eval()
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.vision_model(pixel_values=pixels).last_hidden_state,
                              blip_vit_by_hand(original, pixels, config), atol=1e-5)
        x = torch.randn(3, 24)
        assert torch.allclose(model.mlp(x), head_by_hand(original, x, prefix="mlp.layers."), atol=1e-5)
    # the text encoder is med.py's BertModel under its own names: each tensor lands where it was
    for key in ("encoder.layer.1.crossattention.self.key.weight", "embeddings.word_embeddings.weight",
                "encoder.layer.0.attention.output.LayerNorm.bias"):
        assert torch.equal(model.text_encoder.state_dict()[key], original["blip.text_encoder." + key])
    with pytest.raises(ValueError, match="unexpected key 'blip.visual_encoder.head.weight'"):
        rewards.imagereward_state_dict({**original, "blip.visual_encoder.head.weight": torch.zeros(1)})


def test_imagereward_config_has_the_original_shapes():
    """The full-size model (on the meta device) has ImageReward's BLIP ViT-L/16 at 224 px and
    med_config.json's BERT: the shapes ImageReward.pt's tensors have."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = rewards.ImageRewardModel(rewards.imagereward_config())
    shapes = {k: tuple(x.shape) for k, x in model.state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 197, 1024)
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 16, 16)
    assert shapes["vision_model.encoder.layers.23.self_attn.qkv.weight"] == (3072, 1024)
    assert shapes["text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert shapes["text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert shapes["mlp.layers.0.weight"] == (1024, 768) and shapes["mlp.layers.7.weight"] == (1, 16)
    assert "vision_model.encoder.layers.24.layer_norm1.weight" not in shapes
    assert model.vision_model.config.layer_norm_eps == 1e-6 and model.text_encoder.config.layer_norm_eps == 1e-12


def test_open_clip_checkpoint_converts_strictly_and_runs_as_open_clip(tmp_path):
    from transformers import CLIPModel
    _, processor = tiny_clip(tmp_path)
    tokenizer = processor.tokenizer
    config = tiny_gelu_clip_config(len(tokenizer), tokenizer.eos_token_id)
    original = original_open_clip_state(config)
    model = CLIPModel(config).eval()
    result = model.load_state_dict(rewards.open_clip_state_dict(original), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    pixels = torch.randn(2, 3, 32, 32)
    ids = tokenizer(PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image, text = open_clip_by_hand(original, pixels, ids, config)
        got = rewards._embeddings(model.get_image_features(pixel_values=pixels))
        assert torch.allclose(got, unit(image), atol=1e-5)
        assert torch.allclose(rewards._embeddings(model.get_text_features(input_ids=ids)), unit(text), atol=1e-5)
    # the q rows of the packed projection are q_proj's, the projections are transposed
    packed = original["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(model.vision_model.encoder.layers[1].self_attn.k_proj.weight, packed[48:96])
    assert torch.equal(model.text_projection.weight, original["text_projection"].T)
    with pytest.raises(ValueError, match="unexpected key 'visual.attn_pool.query'"):
        rewards.open_clip_state_dict({**original, "visual.attn_pool.query": torch.zeros(1)})


def test_loaders_build_float32_eval_models_from_the_checkpoints(tmp_path, monkeypatch):
    """The loaders on tiny stand-ins for the hub: ImageReward.pt and HPSv2's checkpoint (in
    half precision) become float32 eval models giving the original forward (built on empty
    weights: every tensor must come from the checkpoint); HPS runs exact GELU whatever the config
    says; BLIP's tokens are added; aesthetic and clipscore share one CLIP ViT-L/14."""
    import transformers
    bare = tiny_bert_tokenizer(tmp_path, blip_tokens=False)  # bert-base-uncased as the hub has it
    blip = tiny_blip_config(len(bare) + 2)
    (tmp_path / "clip").mkdir(), (tmp_path / "l14").mkdir()
    clip_tokenizer = tiny_clip(tmp_path / "clip")[1].tokenizer
    clip_config = tiny_gelu_clip_config(len(clip_tokenizer), clip_tokenizer.eos_token_id)
    hub_config = tiny_gelu_clip_config(len(clip_tokenizer), clip_tokenizer.eos_token_id)
    for tower in (hub_config.text_config, hub_config.vision_config):
        tower.hidden_act = "quick_gelu"  # transformers' CLIP default, wrong for open_clip's ViT-H-14
    half = lambda state: {k: x.half() if x.is_floating_point() else x for k, x in state.items()}
    ir_state, oc_state, head_state = original_imagereward_state(blip), original_open_clip_state(clip_config), \
        random_head_state(16)
    files = {(rewards.IMAGEREWARD_MODEL_ID, rewards.IMAGEREWARD_FILE): half(ir_state),
             (rewards.HPS_MODEL_ID, rewards.HPS_FILE): {"state_dict": half(oc_state)},
             (rewards.AESTHETIC_HEAD_ID, rewards.AESTHETIC_HEAD_FILE): head_state}
    monkeypatch.setattr(rewards, "_hub_checkpoint", lambda repo, name: files[(repo, name)])
    monkeypatch.setattr(rewards, "imagereward_config", lambda: blip)
    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained", lambda name, **kw: bare)
    monkeypatch.setattr(transformers.CLIPConfig, "from_pretrained", lambda name, **kw: hub_config)
    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", lambda name, **kw: clip_tokenizer)
    clip_loads = []
    monkeypatch.setattr(rewards, "_load_clip_l14", lambda: clip_loads.append(1) or {
        "model": tiny_clip(tmp_path / "l14")[0], "tokenizer": clip_tokenizer})
    monkeypatch.setattr(rewards, "MODELS", {})  # what the loaders fill goes with the test (set_device moves it all)
    rewards.preload(["imagereward,hps", "aesthetic:0.5,clipscore:0.5"])
    loaded = {key: rewards.MODELS[key] for key in ("imagereward", "hps", "aesthetic", "clipscore")}
    for module in (loaded["imagereward"]["model"], loaded["hps"]["model"], loaded["aesthetic"]["head"]):
        assert not module.training and {p.dtype for p in module.parameters()} == {torch.float32}
    # BLIP's init_tokenizer: [DEC] and [ENC] after the 18 words, ids 18 and 19 here (30522, 30523 in BERT)
    assert loaded["imagereward"]["tokenizer"].convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [18, 19]
    pixels = torch.randn(2, 3, 32, 32)
    to32 = lambda state: {k: x.half().float() if x.is_floating_point() else x for k, x in state.items()}
    reference = rewards.ImageRewardModel(blip).eval()  # built and loaded the ordinary way
    reference.load_state_dict(rewards.imagereward_state_dict(to32(ir_state)))
    tokens = bare(["a red dog", "two cats"], padding="max_length", max_length=35, return_tensors="pt")
    ids = clip_tokenizer(PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = loaded["imagereward"]["model"](pixels, tokens["input_ids"], tokens["attention_mask"])
        assert torch.allclose(got, reference(pixels, tokens["input_ids"], tokens["attention_mask"]), atol=1e-5)
        hps = loaded["hps"]["model"]
        image, text = open_clip_by_hand(to32(oc_state), pixels, ids, clip_config)
        got = rewards._embeddings(hps.get_image_features(pixel_values=pixels))
        assert torch.allclose(got, unit(image), atol=1e-5)
        assert torch.allclose(rewards._embeddings(hps.get_text_features(input_ids=ids)), unit(text), atol=1e-5)
    assert clip_loads == [1] and loaded["aesthetic"]["model"] is loaded["clipscore"]["model"]
    assert torch.equal(loaded["aesthetic"]["head"].layers[7].bias, head_state["layers.7.bias"])

# -----------------------------------------------------------------------------
# registry and start-up


def test_metrics_are_registered_rewards():
    assert rewards.METRICS == ("imagereward", "hps", "aesthetic", "clipscore", "pickscore")
    assert all(rewards.get_reward(name) for name in rewards.METRICS)


@pytest.mark.parametrize("name, model_id", [
    ("imagereward", "THUDM/ImageReward"), ("hps", "xswu/HPSv2"),
    ("aesthetic", "camenduru/improved-aesthetic-predictor"), ("clipscore", "openai/clip-vit-large-patch14")])
def test_preload_refuses_offline_in_one_line_naming_the_model(name, model_id, monkeypatch):
    """HF_HUB_OFFLINE=1 (conftest) and an empty cache: start-up stops with one line."""
    monkeypatch.setattr(rewards, "MODELS", {})  # what the loaders fill goes with the test (set_device moves it all)
    with pytest.raises(ValueError) as refusal:
        rewards.preload([name])
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(f"reward {name!r} cannot load ") and model_id in message
    assert name not in rewards.MODELS
