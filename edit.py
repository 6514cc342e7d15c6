"""Edit a video with a new prompt by DDIM inversion: the method of the official `inference/ddim_inversion.py`.

    python edit.py --model CogVideoX-5b --video in.mp4 --prompt "a white car driving through snow"
    python edit.py --video red.mp4 --prompt "a blue circle moving right on a black background" --method plain

The flow, top to bottom in `edit_latents()`: clean latents (VAE posterior sample) -> DDIM inversion with an empty
prompt (sampler.invert), keeping the latent of every noise level -> a second DDIM run with the new prompt, one of:
  inject (the official method): start from *fresh* noise; at every step the inverted latent of that noise level is
    run through the transformer beside the edited one, and in every attention layer the edited tokens attend to
    [their own keys; the reference's keys] (values alike), so layout and motion come from the reference while the
    prompt decides the content. The reference's output is thrown away: it is re-read from the trajectory each step.
  plain: denoise from the fully inverted latent (the alternative of zai-org/CogVideo#783). With the inversion's prompt
    and no guidance this comes back to the input, up to an error that shrinks with the step count; a new prompt pulls
    it away.
Supported: the text-to-video models. `inject` needs the RoPE ones (CogVideoX-5b, CogVideoX1.5-5B), as the official tool
(it refuses CogVideoX-2b); image-to-video checkpoints are refused (they need a first-frame condition).

Legend: B batch, F latent frames, C channels, h/w latent height/width, q/k/v (B, heads, S, head_dim), S = L + N tokens.
"""
import os
import sys
import time

import torch

import cli
import model
from generate import (Pipeline, add_video_arguments, check_request, check_video_output, decode_latents,
                      encode_frames, encode_text, load_pipeline, pad_front, peak_memory_gb, prologue, read_video,
                      resize, save_video, worth_tiling)
from offload import on_device
from sampler import denoise, invert, make_sampler

METHODS = ("inject", "plain")


def check_edit(info, method: str) -> None:
    """Refuse what the method cannot do, before any weights are read."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown, use one of {METHODS}")
    if info.is_i2v:
        raise ValueError(f"{info.path} is an image-to-video model; editing needs a text-to-video one "
                         f"(CogVideoX-5b, CogVideoX1.5-5B)")
    if method == "inject" and not info.transformer.use_rotary_positional_embeddings:
        raise ValueError(f"{info.path} has no RoPE (CogVideoX-2b); the official inject method supports CogVideoX-5b "
                         f"and CogVideoX1.5-5B only: use --method plain")


class reference_attention:
    """While active, the second half of every transformer batch is a reference: in every attention layer the first
    half attends to its own keys/values and the reference's, concatenated along the sequence; the reference half
    attends to itself. It swaps model.attention, the hook every layer calls with q, k, v already normalised and
    rotated: each half got the same RoPE table, which is the official "RoPE on each video segment of the keys"."""

    def __enter__(self):
        self.inner = model.attention
        model.attention = self.attend
        return self

    def __exit__(self, *exc):
        model.attention = self.inner

    def attend(self, q, k, v):
        (q, q_ref), (k, k_ref), (v, v_ref) = q.chunk(2), k.chunk(2), v.chunk(2)
        out = self.inner(q, torch.cat([k, k_ref], dim=2), torch.cat([v, v_ref], dim=2))  # (B, h, S, d) from 2S keys
        return torch.cat([out, self.inner(q_ref, k_ref, v_ref)])                             # (2B, h, S, d)


@torch.no_grad()
def edit_latents(pipe: Pipeline, z: torch.Tensor, prompt: str, *, method: str = "inject", source_prompt: str = "",
                 negative_prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 generator: torch.Generator | None = None, max_sequence_length: int | None = None,
                 progress: bool = True) -> torch.Tensor:
    """Clean latents z (B, F, C, h, w) (scaled, F already a multiple of patch_size_t) -> edited latents.

    The inversion runs without guidance: the official tool passes its guidance scale but gives both branches the empty
    prompt, where guidance changes nothing. `source_prompt` (default "", the official choice) conditions the
    inversion; `generator` draws the fresh noise of `inject`."""
    check_edit(pipe.info, method)
    L = pipe.info.max_text_seq_length if max_sequence_length is None else max_sequence_length
    B = z.shape[0]
    schedule = make_sampler("ddim", pipe.scheduler, num_inference_steps)
    source = encode_text(pipe, [source_prompt], L).expand(B, -1, -1)                  # (B, L, D)
    cfg = guidance_scale > 1
    text = encode_text(pipe, [negative_prompt, prompt] if cfg else [prompt], L).repeat_interleave(B, dim=0)  # (B', L, D)

    with on_device(pipe, pipe.transformer) as transformer:
        trajectory = invert(lambda x, t: transformer(x, source, t), z, schedule, progress=progress)
        if method == "plain":
            return denoise(lambda x, t: transformer(x, text, t), trajectory[0], schedule,
                           guidance_scale=guidance_scale, progress=progress)

        reference = dict(zip(schedule.timesteps, trajectory))                        # noise level -> inverted latent

        def net(x, t):                                                                # x (B', F, C, h, w), B' = [2]B
            ref = reference[int(t[0])].repeat(len(x) // B, 1, 1, 1, 1)               # one copy per guidance branch
            out = transformer(torch.cat([x, ref]), torch.cat([text, text]), torch.cat([t, t]))  # (2B', F, C, h, w)
            return out[:len(x)]

        noise = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
        with reference_attention():
            return denoise(net, noise, schedule, guidance_scale=guidance_scale, progress=progress)


@torch.no_grad()
def edit(pipe: Pipeline, video, prompt: str, *, method: str = "inject", source_prompt: str = "",
         negative_prompt: str = "", num_frames: int | None = None, height: int | None = None, width: int | None = None,
         num_inference_steps: int = 50, guidance_scale: float = 6.0, seed: int = 42,
         max_sequence_length: int | None = None,
         vae_tiling: bool = False, progress: bool = True) -> torch.Tensor:
    """Edit one video: a path or an (F, 3, H, W) tensor in [0, 1]. Returns frames (1, F, 3, H, W) in [0, 1].
    Without num_frames, the first min(len(video), the model's default) frames, trimmed to a valid count."""
    info = pipe.info
    check_edit(info, method)
    video = read_video(video) if isinstance(video, (str, os.PathLike)) else torch.as_tensor(video).float()
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be a path or an (F, 3, H, W) tensor, got shape {tuple(video.shape)}")
    height = info.height if height is None else height
    width = info.width if width is None else width
    num_frames = edit_frames(info, len(video), num_frames)
    check_request(info, num_frames, height, width)

    generator = torch.Generator().manual_seed(seed)      # the posterior sample first, then the noise, as generate()
    tiled = vae_tiling and worth_tiling(pipe.vae, height, width)
    z = encode_frames(pipe, resize(video[:num_frames], height, width)[None], generator, tiled)  # (1, F, C, h, w)
    z, pad = pad_front(z, pipe.transformer.config.patch_size_t)
    z = edit_latents(pipe, z, prompt, method=method, source_prompt=source_prompt, negative_prompt=negative_prompt,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                     max_sequence_length=max_sequence_length, progress=progress)
    return decode_latents(pipe, z[:, pad:], tiled)


def edit_frames(info, available: int, num_frames: int | None) -> int:
    """The frame count an edit uses: num_frames, else the first min(available, the model's default) frames trimmed to
    a valid count. Checked against the video's length."""
    if num_frames is None:
        num_frames = (min(available, info.num_frames) - 1) // info.frame_multiple * info.frame_multiple + 1
    check_request(info, num_frames, info.height, info.width)  # an invalid count is named before the video's length
    if available < num_frames:
        raise ValueError(f"the video has {available} frames, fewer than num_frames={num_frames}")
    return num_frames


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Edit a video with a new prompt (DDIM inversion, CogVideoX).")
    p.add_argument("--video", required=True, help="the video to edit")
    p.add_argument("--prompt", required=True, help="what the edited video shows")
    p.add_argument("--method", choices=METHODS, default="inject",
                   help="inject: fresh noise + the inverted video's keys/values in attention (official); "
                        "plain: denoise from the inverted latent")
    p.add_argument("--source-prompt", default="", help="the prompt the inversion is conditioned on (official: empty)")
    add_video_arguments(p, output="edited.mp4")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: run_cli(args))


def run_cli(args) -> int:
    # Everything that can be checked is checked before any weights are read.
    info, device, dtype = prologue(args)
    check_edit(info, args.method)
    video = read_video(cli.existing_path("--video", args.video, "file"))
    num_frames = edit_frames(info, len(video), args.num_frames)
    check_request(info, num_frames, args.height or info.height, args.width or info.width)
    check_video_output(args.output)

    t0 = time.perf_counter()
    pipe = load_pipeline(info, dtype=dtype, device=device, offload=args.offload)
    t1 = time.perf_counter()
    frames = edit(pipe, video, args.prompt, method=args.method, source_prompt=args.source_prompt,
                  negative_prompt=args.negative_prompt, num_frames=num_frames, height=args.height,
                  width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  vae_tiling=args.vae_tiling)
    t2 = time.perf_counter()
    written = save_video(frames[0], args.output, args.fps or info.fps)
    print(f"wrote {', '.join(written)}")
    print(f"load {t1 - t0:.1f}s, edit {t2 - t1:.1f}s, peak memory {peak_memory_gb(pipe.device):.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
