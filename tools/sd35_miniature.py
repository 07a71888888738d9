"""
Random pipelines of Stable Diffusion 3.5 Medium's structure, built offline (the hub is out of
reach in the tests and on the lent GPU machines): what the real model has and the tiny world's
pixel-space base has not. A 16-channel AutoencoderKL with SD3.5's scaling and shift factors and
an 8x smaller latent, CLIP-L- and CLIP-G-shaped text encoders of different widths, a T5 encoder
with its own (offline-built) tokenizer, and a transformer with dual attention in its first
blocks and RMS qk-norm, patch 2.

    build_sd35_miniature(folder)              # tiny sizes (tests/test_sd35_shape.py runs every stage on it)
    build_sd35_miniature(folder, full=True)   # SD3.5-M's transformer and VAE at full size (tools/bench.py --sd35)

The full-size one has SD3.5-M's transformer config (24 blocks of width 1536, 2.24 B parameters,
dual attention in blocks 0-12) and VAE config, with one-layer text encoders of the real widths:
its compute per image is SD3.5-M's, its weights random.
"""
import json
import tempfile
from pathlib import Path

import torch

from estimate import SD35, SD35_TRANSFORMER  # the real configs, whose keys the miniature keeps

WORDS = ["a", "the", "text", "red", "blue", "green", "circle", "square", "dog", "cat", "photo", "of", "and",
         "two", "sign", "that", "says", "left", "right", "hello", "world"]


def t5_tokenizer(words=WORDS):
    """A T5TokenizerFast from a Unigram model over the words and single characters (a
    sentencepiece file needs the hub; tokenizers builds the same kind of model in memory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    chars = [chr(c) for c in range(33, 127)]
    pieces = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in words] + ["\u2581"] + chars
    tok = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0 - len(p) ** -1) for i, p in enumerate(pieces)],
                                   unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)




def build_sd35_miniature(out_dir, seed=0, sample_size=8, num_layers=3, dual_attention_layers=(0, 1), full=False):
    """Save a random StableDiffusion3Pipeline of SD3.5-M's structure to out_dir and return it.
    sample_size is the latent side: images are 8x larger (64 px by default). full: SD3.5-M's
    transformer and VAE sizes (saved in bf16, 4.5 GB), one-layer text encoders of its widths."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny.pretrain import _clip_vocab
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel)
    torch.manual_seed(seed)
    vocab, merges = _clip_vocab(WORDS)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
        clip_tok = CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=77)

    def clip(width, projection):  # CLIP-L is 768 wide, CLIP-G 1280: the two differ, as here
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1 if full else 2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id, hidden_act="gelu"))
    t5_tok = t5_tokenizer()
    width, clips = (4096, (768, 1280)) if full else (48, (16, 32))  # T5's width; CLIP-L's and CLIP-G's
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=width, d_kv=64 if full else 8,
                                 d_ff=10240 if full else 64, num_layers=1 if full else 2,
                                 num_heads=64 if full else 2, feed_forward_proj="gated-gelu"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512) if full else (8, 8, 16, 16),
                        layers_per_block=2 if full else 1, norm_num_groups=32 if full else 4,
                        sample_size=1024 if full else 8 * sample_size, use_quant_conv=False,
                        use_post_quant_conv=False, **SD35)
    # joint_attention_dim = T5's width (CLIP's are zero-padded to it); pooled = CLIP-L's + CLIP-G's
    if full:  # the random init of 2.2 B parameters is quick on a GPU, slow on a CPU
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            transformer = SD3Transformer2DModel(**SD35_TRANSFORMER).to(torch.bfloat16)
    else:
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=width, caption_projection_dim=32,
            pooled_projection_dim=sum(clips), pos_embed_max_size=2 * sample_size,
            dual_attention_layers=tuple(dual_attention_layers), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(clips[0], clips[0]), tokenizer=clip_tok, text_encoder_2=clip(clips[1], clips[1]),
        tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok)
    if full:
        pipe.to("cpu", torch.bfloat16)
    pipe.save_pretrained(out_dir)
    return pipe
