"""Tiny random CogVideoX snapshots in the official layout, written by the peers (diffusers, transformers) for the
end-to-end tests. Every weight is randomised away from its init (zero-initialised output layers would hide bugs)."""
import json
import os
import random

import sentencepiece as spm
import torch

WORDS = "a the red green blue yellow white circle square triangle moving left right up down on black gray background " \
        "cat dog runs jumps slowly quickly over under bright dark scene video camera pans".split()

# One tiny shape per released family: T2V 2b (sincos), 5b (RoPE), 5b-I2V (learned + RoPE, 2x channels),
# 1.5 (patch_size_t 2) and 1.5-I2V (+ ofs). Latents are 4 channels, 8x spatial and 4x temporal compression.
FAMILIES = {
    "2b": dict(),
    "5b": dict(use_rotary_positional_embeddings=True),
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, sample_frames=17),
    "1.5-i2v": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, sample_frames=17,
                    in_channels=8, ofs_embed_dim=8),
}
MAX_TEXT = 16


def _randomise(module, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(p + scale * noise * max(p.std().item() if p.numel() > 1 else 0.0, 0.05))


def train_tokenizer(folder: str) -> None:
    """A unigram sentencepiece model with T5's special ids, laid out like the official tokenizer/ folder."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "spiece"),
                                   vocab_size=60, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    os.remove(os.path.join(folder, "spiece.vocab"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 226, "legacy": True,
                   "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)


def make_snapshot(root: str, family: str = "2b", **overrides) -> str:
    """Write a tiny snapshot of `family` to root (model_index.json + the five component folders); returns root.
    The weights are drawn from torch's global RNG seeded here, inside fork_rng: the caller's RNG stream is left as it
    was, so a test draws the same inputs whether its snapshot is made now or was made by an earlier test (#38)."""
    with torch.random.fork_rng(devices=[]):
        return _make_snapshot(root, family, **overrides)


def _make_snapshot(root, family, **overrides):
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tok_dir = os.path.join(root, "tokenizer")
    train_tokenizer(tok_dir)
    tokenizer = T5Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_heads=4,
                                           num_layers=2, feed_forward_proj="gated-gelu")).eval()
    _randomise(text_encoder, seed=1)
    kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
              text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9,
              max_text_seq_length=MAX_TEXT, temporal_compression_ratio=4)
    kw.update(FAMILIES[family])
    kw.update(overrides)
    transformer = CogVideoXTransformer3DModel(**kw).eval()
    _randomise(transformer, seed=2)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, sample_height=32, sample_width=32,
                                 scaling_factor=0.7 if family != "2b" else 1.15258426,
                                 invert_scale_latents=family.startswith("1.5")).eval()
    _randomise(vae, scale=0.1, seed=3)
    scheduler = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0,
                                       snr_shift_scale=3.0 if family == "2b" else 1.0)
    cls = CogVideoXImageToVideoPipeline if family.endswith("i2v") else CogVideoXPipeline
    cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=scheduler).save_pretrained(root)
    if not os.path.exists(os.path.join(tok_dir, "spiece.model")):  # transformers 5 writes tokenizer.json only
        train_tokenizer(tok_dir + "_spm")
        os.replace(os.path.join(tok_dir + "_spm", "spiece.model"), os.path.join(tok_dir, "spiece.model"))
    return root
