"""Train the bundled demo model, demo/shapes-tiny, from scratch: a tiny CogVideoX on moving shapes.

    python train_tiny.py                      # everything, ~1.6 h on 2 CPU cores with bf16 units -> runs/shapes-tiny
    python train_tiny.py --smoke              # the same pipeline at toy size, < 1 min (CI)
    python train_tiny.py --device cuda        # the same batches and noise on a GPU
    python evaluate.py                        # colour / shape / motion accuracy of what it generates

Every stage uses the real architecture and objective, at toy width, and the snapshot is written in the official
Hugging Face layout, so diffusers' CogVideoXPipeline loads it unchanged. Stages, and the choices that matter:
1. Tokenizer: a SentencePiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos). It is trained on the
   caption words in shuffled order: fed the template captions themselves, the unigram trainer keeps only characters
   (every sentence is nearly the same), so a caption would be ~30 pieces instead of 9 words. It folds case
   (SentencePiece's nmt_nfkc_cf rule), so prompts are case-insensitive.
2. Text encoder: a 2-layer T5 v1.1 encoder (gated GELU), randomly initialised as transformers does and kept frozen.
   Captions are a fixed template whose slots use disjoint words, so the conditioning only has to keep the words apart;
   a random embedding per token does that, and the relative-position bias mixes in enough context to tell "white"
   the colour from "white" the background. Frozen, its outputs are computed once per caption.
3. VAE: the causal 3D VAE with 4 levels (8x spatial, 4x temporal compression) at width 8-32 and 8 latent channels
   (half the official 16: a 2x2 patch then carries 32 values, well under the transformer's width, and 8 channels
   still hold one shape with room to spare), trained on L1 + L2 reconstruction (shape pixels weighted 10x: they are
   ~10% of a frame) plus a tiny KL, in three phases: 64x64 single frames first (F=1 is a valid causal-VAE input, 9x
   cheaper, and colour and shape are per-frame), then whole 9-frame clips for the temporal layers (crops would cut
   the moving shape), then the decoder alone on frozen latents, which sharpens corners without moving the latents.
   Phases 1-2 add a hinge (shape_separation) that keeps a circle, a square and a triangle of the same clip apart in
   latent space: without it a shape swap moved the latents by ~1% of their variance and the transformer never
   learned to tell circle from square.
   The decoder decodes posterior draws in every phase, so a draw (what the official pipelines encode a video to,
   and what LoRA training sees) decodes like the mean. `vae_random_colours` paints a share of the VAE's clips a colour
   no caption has (random_colour), so the VAE, like the official one, can encode colours the transformer never
   learned to draw, which a LoRA that teaches a new colour word needs. The recipe paints a fifth: at 0.5 (the sixth
   run in the README) shapes reconstruct worse; at 0.2 cyan reconstructs right and squares keep their corners better
   than with none (92% against 74% of 160 clips). The reconstruction
   accuracy (shapes.evaluate on encode -> decode of 40 clips) is printed and logged: it bounds what any transformer
   can score. The latents' std sets scaling_factor, so the transformer sees unit-variance latents.
4. Transformer: the CogVideoX 1.0 expert transformer, 4 layers of width 256 (4 heads of 64), with 5b-style 3D RoPE
   (positions relative, text without position; the 2b sincos table would work too) and the 5b schedule
   (snr_shift_scale 1: the 2b shift of 3 was chosen for 480x720 latents and would leave an 8x8 latent mostly noise),
   trained with v-prediction at uniform timesteps on cached latents and text embeddings, with 10% empty captions so
   that classifier-free guidance works, under bf16 autocast where the hardware has bf16 units (fp32 weights; 1.8x
   faster on such a CPU), in fp32 where it has not (an AVX2-only CPU emulates bf16: 22x slower, see fast_bf16).
   Width, clip count and step count were each found to matter by measurement (README, the demo model section).
5. The snapshot: config.json files as diffusers/transformers write them, safetensors weights, a loss log
   (train_log.jsonl); written to a temporary folder and renamed into place, so a crash never leaves half a model.
Measured results (time on 2 CPU cores, memory, accuracy) are in the README and bench/RESULTS.md, not here: they
change whenever the recipe does.

Legend: N clips, B batch, F frames (pixel or latent), C channels, H/W height/width, L text tokens, D width.
"""
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cli
import shapes
from checkpoint import save_component, write_json
from model import CogVideoXTransformer, TransformerConfig
from sampler import PRESETS as SCHEDULERS, add_noise, v_target
from text_encoder import T5Config, T5Encoder, Tokenizer
from vae import CogVideoXVAE, VAEConfig, load_vae

DIFFUSERS_VERSION = "0.32.0"  # written into the configs, as the official snapshots do


@dataclass
class TrainConfig:
    seed: int = 0
    # text
    max_text_seq_length: int = 16       # 9 pieces + </s> for the training words; "cyan" alone takes 5 (the LoRA lesson)
    t5_width: int = 64
    t5_layers: int = 2
    # VAE
    vae_channels: tuple = (8, 16, 32, 32)
    vae_groups: int = 4
    latent_channels: int = 8
    vae_clips: int = 1000
    vae_frame_steps: int = 1500         # phase 1: single frames
    vae_frame_batch: int = 16
    vae_frame_crop: int = 64
    vae_steps: int = 800                # phase 2: 9-frame clips
    vae_batch: int = 4
    vae_crop: int = 64
    decoder_steps: int = 1200           # phase 3: the decoder alone, on frozen latents
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    shape_triples: int = 4              # clips drawn as circle, square and triangle, encoded each VAE step
    shape_margin: float = 0.4           # the least mean square latent change a shape swap must make, / latent variance
    vae_random_colours: float = 0.2     # share of VAE clips painted a colour with no name (0.5: the sixth run, README)
    # transformer
    heads: int = 4
    head_dim: int = 64
    layers: int = 4
    patch_size: int = 2                 # latent pixels per token side: 2 as every official model; 1 -> 4x tokens
    dit_clips: int = 8000               # 16,000 (each seen half as often): training-prompt squares 58% against 69%
    dit_steps: int = 28000              # 14,000: held-out squares 15% against 82% (README)
    dit_batch: int = 32
    dit_lr: float = 1e-3
    text_drop: float = 0.1
    # evaluation right after training (evaluate.py runs it on its own too)
    eval_per_combo: int = 1
    eval_steps: int = 50


PRESETS = {
    "default": TrainConfig(),
    "smoke": TrainConfig(vae_channels=(8, 8, 8, 8), vae_groups=2, latent_channels=4, vae_clips=16, vae_frame_steps=10,
                         shape_triples=1, vae_frame_batch=4, vae_frame_crop=16, vae_steps=4, vae_batch=2, vae_crop=16,
                         decoder_steps=4, vae_lr=3e-3, heads=2, head_dim=16, layers=1, dit_clips=32, dit_steps=30, dit_batch=16,
                         dit_lr=3e-3, t5_width=32, t5_layers=1, eval_per_combo=0, eval_steps=2),
}


def log(logfile, **row):
    logfile.write(json.dumps(row) + "\n")
    logfile.flush()


def schedule_lr(step, total, peak):
    """Linear warm-up over 5% of the steps, then cosine decay to 0."""
    warm = max(1, total // 20)
    return peak * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


# ---------------------------------------------------------------------------------------------------------- 1. text

def train_tokenizer(folder, captions, cfg, rng):
    """Writes folder/spiece.model and tokenizer_config.json. The model case-folds (SentencePiece's nmt_nfkc_cf rule:
    NFKC, then lowercase, stored in the model), so "A BLUE square" is "a blue square" in every reader of the file;
    captions are lowercase, so the pieces and ids are those of the plain nmt_nfkc rule. Trained in memory, so that no
    path is recorded in the model: the same seed gives the same bytes wherever it runs."""
    os.makedirs(folder, exist_ok=True)
    words = [w for c in captions for w in c.split()]
    lines = [" ".join(rng.sample(words, 12)) for _ in range(3000)]  # shuffled caption words (see the docstring)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=64,
                                       hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                       bos_id=-1, character_coverage=1.0, minloglevel=2, num_threads=1,
                                       seed_sentencepiece_size=1000, normalization_rule_name="nmt_nfkc_cf")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": cfg.max_text_seq_length,
                   "legacy": True, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f, indent=2)
    tok = Tokenizer(folder)
    longest = max(len(tok.encode(c)) + 1 for c in set(captions))
    if longest > cfg.max_text_seq_length:
        raise ValueError(f"captions take up to {longest} tokens with </s>, more than max_text_seq_length="
                         f"{cfg.max_text_seq_length}: the tokenizer did not learn whole words")
    return tok


def t5_config(vocab_size, cfg):
    return T5Config(vocab_size=vocab_size, d_model=cfg.t5_width, d_kv=cfg.t5_width // 4, d_ff=2 * cfg.t5_width,
                    num_layers=cfg.t5_layers, num_heads=4, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")


def init_t5(model: T5Encoder):
    """transformers' T5 initialisation (factor 1): N(0, 1) embeddings, N(0, fan-in^-1/2)-style projections, q scaled
    by an extra d_kv^-1/2 since T5 does not divide the attention scores."""
    c = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name == "shared.weight":
                p.normal_(0, 1.0)
            elif name.endswith("SelfAttention.q.weight"):
                p.normal_(0, (c.d_model * c.d_kv) ** -0.5)
            elif name.endswith(("SelfAttention.k.weight", "SelfAttention.v.weight", "wi_0.weight", "wi_1.weight",
                                "relative_attention_bias.weight")):
                p.normal_(0, c.d_model ** -0.5)
            elif name.endswith("SelfAttention.o.weight"):
                p.normal_(0, (c.num_heads * c.d_kv) ** -0.5)
            elif name.endswith("wo.weight"):
                p.normal_(0, c.d_ff ** -0.5)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------- 2. VAE

def vae_config(cfg):
    return VAEConfig(block_out_channels=cfg.vae_channels, norm_num_groups=cfg.vae_groups,
                     latent_channels=cfg.latent_channels, layers_per_block=1, temporal_compression_ratio=4,
                     sample_height=96, sample_width=80, scaling_factor=1.0)  # sample_*: only the (unused) tile size


def reconstruction_loss(x, y, background=None):
    """L1 + L2, with the shape's pixels weighted 10x: it covers ~10% of a frame, and its colour and corners are what
    the evaluator reads. background (B, 3, 1, 1, 1) defaults to the median of frame 0's top row (a square may cover
    a corner pixel, never a whole row)."""
    if background is None:
        background = x[:, :, :1, :1].median(dim=-1, keepdim=True).values
    weight = 1 + 9 * ((x - background).abs().amax(dim=1, keepdim=True) > 0.25).float()  # (B, 1, F, H, W)
    weight = weight / weight.mean()
    return (weight * ((y - x).abs() + (y - x).square())).mean()


def posterior_draw(mean, logvar, gen):
    """z = mean + std * eps, the reparameterised sample of the VAE's Gaussian posterior (Kingma & Welling, eq. 10):
    what the official pipelines encode to, so it is what the decoder must learn to decode and what the transformer
    must learn to generate. eps comes from the CPU generator `gen`, so every device draws the same numbers."""
    eps = torch.randn(mean.shape, generator=gen).to(mean.device)
    return mean + (0.5 * logvar).exp() * eps


def random_colour(rng, background, share):
    """With probability `share`, a colour with no name for a VAE clip (else None: the caption's colour). Each channel
    is 0, 1 or uniform in between, so the corners of the RGB cube (cyan, magenta, ...) come up as often as the
    colours between them, at least 0.5 away from the background in some channel so the shape stays visible.
    Why: a VAE that saw only the five named colours cannot encode any other (v2's first release reconstructed cyan
    with the right colour in 3% of clips), and the official VAE saw every colour of real video, so teaching the
    transformer a new colour word (the LoRA lesson) needs a VAE that can already draw it."""
    if share == 0 or rng.random() >= share:  # share 0 draws nothing: the clips of make_clips, bit for bit
        return None
    while True:
        rgb = np.where(rng.random(3) < 2 / 3, rng.integers(2, size=3), rng.random(3))
        if np.abs(rgb - shapes.BACKGROUNDS[background]).max() >= 0.5:
            return rgb


def vae_clips(n, seed, attrs_list, share):
    """n clips for the VAE: the attributes of make_clips, a share of them painted a random colour. uint8
    (N, F, H, W, 3)."""
    return shapes.make_clips(n, seed, attrs_list, paint=lambda rng, a: random_colour(rng, a.background, share))[0]


def shape_triples(n, seed, attrs_list, share=0.0):
    """n clips, each rendered three times with the same start, size, speed, colour and background: as a circle, a
    square and a triangle (a share of them in a random colour). uint8 (n, 3 shapes, F, H, W, 3)."""
    rng = np.random.default_rng(seed)
    picks = [attrs_list[i] for i in rng.integers(len(attrs_list), size=n)]
    seeds = rng.integers(2**31, size=n)
    colours = [random_colour(rng, a.background, share) for a in picks]
    return np.stack([np.stack([shapes.render(a._replace(shape=s), np.random.default_rng(k), rgb=rgb)
                               for s in shapes.SHAPES]) for a, k, rgb in zip(picks, seeds, colours)])


def shape_separation(vae, x, margin):
    """Hinge on how far apart a shape swap moves the latents, relative to their variance. x (B, 3 shapes, 3, F, H, W).
    Why: a circle and a square of the same size differ only in their corners, ~1/5 of the square (in pixels a swap is
    12% of a colour swap), and reconstruction alone lets the encoder keep that difference in a variation ~1% of the
    latents' variance: decodable, but worth almost nothing in the transformer's v-prediction loss, so the transformer
    never learns to tell the two words apart (the measurements are in the README). The hinge asks each pair of shapes
    to differ by at least `margin` of the variance; dividing by the variance keeps the encoder from just scaling its
    latents up, and the hinge stops pushing once a pair is far enough apart."""
    B = x.shape[0]
    mean, _ = vae.encode(x.flatten(0, 1))  # (B * 3, C, T, h, w)
    z = mean.unflatten(0, (B, 3)).flatten(2)  # (B, 3, C*T*h*w)
    var = z.var()
    gaps = [(z[:, i] - z[:, j]).square().mean(-1) / var for i, j in ((0, 1), (0, 2), (1, 2))]  # each (B,)
    return F.relu(margin - torch.stack(gaps)).mean(), gaps[0].mean().item()


def train_vae(cfg, clips, logfile, gen, triples):
    """clips (N, 3, F, H, W) in [-1, 1]. Two phases: single frames (F=1 is a valid input of the causal VAE and 9x
    cheaper per sample) learn colours and shapes, then whole clips teach the temporal layers. The encoder and
    decoder each see a clip in one frame batch (9 frames, 3 latent frames: the first batch of both). The decoder
    decodes a posterior draw, not the mean: reconstruction then pays for every unit of posterior noise, so the
    encoder shrinks its std until a draw decodes like the mean (v1 decoded the mean, so nothing constrained logvar:
    its posterior std stayed ~1 while the means spread 0.6, and every sampling path saw mostly noise)."""
    vae = CogVideoXVAE(vae_config(cfg)).to(clips.device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    first = last = None
    total = cfg.vae_frame_steps + cfg.vae_steps
    bar = tqdm(range(total), desc="vae", file=sys.stdout, mininterval=2)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = schedule_lr(step, total, cfg.vae_lr)
        single = step < cfg.vae_frame_steps
        x = clips[torch.randint(len(clips), (cfg.vae_frame_batch if single else cfg.vae_batch,), generator=gen)]
        if single:
            f = torch.randint(x.shape[2], (1,), generator=gen).item()
            x = x[:, :, f:f + 1]  # (B, 3, 1, H, W)
        background = x[:, :, :1, :1].median(dim=-1, keepdim=True).values  # (B, 3, 1, 1, 1): top row of frame 0
        c, (H, W) = (cfg.vae_frame_crop if single else cfg.vae_crop), x.shape[-2:]
        i, j = (torch.randint(0, (n - c) // 8 + 1, (1,), generator=gen).item() * 8 for n in (H, W))
        x = x[..., i:i + c, j:j + c]  # a crop on the latent grid, (B, 3, F, c, c)
        mean, logvar = vae.encode(x)  # (B, C, T, h, w) each
        y = vae.decode(posterior_draw(mean, logvar, gen))  # (B, 3, F, c, c)
        rec = reconstruction_loss(x, y, background)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        t = triples[torch.randint(len(triples), (cfg.shape_triples,), generator=gen)]  # (b, 3, 3, F, H, W)
        sep, gap = shape_separation(vae, t[:, :, :, f:f + 1] if single else t, cfg.shape_margin)
        loss = rec + cfg.kl_weight * kl + sep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        first = first if first is not None else rec.item()
        last = rec.item() if last is None else 0.9 * last + 0.1 * rec.item()
        bar.set_postfix(rec=f"{last:.4f}", kl=f"{kl.item():.2f}", circle_square=f"{gap:.3f}", refresh=False)
        if step % 10 == 0 or step == total - 1:
            log(logfile, stage="vae", step=step, frames=x.shape[2], rec=round(rec.item(), 5), kl=round(kl.item(), 4),
                circle_square=round(gap, 4))
    return vae.eval().requires_grad_(False), first, last


def finetune_decoder(cfg, vae, clips, logfile, gen):
    """Phase 3: train the decoder alone on whole clips, the encoder frozen. The posterior (what the transformer
    learns) stays exactly as it is, so this stage only sharpens what generation decodes: shape corners and the
    frames that time compression packs four to a latent frame. It decodes posterior draws, as phases 1-2 do."""
    vae.decoder.requires_grad_(True)
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=cfg.vae_lr / 2)
    bar = tqdm(range(cfg.decoder_steps), desc="decoder", file=sys.stdout, mininterval=2)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = schedule_lr(step, cfg.decoder_steps, cfg.vae_lr / 2)
        x = clips[torch.randint(len(clips), (cfg.vae_batch,), generator=gen)]  # (B, 3, F, H, W)
        with torch.no_grad():
            z = posterior_draw(*vae.encode(x), gen)  # (B, C, T, h, w)
        y = vae.decode(z)  # (B, 3, F, H, W)
        loss = reconstruction_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        bar.set_postfix(rec=f"{loss.item():.4f}", refresh=False)
        if step % 10 == 0 or step == cfg.decoder_steps - 1:
            log(logfile, stage="decoder", step=step, rec=round(loss.item(), 5))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_accuracy(vae, n=40, seed=5):
    """shapes.evaluate on encode -> decode of n clips (held-out and training attributes), decoding the posterior
    mean and a posterior draw: the ceiling of what the transformer's samples can score. Also the posterior's size:
    its std (root mean square over the latents) against the spread of the means (their std), and the mean absolute
    pixel error of each decode (pixels in [-1, 1])."""
    train_attrs, held_out = shapes.split()
    vids, caps = shapes.make_clips(n, seed, held_out + train_attrs)
    x = shapes.to_tensor(vids).transpose(1, 2).to(next(vae.parameters()).device)  # (n, 3, F, H, W)
    mean, logvar = vae.encode(x)  # (n, C, T, h, w) each
    out = {"posterior_std": round((logvar.exp().mean().sqrt()).item(), 4), "mean_spread": round(mean.std().item(), 4)}
    for name, z in (("mean", mean), ("draw", posterior_draw(mean, logvar, torch.Generator().manual_seed(seed)))):
        y = vae.decode(z)  # (n, 3, F, H, W)
        out[f"{name}_error"] = round((y - x).abs().mean().item(), 4)
        out[name] = shapes.evaluate(shapes.from_tensor(y.transpose(1, 2)), caps)
    # a colour no caption has (the LoRA lesson's): the transformer can only learn to draw what the VAE can decode
    new = [a._replace(colour=c) for c in shapes.NEW_COLOURS for a in train_attrs if shapes.BACKGROUNDS[a.background]
           != shapes.ALL_COLOURS[c]]
    vids, caps = shapes.make_clips(n, seed + 1, new)
    y = vae.decode(vae.encode(shapes.to_tensor(vids).transpose(1, 2).to(x.device))[0])  # (n, 3, F, H, W)
    out["new_colours"] = shapes.evaluate(shapes.from_tensor(y.transpose(1, 2)), caps)
    return out


@torch.no_grad()
def encode_clips(vae, videos, batch=16):
    """Posterior means and stds (N, T, C, h, w) each, in the transformer's (frames, channels) order: the transformer
    draws a fresh latent from them every step. videos stay uint8 until a batch is encoded: as float32 the 8,000
    clips would take 3.5 GB."""
    dev = next(vae.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(videos), batch), desc="encode", file=sys.stdout, mininterval=2):
        mean, logvar = vae.encode(shapes.to_tensor(videos[i:i + batch]).transpose(1, 2).to(dev))  # (b, C, T, h, w)
        means.append(mean.cpu())
        stds.append((0.5 * logvar).exp().cpu())
    return tuple(torch.cat(t).permute(0, 2, 1, 3, 4).contiguous() for t in (means, stds))  # (N, T, C, h, w) each


# ---------------------------------------------------------------------------------------------------- 3. transformer

def transformer_config(cfg, text_dim):
    return TransformerConfig(num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                             in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                             time_embed_dim=cfg.heads * cfg.head_dim, text_embed_dim=text_dim, num_layers=cfg.layers,
                             sample_width=8, sample_height=8, sample_frames=9, patch_size=cfg.patch_size,
                             temporal_compression_ratio=4, max_text_seq_length=cfg.max_text_seq_length,
                             use_rotary_positional_embeddings=True)


def init_transformer(model):
    """Default PyTorch init, except the modulation and output layers start at zero (adaLN-Zero, as DiT): every block
    starts as the identity and the first prediction is 0, which keeps the first steps of training stable."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("transformer_blocks.", "norm_out.")) and ".norm" in name and ".linear." in name:
                p.zero_()
            elif name.startswith("proj_out."):
                p.zero_()
    return model


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds the transformer up on `device`. On a CPU that takes oneDNN's bf16 kernels (AVX512
    or AMX on x86, bf16 on Arm): the shipped demo's run was 1.8x faster than fp32 with them. Without them (AVX2 only)
    every bf16 matmul is emulated: a training step of batch 32 took 11.9 s against 0.54 s in fp32 (2 threads, AMD
    EPYC). On a GPU, bf16 needs Ampere or newer."""
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def train_transformer(cfg, means, stds, scale, text, caption_ids, empty_id, logfile, gen):
    """means, stds (N, T, C, h, w) the unscaled posteriors; text (K, L, D) one embedding per distinct caption,
    caption_ids (N,). Each step draws a fresh latent from each clip's posterior and scales it, as the official
    recipe encodes its training videos: the model learns the distribution the VAE's encoder actually produces."""
    device = text.device
    schedule = SCHEDULERS["cogvideox-5b"]
    bf16 = fast_bf16(device)
    model = init_transformer(CogVideoXTransformer(transformer_config(cfg, text.shape[-1]))).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.01)
    first = last = None
    bar = tqdm(range(cfg.dit_steps), desc="transformer", file=sys.stdout, mininterval=2)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = schedule_lr(step, cfg.dit_steps, cfg.dit_lr)
        idx = torch.randint(len(means), (cfg.dit_batch,), generator=gen)
        x0 = scale * (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)).to(device)  # (B, T, C, h, w)
        drop = torch.rand(cfg.dit_batch, generator=gen) < cfg.text_drop
        c = text[torch.where(drop, empty_id, caption_ids[idx]).to(text.device)]  # (B, L, D)
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.dit_batch,), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):  # fp32 weights, bf16 matmuls
            v = model(add_noise(schedule, x0, noise, t), c, t)
        loss = F.mse_loss(v.float(), v_target(schedule, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item() if last is None else 0.98 * last + 0.02 * loss.item()
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        if step % 10 == 0 or step == cfg.dit_steps - 1:
            log(logfile, stage="transformer", step=step, loss=round(loss.item(), 5))
    return model.eval().requires_grad_(False), first, last


# ------------------------------------------------------------------------------------------------------ 4. snapshot

def save_snapshot(root, t5, vae, transformer):
    """The official layout (tokenizer/ is written by train_tokenizer): model_index.json and one folder per component,
    each with the config.json its library writes and safetensors weights."""
    diffusers = {"_diffusers_version": DIFFUSERS_VERSION}
    write_json(os.path.join(root, "model_index.json"), {
        "_class_name": "CogVideoXPipeline", **diffusers,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"]})
    # The transformer is stored in bf16, as the official 5b snapshots are (half the bytes; both loaders upcast to the
    # fp32 they compute in); the VAE stays fp32, since its decoder draws the shapes' edges.
    for name, cls, model, config, dtype in (
            ("transformer", "CogVideoXTransformer3DModel", transformer, asdict(transformer.config), torch.bfloat16),
            ("vae", "AutoencoderKLCogVideoX", vae, {**asdict(vae.config), "force_upcast": True, "shift_factor": None,
                                                    "latents_mean": None, "latents_std": None}, torch.float32)):
        save_component({k: v.to(dtype) for k, v in model.state_dict().items()},
                       {"_class_name": cls, **diffusers, **config}, os.path.join(root, name))
    c = t5.config
    save_component(t5.state_dict(), {
        **asdict(c), "architectures": ["T5EncoderModel"], "model_type": "t5", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "dropout_rate": 0.1, "initializer_factor": 1.0, "is_encoder_decoder": True,
        "num_decoder_layers": c.num_layers, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "tie_word_embeddings": False, "use_cache": True, "dtype": "float32"}, os.path.join(root, "text_encoder"), "model")
    os.makedirs(os.path.join(root, "scheduler"))
    write_json(os.path.join(root, "scheduler", "scheduler_config.json"),
               {"_class_name": "CogVideoXDDIMScheduler", **diffusers, **asdict(SCHEDULERS["cogvideox-5b"])})


# ---------------------------------------------------------------------------------------------------------- main

def stage_folder(out: str) -> str:
    """Where the stages of an unfinished run are kept, beside the output: `runs/shapes-tiny.partial`."""
    return out.rstrip(os.sep) + ".partial"


def check_stages(cfg: TrainConfig, out: str, resume: bool, vae_from: str | None) -> dict | None:
    """Before any work: a run without --resume needs no earlier unfinished run beside `out` (its stages would be
    silently lost); with --resume there must be one, of the same recipe. Returns the recorded run, or None."""
    stages = stage_folder(out)
    if not resume:
        if os.path.lexists(stages):
            raise ValueError(f"--output {out}: an interrupted run's stages are in {stages}; add --resume to continue "
                             f"it, or delete that folder to start over")
        return None
    if not os.path.isdir(stages):
        raise ValueError(f"--resume: there is no interrupted run for --output {out} ({stages} does not exist); "
                         f"run without --resume")
    cli.check_folder(stages, "--resume")  # ours, with nothing added
    run = json.loads(open(os.path.join(stages, "run.json")).read())
    want = {"recipe": json.loads(json.dumps(asdict(cfg))), "vae_from": vae_from}
    if {k: run.get(k) for k in want} != want:
        raise ValueError(f"--resume: {stages} was started with another recipe, seed or --vae-from; rerun that "
                         f"command with --resume, or delete {stages} to start over")
    return run


def save_stage(stages: str, name: str, tensors: dict, **record) -> None:
    """One finished stage: its tensors in `<name>.safetensors` (atomically), then its record in run.json, which is
    what --resume trusts: a stage listed there is complete."""
    cli.atomic_write(os.path.join(stages, f"{name}.safetensors"),
                     lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp))
    run = json.loads(open(os.path.join(stages, "run.json")).read())
    run["done"][name] = record
    cli.atomic_write(os.path.join(stages, "run.json"), lambda tmp: write_json(tmp, run))
    cli.write_marker(stages, "train_tiny.py")


def train(cfg: TrainConfig, out: str, evaluate_after: bool = True, vae_from: str | None = None, device="cpu",
          resume: bool = False):
    """vae_from: reuse the VAE of an existing snapshot instead of training one (transformer ablations). Each stage
    seeds its own generators, so a stage gives the same result whether the run went straight through or resumed
    from `<out>.partial`, where every finished stage is kept until the snapshot is in place; and the transformer
    comes out the same with or without vae_from. Random draws come from CPU generators on any device, so a GPU run
    sees the same batches, timesteps and noise as a CPU run."""
    device = torch.device(device)
    t_start, c_start = time.perf_counter(), time.process_time()
    out = os.path.abspath(out)
    cli.check_folder(out, "--output")  # new, or a snapshot this script wrote with nothing added: checked now and at the end
    run = check_stages(cfg, out, resume, vae_from)
    stages = stage_folder(out)
    if run is None:
        run = {"recipe": asdict(cfg), "vae_from": vae_from, "done": {}}
        os.makedirs(stages)
        cli.atomic_write(os.path.join(stages, "run.json"), lambda tmp: write_json(tmp, run))
        cli.write_marker(stages, "train_tiny.py")
    done = run["done"]
    load = lambda name: load_file(os.path.join(stages, f"{name}.safetensors"))
    if done:
        print(f"resuming from {stages}: " + ", ".join(done) + " done")
    summary = {k: tuple(v["first_last"]) for k, v in done.items() if "first_last" in v}
    with cli.output_folder(out, "train_tiny.py") as tmp:
        logfile = open(os.path.join(tmp, "train_log.jsonl"), "w")
        log(logfile, stage="config", **{f.name: getattr(cfg, f.name) for f in fields(cfg)})
        train_attrs, _ = shapes.split()

        print("1/5 tokenizer and text encoder")
        tok = train_tokenizer(os.path.join(tmp, "tokenizer"), [shapes.caption(a) for a in train_attrs], cfg,
                              random.Random(cfg.seed))
        torch.manual_seed(cfg.seed)
        t5 = init_t5(T5Encoder(t5_config(tok.vocab_size, cfg)))

        print("2/5 VAE" + (f" from {vae_from}" if vae_from else ""))
        if vae_from:
            vae = load_vae(vae_from, device=device)
        else:
            if "vae" not in done or "decoder" not in done:
                vids = vae_clips(cfg.vae_clips, cfg.seed + 1, train_attrs, cfg.vae_random_colours)
                clips = shapes.to_tensor(vids).transpose(1, 2).contiguous().to(device)  # (N, 3, F, H, W)
            if "vae" in done:
                vae = CogVideoXVAE(vae_config(cfg))
                vae.load_state_dict(load("decoder" if "decoder" in done else "vae"))
                vae = vae.to(device).eval().requires_grad_(False)
            else:
                torch.manual_seed(cfg.seed + 1)
                triples = shape_triples(cfg.vae_clips // 4, cfg.seed + 5, train_attrs, cfg.vae_random_colours)
                triples = shapes.to_tensor(triples.reshape(-1, *vids.shape[1:])).transpose(1, 2).unflatten(
                    0, (-1, 3)).to(device)  # (N/4, 3, 3, F, H, W)
                vae, first, last = train_vae(cfg, clips, logfile, torch.Generator().manual_seed(cfg.seed + 1), triples)
                summary["vae_rec"] = (first, last)
                save_stage(stages, "vae", vae.state_dict(), first_last=[first, last])
            if "decoder" not in done:
                vae = finetune_decoder(cfg, vae, clips, logfile, torch.Generator().manual_seed(cfg.seed + 3))
                save_stage(stages, "decoder", vae.state_dict())
        acc = reconstruction_accuracy(vae)
        log(logfile, stage="vae_reconstruction", **acc)
        print(f"VAE posterior std {acc['posterior_std']:.4f} against a spread of the means of {acc['mean_spread']:.4f}"
              f"; reconstruction (40 clips), mean | draw: " + ", ".join(
                  f"{k} {100 * acc['mean'][k]:.0f}% | {100 * acc['draw'][k]:.0f}%"
                  for k in ("colour", "shape", "motion", "background"))
              + f"; pixel error {acc['mean_error']:.4f} | {acc['draw_error']:.4f}; colours no caption has ("
              + ", ".join(shapes.NEW_COLOURS) + f"): colour {100 * acc['new_colours']['colour']:.0f}%")

        print("3/5 posteriors and text embeddings, cached once")
        vids, caps = shapes.make_clips(cfg.dit_clips, cfg.seed + 2, train_attrs)
        if "latents" in done:
            cached = load("latents")
            means, stds = cached["means"], cached["stds"]
        else:
            means, stds = encode_clips(vae, vids)  # (N, T, C, h, w) each
            save_stage(stages, "latents", {"means": means, "stds": stds})
        del vids
        # 1 / the std of a posterior draw over all clips, latents and channels (the spread of the means and the
        # posterior noise together), so the transformer sees unit-variance latents
        vae.config.scaling_factor = round(1.0 / (means.var() + stds.square().mean()).sqrt().item(), 4)
        distinct = sorted(set(caps)) + [""]  # "" is the unconditional (negative) prompt
        with torch.no_grad():
            text = t5(tok(distinct, max_length=cfg.max_text_seq_length)).to(device)  # (K, L, D)
        caption_ids = torch.tensor([distinct.index(c) for c in caps])

        print("4/5 transformer, " + ("bf16 autocast" if fast_bf16(device) else
                                     "fp32 (no bf16 units here; see train_tiny.fast_bf16)"))
        transformer = CogVideoXTransformer(transformer_config(cfg, text.shape[-1]))
        if "transformer" in done:
            transformer.load_state_dict(load("transformer"))
        else:
            torch.manual_seed(cfg.seed + 4)
            transformer, first, last = train_transformer(cfg, means, stds, vae.config.scaling_factor, text,
                                                         caption_ids, len(distinct) - 1, logfile,
                                                         torch.Generator().manual_seed(cfg.seed + 4))
            summary["transformer_loss"] = (first, last)
            save_stage(stages, "transformer", transformer.state_dict(), first_last=[first, last])

        print("5/5 snapshot")
        save_snapshot(tmp, t5, vae.cpu(), transformer.cpu())
        wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
        log(logfile, stage="done", wall_s=round(wall, 1), cpu_s=round(cpu, 1), scaling_factor=vae.config.scaling_factor,
            vae_from=vae_from, transformer_bf16=fast_bf16(device), resumed=sorted(done),
            **{f"{k}_first_last": v for k, v in summary.items()})
        logfile.close()
    try:  # the snapshot is in place: the stages are no longer needed, unless someone saved a file among them
        cli.check_folder(stages, "--output")
        shutil.rmtree(stages)
    except ValueError as e:
        print(f"kept {stages}: {e}")
    print(f"wrote {out} in {wall / 60:.1f} min ({cpu / 60:.1f} CPU-min" + (", resumed" if done else "") + "); "
          + ", ".join(f"{k} {first:.4f} -> {last:.4f}" for k, (first, last) in summary.items()))
    if evaluate_after and cfg.eval_per_combo > 0:
        import evaluate
        evaluate.report(out, per_combo=cfg.eval_per_combo, steps=cfg.eval_steps, device=device)
    return summary


def main(argv=None):
    p = cli.ArgumentParser(description="Train the tiny moving-shapes CogVideoX from scratch (demo/shapes-tiny).")
    p.add_argument("--output", default=None,
                   help="snapshot folder: a new one, or one this script wrote (default: runs/shapes-tiny; with --smoke "
                        "a folder in the temp directory). The shipped demo/shapes-tiny is replaced only if named here")
    p.add_argument("--smoke", action="store_true", help="toy sizes and a few steps: checks the pipeline in < 1 min")
    p.add_argument("--seed", type=cli.seed, default=0, help="every random draw of the recipe")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps: the same batches and noise on any "
                                                    "(4,000 transformer steps: ~6 min on an H100 shared by 3 runs)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--vae-from", default=None, help="reuse the VAE of this snapshot (skip stage 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished stage (kept in <output>.partial); "
                        "same command otherwise")
    args = p.parse_args(argv)

    def work():
        device = cli.pick_device(args.device)
        if args.vae_from:
            cli.existing_path("--vae-from", os.path.join(args.vae_from, "vae", "config.json"), "file")
        torch.set_num_threads(args.threads)
        cfg = replace(PRESETS["smoke" if args.smoke else "default"], seed=args.seed)
        out = args.output or os.path.join(tempfile.gettempdir() if args.smoke else "runs", "shapes-tiny" + "-smoke" * args.smoke)
        summary = train(cfg, out, evaluate_after=not args.no_eval, vae_from=args.vae_from, device=device,
                        resume=args.resume)
        if args.smoke:
            for key, (first, last) in summary.items():
                if not last < first:
                    raise ValueError(f"smoke: {key} did not go down ({first:.4f} -> {last:.4f})")
            print("smoke: every loss went down")
    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
