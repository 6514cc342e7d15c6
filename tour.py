"""A guided tour through one generation: the demo model, one prompt, every stage printed as it runs.

    python tour.py                                                  # the README prompt on the demo model -> tour/
    python tour.py --prompt "a blue square moving up on a gray background" --out tour_blue --attn-head 1

For each stage it prints what happens, the shapes of the real tensors (read from the run, never typed in), and the
`file.py:function` that does it, so it reads best beside the source. It runs the same computation as
`generate.generate(pipe, prompt, seed=...)` (the tests check the frames are identical), written out step by step, in
the order it runs:

    tokenizer -> T5 -> initial noise -> step 0 written out [patchify + RoPE -> the timestep -> block 0 line by line,
    then the other 3 blocks -> unpatchify -> CFG -> DDIM step] -> the other 49 steps, the same in a loop
    -> VAE decode -> frames -> what shapes.py's evaluator reads from them

and writes two pictures into --out (default `tour/`):
  x0.png         the decoded x0 prediction (the sampler's estimate of the clean video) at several steps:
                 rows = steps, columns = the 9 frames; the last step's x0 is the video.
  attention.png  one attention head at one step: how much each video token attends to each prompt token, as a heat map
                 over the 4x4 token grid of each latent frame (columns = text tokens, rows = latent frames; the first
                 column is the decoded video at that latent frame). One colour scale for the whole picture.

Legend: B batch (2 = [negative; prompt] under guidance), L text tokens, N video tokens, D width, E timestep-embedding
width, F latent frames, C latent channels, h/w latent height/width, p patch size, heads x d attention heads.
"""
import contextlib
import itertools
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import cli
import model
import shapes
import vae
from pipeline import decode_latents, encode_text, load_pipeline, read_model_info, resolve_model_path
from sampler import guidance, make_sampler

PROMPT = "a red circle moving right on a black background"


@contextlib.contextmanager
def patched(obj, name: str, value):
    """Set `obj.name = value` for the duration of a `with` block, then put back what was there. A name that came from
    the class (a method such as `transformer.rope`) is shadowed by an instance attribute and the shadow removed after.
    This is how the tour and bench/ablations.py reach the hooks without editing the core files:
    `patched(model, "attention", fn)`, `patched(pipe.transformer, "rope", fn)`, `patched(evaluate, "generate", fn)`."""
    own = name in vars(obj) or name in getattr(obj, "_modules", {})
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield value
    finally:
        if own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


class Printer:
    """Prints the stages and keeps every shape it prints in `shapes` (name -> tuple), which main() returns."""

    def __init__(self, out=None):
        self.out, self.shapes, self.n = out, {}, 0       # out None: sys.stdout at the time of printing

    def print(self, text: str):
        print(text, file=self.out or sys.stdout)

    def stage(self, title: str, where: str, what: str):
        self.n += 1
        self.print(f"\n[{self.n}] {title}  --  {where}\n    {what}")

    def shape(self, name: str, tensor, note: str = ""):
        self.shapes[name] = tuple(tensor.shape)
        self.print(f"    {name:<18} {str(tuple(tensor.shape)):<22} {note}")

    def line(self, text: str):
        self.print(f"    {text}")

    def hook(self, name: str, in_note: str, out_note: str):
        """A forward hook that prints the input and output shapes of each call as it runs: `name k in`, `name k out`."""
        calls = itertools.count()

        def show(_module, args, out):   # returns None: a forward hook that returns something replaces the output
            k = next(calls)
            self.shape(f"{name} {k} in", args[0], in_note)
            self.shape(f"{name} {k} out", out, out_note)
        return show


class AttentionRecorder:
    """Stands in for model.attention: the same output, plus softmax(q k^T / sqrt(d)) of every call kept in `maps`
    (one per block, in order). Install with `patched(model, "attention", recorder)`."""

    def __init__(self, inner):
        self.inner, self.maps, self.first_qkv = inner, [], None

    def __call__(self, q, k, v):
        self.first_qkv = self.first_qkv or (q, k, v)
        self.maps.append(torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1))
        return self.inner(q, k, v)


# ----------------------------------------------------------------------------------------------------------------------
# Pictures: numpy + imageio; labels drawn with Pillow (imageio's own dependency)


def heat(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB, black -> red -> yellow -> white."""
    stops = np.array([[0, 0, 0], [190, 0, 0], [255, 170, 0], [255, 255, 255]], np.float64)
    pos = np.clip(a, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return np.round(stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def upscale(img: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, 3) image to (size, size, 3); size a multiple of H and W."""
    return img.repeat(size // img.shape[0], axis=0).repeat(size // img.shape[1], axis=1)


GAP, LABEL_W, TITLE_H, HEAD_H = 4, 130, 20, 16   # picture layout in pixels: between cells, row labels, title, headers


def labelled_grid(cells, title: str, row_labels, col_labels, cell: int) -> np.ndarray:
    """cells[r][c] (h, w, 3) uint8 images, upscaled to cell x cell -> one white canvas with a title, a label left of
    each row and one above each column: (TITLE_H + HEAD_H + rows * (cell + GAP), LABEL_W + cols * (cell + GAP), 3)."""
    from PIL import Image, ImageDraw
    rows, cols, top = len(cells), len(cells[0]), TITLE_H + HEAD_H
    canvas = Image.new("RGB", (LABEL_W + cols * (cell + GAP), top + rows * (cell + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    for c, text in enumerate(col_labels):
        draw.text((LABEL_W + c * (cell + GAP) + 2, TITLE_H + 2), text, fill="black")
    for r, row in enumerate(cells):
        y = top + r * (cell + GAP)
        for i, text in enumerate(row_labels[r].split("\n")):
            draw.text((4, y + 4 + 12 * i), text, fill="black")
        for c, img in enumerate(row):
            canvas.paste(Image.fromarray(upscale(img, cell)), (LABEL_W + c * (cell + GAP), y))
    return np.asarray(canvas)


def save_png(path: str, image: np.ndarray) -> None:
    """Atomically, and signed as ours, like every output of this project (cli.py)."""
    cli.atomic_write(path, lambda p: cli.write_png(p, image))


def uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8, rounded as evaluate.py rounds."""
    return shapes.from_tensor(frames * 2 - 1)


def x0_picture(pipe, x0s: dict, timesteps, caption: str) -> np.ndarray:
    """x0.png: the x0 predictions kept at some steps ({step: (1, F, C, h, w)}), decoded: rows = steps, columns =
    frames."""
    shown = sorted(x0s)
    rows = decode_latents(pipe, torch.cat([x0s[s] for s in shown]), tiled=False)      # (R, frames, 3, H, W)
    cells = [list(uint8_frames(r)) for r in rows]                                      # R x frames x (H, W, 3)
    labels = [f"step {s}\nt = {timesteps[s]}" for s in shown]
    title = (f"x0, the clean video the sampler predicts at each step (sampler.x0, decoded): rows = steps, "
             f"columns = frames; {caption}")
    columns = [f"frame {j}" for j in range(len(cells[0]))]
    return labelled_grid(cells, title, labels, columns, cell=2 * cells[0][0].shape[0])


def attention_picture(probs, video: np.ndarray, pieces, grid, temporal_compression: int, caption: str):
    """attention.png from one head's attention probabilities (S, S) over [text; video]: for each latent frame (rows)
    a pixel frame of the video, then one heat map per text token (columns) of how much each video token of that frame
    attends to it, all on one colour scale. grid = (F, Hp, Wp) latent frames x token rows x token columns.
    Returns (the picture, (L,) each text token's mean share of the video tokens' attention)."""
    (lf, Hp, Wp), L = grid, len(pieces)
    to_text = probs[L:, :L]                                                           # (N, L): video -> text
    share = to_text.mean(0)                                                           # (L,)
    maps = to_text.T.reshape(L, lf, Hp, Wp).numpy()                                   # (L, F, Hp, Wp)
    scale = maps.max() if maps.max() > 0 else 1.0
    span = [0] + [min(temporal_compression * j, video.shape[0] - 1) for j in range(1, lf)]  # a pixel frame each
    cells = [[video[span[f]]] + [heat(maps[j, f] / scale) for j in range(L)] for f in range(lf)]
    labels = [f"latent frame {f}\n(pixel frame {span[f]})" for f in range(lf)]
    columns = ["video"] + [f"{pieces[j].replace(chr(9601), '')} {100 * share[j]:.0f}%" for j in range(L)]
    title = (f"{caption}: attention from each video token ({Hp}x{Wp} grid per latent frame) to each text token; "
             f"one colour scale, black = 0, white = {scale:.2f}; % = the token's mean share")
    return labelled_grid(cells, title, labels, columns, cell=2 * video.shape[1]), share


# ----------------------------------------------------------------------------------------------------------------------
# The tour


SHOW_STEPS = (0, 2, 5, 10, 20, 30, 49)   # x0.png's rows at the default 50 steps; fewer steps keep those below
PICTURES = ("x0.png", "attention.png")


def check_choices(cfg, steps: int, show_steps, attn_step, attn_block: int, attn_head: int, flags: bool = False):
    """The steps, block and head the pictures show -> (sorted show_steps, attn_step, attn_block >= 0), or ValueError
    naming the value that is out of range (as the command line's flag when `flags`). show_steps None: SHOW_STEPS
    below `steps`, and the last step; attn_step None: the middle step."""
    name = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
    run, blocks = f"the run has {steps} step(s)", f"the model has {cfg.num_layers} blocks"
    for n, values, lo, hi, what in (("show_steps", show_steps or (), -steps, steps, run),
                                    ("attn_step", [attn_step], 0, steps, run),
                                    ("attn_block", [attn_block], -cfg.num_layers, cfg.num_layers, blocks),
                                    ("attn_head", [attn_head], 0, cfg.num_attention_heads,
                                     f"a block has {cfg.num_attention_heads} heads")):
        for v in values:
            if v is not None and not lo <= v < hi:
                raise ValueError(f"{name(n)} {v} is out of range: {what}; use {lo} to {hi - 1}"
                                 + (" (negative: from the end)" if lo < 0 else ""))
    shown = [s for s in SHOW_STEPS if s < steps] if show_steps is None else show_steps
    shown = sorted({s % steps for s in shown} | {steps - 1})
    return shown, steps // 2 if attn_step is None else attn_step, attn_block % cfg.num_layers


def where(fn) -> str:
    """`file.py:function` of a function, read from the function, so the text follows the code when it moves."""
    return f"{fn.__module__}.py:{fn.__qualname__}"


def explain_transformer(p: Printer, tr: model.CogVideoXTransformer, x, text, timestep: int,
                        recorder: AttentionRecorder):
    """model.py:CogVideoXTransformer.forward written out (text-to-video: no ofs), printing each part as it runs; the
    same prediction as tr(x, text, t), operation for operation (the tour's frames are checked against generate()'s).
    x (B, F, C, h, w) latents, text (B, L, text_embed_dim); `recorder` installed as model.attention, empty.
    Returns (B, F, C, h, w) in fp32."""
    cfg = tr.config
    _, F_, _, h, w = x.shape
    L, ps, pt = text.shape[1], cfg.patch_size, cfg.patch_size_t or 1
    tokens, c = tr.patch_embed(x), tr.patch_embed.text_proj(text)                    # (B, N, D), (B, L, D)
    p.stage("patchify and RoPE (step 0)", "model.py:CogVideoXTransformer.forward, PatchEmbed.forward",
            f"the text and the {ps}x{ps} latent patches become tokens of the same width, text first in one joint "
            "sequence")
    p.shape("patches", model.patchify(x, ps, pt), f"(B, N, C*p*p = {cfg.in_channels}*{ps}*{ps})  model.py:patchify, "
            "tokens in (frame, row, column) order")
    p.shape("video tokens", tokens, "(B, N, D)  model.py:PatchEmbed.forward")
    p.shape("text tokens", c, "(B, L, D)  PatchEmbed.text_proj")
    p.line(f"{L} text + {F_ // pt} x {h // ps} x {w // ps} = {tokens.shape[1]} video tokens = {L + tokens.shape[1]} "
           "in the joint sequence [text; video]")
    pos_c, pos_x = tr.absolute_positions(F_, h, w, x.dtype, x.device) or (None, None)
    tokens = tokens if pos_x is None else tokens + pos_x
    c = c if pos_c is None else c + pos_c
    rope = tr.rope(F_, h, w, L, x.device)                                            # (cos, sin), (S, 1, d/2) each
    if rope is not None:
        n_t, n_hw = cfg.attention_head_dim // 8, cfg.attention_head_dim // 16 * 3
        p.shape("rope cos, sin", rope[0], "(S, 1, d/2) each  model.py:CogVideoXTransformer.rope -> model.py:rope_3d")
        p.line(f"per head of d = {cfg.attention_head_dim}: {cfg.attention_head_dim // 2} rotation angles = "
               f"[time {n_t} | height {n_hw} | width {n_hw}]; the {L} text rows are the identity (cos 1, sin 0), so "
               "RoPE moves video tokens only; no absolute position table in this variant")
    else:
        p.line("no RoPE in this variant: absolute 3D sincos positions are added to the tokens "
               "(model.py:CogVideoXTransformer.absolute_positions)")

    t = torch.full((x.shape[0],), timestep, device=x.device)                         # (B,)
    sinusoid = model.timestep_embedding(t, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype)
    emb = tr.time_embedding(sinusoid)                                                # (B, E)
    p.stage(f"the timestep and one transformer block (block 0 of {cfg.num_layers}, step 0)",
            "model.py:Block.forward, LayerNormZero.forward (expert adaLN), Attention.forward",
            "the timestep becomes one vector, emb. One shared LayerNorm; each modality gets its own shift/scale/gate "
            "from emb, twice per block: norm1 before attention, norm2 before the feed-forward. emb depends on t only "
            "(the same for every row of the batch): the text reaches the video through attention, not through the "
            "modulation")
    p.shape("timestep sinusoid", sinusoid, "(B, D)  model.py:timestep_embedding")
    p.shape("emb", emb, "(B, E)  model.py:MLPEmbedder (time_embedding)")
    tokens, c = explain_block(p, tr.transformer_blocks[0], tokens, c, emb, rope, timestep, recorder)
    for block in tr.transformer_blocks[1:]:
        tokens, c = block(tokens, c, emb, rope)                                      # (B, N, D), (B, L, D)

    tokens = tr.proj_out(tr.norm_out(tr.norm_final(tokens), emb))                   # (B, N, p*p*C_out)
    pred = model.unpatchify(tokens, F_, h, w, ps, pt).float()                        # (B, F, C, h, w)
    p.stage("out of the transformer", "model.py:AdaLayerNorm (norm_out), proj_out, unpatchify",
            f"after all {cfg.num_layers} blocks only the video tokens go on: a final adaLN, a linear map back to "
            "p*p*C numbers per token, and the patches put back in place")
    p.shape("proj_out", tokens, "(B, N, p*p*C_out)")
    p.shape("prediction", pred, "(B, F, C, h, w): v = sqrt(a) noise - sqrt(1 - a) x0, for each branch")
    return pred


def explain_block(p: Printer, blk: model.Block, x, c, emb, rope, t: int, recorder: AttentionRecorder):
    """model.py:Block.forward written out, printing each part as it runs; the same (x, c) as blk(x, c, emb, rope).
    x (B, N, D) video, c (B, L, D) text, emb (B, E); `recorder` has seen no call yet."""
    L = c.shape[1]

    def modulations(norm, name: str):   # what LayerNormZero.forward computes first: 6 x (B, 1, D)
        mods = norm.linear(F.silu(emb))[:, None].chunk(6, dim=2)
        if name == "norm1":
            p.shape("modulations", torch.stack(mods),
                    "6 x (B, 1, D): video shift, scale, gate; text shift, scale, gate")
        mag = [m[0].abs().mean().item() for m in mods]
        p.line(f"{name} at t = {t}, mean |.|: video shift {mag[0]:.2f} scale {mag[1]:.2f} gate {mag[2]:.2f}  |  "
               f"text shift {mag[3]:.2f} scale {mag[4]:.2f} gate {mag[5]:.2f}")

    modulations(blk.norm1, "norm1")
    nx, nc, gate, c_gate = blk.norm1(x, c, emb)                     # (B, N, D), (B, L, D), gates (B, 1, D)
    s = torch.cat([nc, nx], dim=1)                                  # (B, S, D), text first
    p.shape("attention input", s, "(B, S, D): [norm1(text); norm1(video)] concatenated")
    a = blk.attn1(s, rope)                                          # (B, S, D)
    p.shape("q, k, v", recorder.first_qkv[0], "(B, heads, S, d) each, after the per-head QK LayerNorm and RoPE "
            "-> model.attention")
    p.shape("attention probs", recorder.maps[0], "(B, heads, S, S), softmax(q k^T / sqrt(d)) (kept by the tour)")
    x, c = torch.addcmul(x, gate, a[:, L:]), torch.addcmul(c, c_gate, a[:, :L])          # x + gate * attn
    modulations(blk.norm2, "norm2")
    nx, nc, gate, c_gate = blk.norm2(x, c, emb)
    x, c = torch.addcmul(x, gate, blk.ff(nx)), torch.addcmul(c, c_gate, blk.ff(nc))      # + gate * ff, per token
    p.shape("block video out", x, "(B, N, D) = x + gate * attn + gate * ff(norm2(x))")
    p.shape("block text out", c, "(B, L, D), the same with the text's own gates")
    return x, c


@torch.no_grad()
def tour(pipe, prompt: str = PROMPT, out: str = "tour", steps: int = 50, guidance_scale: float = 6.0, seed: int = 42,
         show_steps=None, attn_step: int | None = None, attn_block: int = -1, attn_head: int = 0,
         printer: Printer | None = None) -> dict:
    """Run one generation stage by stage, printing each stage as it runs; write x0.png and attention.png into `out`.
    Step 0 is written out, its transformer call too (explain_transformer); the other steps are sampler.denoise's
    loop. show_steps: the steps whose x0 x0.png shows (default SHOW_STEPS below `steps`, and the last step);
    attn_step: the step attention.png shows (default: the middle one). Returns {"shapes": name -> shape of every
    tensor printed, "frames": (1, F, 3, H, W), "pngs": [paths], "attention": (L,) attention of the chosen head from
    video tokens to each text token, "pieces": text tokens}."""
    p = printer or Printer()
    tr, cfg, info = pipe.transformer, pipe.transformer.config, pipe.info
    L, use_cfg = cfg.max_text_seq_length, guidance_scale > 1
    show_steps, attn_step, attn_block = check_choices(cfg, steps, show_steps, attn_step, attn_block, attn_head)
    # new, empty or ours, and never another's x0.png: what is replaced must be ours; other files are left alone
    cli.claim_folder(out, "tour.py", "--out", parts=PICTURES)
    cli.record(out, PICTURES, "tour.py")

    # 1. Tokens
    prompts = ["", prompt] if use_cfg else [prompt]
    ids = pipe.tokenizer(prompts, max_length=L)                                      # (B, L)
    p.stage("tokenizer", "text_encoder.py:Tokenizer.__call__",
            f"each prompt -> SentencePiece ids + </s>, padded with <pad> to max_text_seq_length = {L} (226 in the "
            "real models)")
    p.shape("ids", ids, "(B, L); rows: [negative prompt \"\", prompt]" if use_cfg else "(B, L)")
    sp = pipe.tokenizer.sp
    pieces = [sp.id_to_piece(i) if i < sp.get_piece_size() else f"<{i}>" for i in ids[-1].tolist()]
    p.line("prompt tokens: " + " ".join(f"{s}:{i}" for s, i in zip(pieces, ids[-1].tolist())))

    # 2. T5
    text = encode_text(pipe, prompts, L)                                             # (B, L, text_embed_dim)
    p.stage("T5 encoder", f"{where(encode_text)} -> text_encoder.py:T5Encoder.forward",
            f"{pipe.text_encoder.config.num_layers} T5 layers, no attention mask: the <pad> outputs are part of the "
            "conditioning (CogVideoX was trained that way)")
    p.shape("text", text, f"(B, L, text_embed_dim = {cfg.text_embed_dim})")

    # 3. Noise and schedule
    lf = (info.num_frames - 1) // info.temporal_compression + 1
    h, w = info.height // info.spatial_compression, info.width // info.spatial_compression
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, lf, cfg.out_channels, h, w), generator=generator).to(pipe.device, pipe.dtype)
    sampler = make_sampler("ddim", pipe.scheduler, steps)
    ts = sampler.timesteps
    p.stage("initial noise and the schedule", "generate.py:make_videos, sampler.py:make_sampler",
            f"{info.num_frames} frames of {info.height}x{info.width} px -> ({info.num_frames} - 1) / "
            f"{info.temporal_compression} + 1 = {lf} latent frames of {h}x{w}, {cfg.out_channels} channels; "
            f"Gaussian noise from seed {seed}")
    p.shape("latents", x, "(1, F, C, h, w)")
    shown = ", ".join(map(str, ts[:3])) + (f", ..., {ts[-1]}" if len(ts) > 3 else "")
    p.line(f"{steps} timestep{'s' * (steps > 1)} {shown}; alpha_bar({ts[0]}) = "
           f"{float(sampler.alpha(ts[0])):.3g} (zero terminal SNR: step 0 sees pure noise, so the model predicts v)")

    # 4. Step 0 written out: the transformer (patchify + RoPE, the timestep, block 0 line by line, back out),
    #    guidance, the DDIM update. It is the loop's body below, with the transformer call explained.
    recorder = AttentionRecorder(model.attention)     # keeps each block's attention at step 0 and at attn_step
    x_in = torch.cat([x, x]) if use_cfg else x                                       # (B, F, C, h, w)
    with patched(model, "attention", recorder):
        pred = explain_transformer(p, tr, x_in, text, ts[0], recorder)               # (B, F, C, h, w)
    guided = guidance(*pred.chunk(2), guidance_scale) if use_cfg else pred            # (1, F, C, h, w)
    if use_cfg:
        uncond, cond = pred.chunk(2)
        p.stage("classifier-free guidance", "sampler.py:guidance (called by sampler.py:denoise)",
                f"uncond + {guidance_scale:g} * (cond - uncond): the batch was [negative; prompt], the prompt's "
                f"difference is pushed {guidance_scale:g}x")
        p.shape("uncond, cond", uncond, "(1, F, C, h, w) each, from out.chunk(2)")
        p.shape("guided", guided, f"(1, F, C, h, w); here |cond - uncond| / |uncond| = "
                f"{((cond - uncond).norm() / uncond.norm()).item():.3f}")
    x = sampler.step(guided, 0, x, generator).to(pipe.dtype)                          # (1, F, C, h, w)
    x0s = {0: sampler.x0.to(pipe.dtype)} if 0 in show_steps else {}                  # x0.png's rows
    t_prev = ts[0] - pipe.scheduler.num_train_timesteps // steps        # the official t - T//N, as Sampler.step
    a, a_prev = float(sampler.alpha(ts[0])), float(sampler.alpha(t_prev))
    p.stage("sampler update (DDIM, step 0)", "sampler.py:Sampler.step -> predict_x0, ddim_step",
            f"x0 = sqrt(a) x - sqrt(1 - a) v, then x_prev = c_x x + c_0 x0 with a = alpha_bar({ts[0]}) = {a:.4f}, "
            f"a_prev = alpha_bar({t_prev}) = {a_prev:.4f}")
    p.shape("x0 estimate", sampler.x0, "(1, F, C, h, w)" + (": at a = 0 it is exactly -v" if a == 0 else ""))
    p.shape("x next", x, "(1, F, C, h, w), the input of step 1")

    # 5. The other steps: sampler.denoise's loop, keeping x0 at show_steps and the attention at attn_step
    for i in range(1, steps):
        x_in = torch.cat([x, x]) if use_cfg else x                                   # (B, F, C, h, w)
        with patched(model, "attention", recorder) if i == attn_step else contextlib.nullcontext():
            pred = tr(x_in, text, torch.full((len(x_in),), ts[i], device=x.device)).float()  # (B, F, C, h, w)
        guided = guidance(*pred.chunk(2), guidance_scale) if use_cfg else pred        # (1, F, C, h, w)
        x = sampler.step(guided, i, x, generator).to(pipe.dtype)
        if i in show_steps:
            x0s[i] = sampler.x0.to(pipe.dtype)
    p.line(f"... then {steps - 1} more steps of the same (sampler.py:denoise); the last goes to a_prev = 1, so the "
           f"last x is its own x0 (x0.png shows steps {', '.join(map(str, show_steps))})")

    # 6. VAE decode, each batch of latent frames printed as the decoder runs it
    p.stage("VAE decode", f"{where(decode_latents)} -> vae.py:CogVideoXVAE.decode, run_in_frame_batches",
            f"latents / scaling_factor ({pipe.vae.config.scaling_factor}), channels first, then the causal decoder "
            f"once per batch of {vae.LATENT_FRAMES_PER_BATCH} latent frames (each batch below), the remainder joining "
            "the first (a cache carries the convolutions' context from batch to batch)")
    p.shape("final latents", x, "(1, F, C, h, w)")
    with pipe.vae.decoder.register_forward_hook(p.hook("decoder batch", "(1, C, frames, h, w)",
                                                       "(1, 3, frames, H, W) in [-1, 1]")):
        frames = decode_latents(pipe, x, tiled=False)                                 # (1, F, 3, H, W)
    p.shape("frames", frames, "(1, frames, 3, H, W) in [0, 1], what generate() returns")
    video = uint8_frames(frames[0])                                                   # (F, H, W, 3) uint8
    read = shapes.classify(video)
    p.stage("what the evaluator reads", "shapes.py:classify", f"from pixels only: colour {read.colour}, shape "
            f"{read.shape}, motion {read.motion}, background {read.background}")

    # 7. Pictures
    x0_png, attn_png = os.path.join(out, "x0.png"), os.path.join(out, "attention.png")
    save_png(x0_png, x0_picture(pipe, x0s, ts, f"{prompt!r}, seed {seed}, guidance {guidance_scale:g}"))
    probs = recorder.maps[-cfg.num_layers:][attn_block][-1, attn_head]               # (S, S), the prompt's row
    chosen = f"block {attn_block}, head {attn_head}, step {attn_step} (t = {ts[attn_step]}), prompt branch"
    grid = (lf, h // cfg.patch_size, w // cfg.patch_size)                             # (F, Hp, Wp) video tokens
    picture, share = attention_picture(probs, video, pieces, grid, info.temporal_compression, chosen)
    save_png(attn_png, picture)
    p.stage("pictures", f"written to {out}/", f"x0.png: x0 decoded at steps {show_steps} (rows) x frames (columns); "
            f"attention.png: {chosen}, video tokens -> each text token")
    order = share.argsort(descending=True)[:4].tolist()
    p.line("largest shares of the video tokens' attention among the text tokens: "
           + ", ".join(f"{pieces[j]} {100 * share[j]:.1f}%" for j in order)
           + f" (all text together: {100 * share.sum():.1f}%, the rest goes to video tokens)")
    return {"shapes": p.shapes, "frames": frames, "pngs": [x0_png, attn_png], "attention": share, "pieces": pieces}


def main(argv=None) -> dict:
    ap = cli.ArgumentParser(description="A guided tour through one CogVideoX generation on the demo model.")
    ap.add_argument("--model", default=None, help="a snapshot folder (default: the bundled demo model)")
    ap.add_argument("--prompt", default=PROMPT, help="what the video shows")
    ap.add_argument("--out", default="tour", help="folder for x0.png and attention.png: new, empty, or one tour.py "
                                                   "wrote (other files in it are left alone)")
    ap.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps")
    ap.add_argument("--guidance", type=cli.nonnegative_float, default=6.0, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=cli.seed, default=42, help="the same seed gives generate.py's video")
    ap.add_argument("--show-steps", type=int, nargs="+", default=None,
                    help="the steps whose x0 prediction x0.png shows, counted from 0 (negative: from the end; "
                         f"default: {' '.join(map(str, SHOW_STEPS))} below --steps, and the last step)")
    ap.add_argument("--attn-step", type=int, default=None,
                    help="the step attention.png shows, counted from 0 (default: the middle one, --steps / 2)")
    ap.add_argument("--attn-block", type=int, default=-1, help="the block attention.png shows (-1: the last)")
    ap.add_argument("--attn-head", type=int, default=0, help="the head attention.png shows (default: 0)")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    info = read_model_info(resolve_model_path(args.model))  # configs only: every value is checked before loading
    check_choices(info.transformer, args.steps, args.show_steps, args.attn_step, args.attn_block, args.attn_head,
                  flags=True)
    cli.check_folder(args.out, "--out", exact=False, parts=PICTURES)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline(info)
    print(f"loaded {os.path.relpath(info.path)} in {time.perf_counter() - t0:.1f} s  --  {where(load_pipeline)}")
    result = tour(pipe, args.prompt, args.out, args.steps, args.guidance, args.seed, args.show_steps,
                  args.attn_step, args.attn_block, args.attn_head)
    print(f"\ntour done in {time.perf_counter() - t0:.1f} s; pictures: {', '.join(result['pngs'])}")
    return result


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
