"""Edit a video with a new prompt by DDIM inversion: the method of the official `inference/ddim_inversion.py`.

    python edit.py --model CogVideoX-5b --video in.mp4 --prompt "a white car driving through snow"
    python edit.py --video red.mp4 --prompt "a blue circle moving right on a black background" --method plain

The flow: `plan_edit()` checks the request before any weight is read (generate.plan: the video, its frames and size,
DDIM over the whole schedule); `edit_video()` encodes the video to clean latents (a VAE posterior sample), then, top
to bottom in `invert_and_denoise()`: DDIM inversion with an empty prompt (sampler.invert), keeping the latent of every
noise level -> a second DDIM run with the new prompt, one of:
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
from generate import Request, add_video_arguments, peak_memory_gb, plan, prologue
from media import read_video, resize, save_video
from offload import on_device
from pipeline import Pipeline, decode_latents, encode_frames, encode_text, load_pipeline, pad_front
from sampler import Sampler, denoise, invert, make_sampler

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
    """Clean latents z (B, F, C, h, w) (scaled, F already a multiple of patch_size_t) -> edited latents: the method
    checked and the DDIM schedule built, then invert_and_denoise."""
    check_edit(pipe.info, method)
    L = pipe.info.max_text_seq_length if max_sequence_length is None else max_sequence_length
    schedule = make_sampler("ddim", pipe.scheduler, num_inference_steps)
    return invert_and_denoise(pipe, z, prompt, schedule, method=method, source_prompt=source_prompt,
                              negative_prompt=negative_prompt, guidance_scale=guidance_scale, generator=generator,
                              text_length=L, progress=progress)


@torch.no_grad()
def invert_and_denoise(pipe: Pipeline, z: torch.Tensor, prompt: str, schedule: Sampler, *, method: str,
                       source_prompt: str, negative_prompt: str, guidance_scale: float,
                       generator: torch.Generator | None, text_length: int, progress: bool) -> torch.Tensor:
    """The edit of clean latents z (B, F, C, h, w) along a DDIM schedule, the method already checked.

    The inversion runs without guidance: the official tool passes its guidance scale but gives both branches the empty
    prompt, where guidance changes nothing. `source_prompt` (default "", the official choice) conditions the
    inversion; `generator` draws the fresh noise of `inject`."""
    B = z.shape[0]
    source = encode_text(pipe, [source_prompt], text_length).expand(B, -1, -1)        # (B, L, D)
    cfg = guidance_scale > 1
    text = encode_text(pipe, [negative_prompt, prompt] if cfg else [prompt], text_length).repeat_interleave(B, dim=0)

    with on_device(pipe, pipe.transformer) as transformer:                            # text: (B', L, D)
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


def edit_frames(info, available: int) -> int:
    """The frame count an edit takes without num_frames: the first min(available, the model's default) frames,
    trimmed to a count the model takes."""
    return (min(available, info.num_frames) - 1) // info.frame_multiple * info.frame_multiple + 1


def plan_edit(info, video, prompt: str, *, method: str = "inject", negative_prompt: str = "",
              num_frames: int | None = None, height: int | None = None, width: int | None = None,
              num_inference_steps: int = 50, guidance_scale: float = 6.0, seed: int = 42,
              max_sequence_length: int | None = None, vae_tiling: bool = False, output: str | None = None) -> Request:
    """edit()'s arguments checked before any weight is read: the method, then generate.plan with the video and DDIM
    over the whole schedule. video: a path (read here) or an (F, 3, H, W) tensor in [0, 1]."""
    check_edit(info, method)
    video = read_video(video) if isinstance(video, (str, os.PathLike)) else video
    return plan(info, prompt, negative_prompt=negative_prompt,
                num_frames=edit_frames(info, len(video)) if num_frames is None else num_frames, height=height,
                width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler="ddim",
                seed=seed, video=video, strength=1.0, max_sequence_length=max_sequence_length, vae_tiling=vae_tiling,
                output=output)


@torch.no_grad()
def edit_video(pipe: Pipeline, request: Request, *, method: str, source_prompt: str,
               progress: bool = True) -> torch.Tensor:
    """A planned edit -> frames (1, F, 3, H, W) in [0, 1]. method: the one plan_edit checked."""
    job = request.jobs[0]
    generator = torch.Generator().manual_seed(job.seed)  # the posterior sample first, then the noise, as generate()
    z = encode_frames(pipe, resize(request.video, request.height, request.width)[None], generator, request.tiled)
    z, pad = pad_front(z, pipe.transformer.config.patch_size_t)                       # (1, F, C, h, w)
    z = invert_and_denoise(pipe, z, job.prompts[0], request.sampler, method=method, source_prompt=source_prompt,
                           negative_prompt=job.negatives[0], guidance_scale=request.guidance_scale,
                           generator=generator, text_length=request.text_length, progress=progress)
    return decode_latents(pipe, z[:, pad:], request.tiled)


def edit(pipe: Pipeline, video, prompt: str, *, method: str = "inject", source_prompt: str = "",
         negative_prompt: str = "", num_frames: int | None = None, height: int | None = None, width: int | None = None,
         num_inference_steps: int = 50, guidance_scale: float = 6.0, seed: int = 42,
         max_sequence_length: int | None = None, vae_tiling: bool = False, progress: bool = True) -> torch.Tensor:
    """Edit one video: a path or an (F, 3, H, W) tensor in [0, 1]. Returns frames (1, F, 3, H, W) in [0, 1].
    Without num_frames, the first min(len(video), the model's default) frames, trimmed to a valid count."""
    request = plan_edit(pipe.info, video, prompt, method=method, negative_prompt=negative_prompt,
                        num_frames=num_frames, height=height, width=width, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, seed=seed, max_sequence_length=max_sequence_length,
                        vae_tiling=vae_tiling)
    return edit_video(pipe, request, method=method, source_prompt=source_prompt, progress=progress)


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
    # Everything is checked before any weight is read, once (plan_edit).
    info, device, dtype = prologue(args)
    request = plan_edit(info, cli.existing_path("--video", args.video, "file"), args.prompt, method=args.method,
                        negative_prompt=args.negative_prompt, num_frames=args.num_frames, height=args.height,
                        width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                        seed=args.seed, vae_tiling=args.vae_tiling, output=args.output)

    t0 = time.perf_counter()
    pipe = load_pipeline(info, dtype=dtype, device=device, offload=args.offload)
    t1 = time.perf_counter()
    frames = edit_video(pipe, request, method=args.method, source_prompt=args.source_prompt)
    t2 = time.perf_counter()
    [(out, named)] = request.jobs[0].outputs
    written = save_video(frames[0], out, args.fps or info.fps, named)
    print(f"wrote {', '.join(written)}")
    print(f"load {t1 - t0:.1f}s, edit {t2 - t1:.1f}s, peak memory {peak_memory_gb(pipe.device):.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
