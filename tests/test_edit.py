"""edit.py and sampler.invert: DDIM inversion and the official ddim_inversion.py edit, against diffusers.

Oracles: diffusers' DDIMInverseScheduler, built from the snapshot's scheduler config as the official tool builds it,
for the inversion step; for the whole edit, the official flow re-run here with the peer's pipeline and transformer
(CFG-doubled inversion with the empty prompt, then fresh noise + reference keys/values), with an attention processor
written in this file from the spec (official-repo-and-sat.md section 3)."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edit as E
import model as M
import sampler as S
from generate import encode_text, load_pipeline, model_info
from tiny import MAX_TEXT
from vae import VAEConfig

PROMPT, SOURCE = "a blue circle moving right on a black background", "a red circle moving right on a black background"



def latents(family, seed=1):
    frames = 4 if family == "1.5" else 3  # 1.5 patches 2 latent frames at once
    return torch.randn(1, frames, 4, 4, 4, generator=torch.Generator().manual_seed(seed))  # (B, F, C, h, w)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- the inversion step and loop

def test_invert_matches_ddim_inverse_scheduler(snapshots):
    """Our inversion trajectory equals the one diffusers' DDIMInverseScheduler gives, same model, same config."""
    from diffusers import CogVideoXDDIMScheduler, DDIMInverseScheduler
    pipe = load_pipeline(snapshots("5b"))
    text = encode_text(pipe, [SOURCE], MAX_TEXT)
    net = lambda x, t: pipe.transformer(x, text, t)
    z = latents("5b")
    inverse = DDIMInverseScheduler(**CogVideoXDDIMScheduler.from_pretrained(snapshots("5b"), subfolder="scheduler").config)
    inverse.set_timesteps(10)
    x, ref = z, []
    for t in inverse.timesteps:
        x = inverse.step(net(x, t.expand(1)).float(), t, x, return_dict=False)[0]
        ref.append(x)
    sampler = S.make_sampler("ddim", pipe.scheduler, 10)
    assert [int(t) for t in inverse.timesteps] == sampler.timesteps[::-1]
    ours = S.invert(net, z, sampler, progress=False)
    errs = [rel(o, r) for o, r in zip(ours[::-1], ref)]
    assert max(errs) < 1e-5, errs  # the peer keeps ᾱ in float32, we in float64


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_inverse_step_matches_peer_step(prediction_type):
    """One step at every index, every prediction type, a non-trailing schedule and ᾱ_-1 = ᾱ_0 (set_alpha_to_one False)."""
    from diffusers import DDIMInverseScheduler
    config = S.SchedulerConfig(prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1,
                               set_alpha_to_one=False, clip_sample=False, snr_shift_scale=1.0)
    peer = DDIMInverseScheduler(**{k: v for k, v in dataclasses.asdict(config).items() if k != "snr_shift_scale"})
    peer.alphas_cumprod = S.alphas_cumprod(config)  # compare the steps: the peer's float32 table differs by <= 5e-7
    peer.initial_alpha_cumprod = peer.alphas_cumprod[0]
    peer.set_timesteps(7)
    sampler = S.make_sampler("ddim", config, 7)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(reversed(sampler.timesteps)):
        x, out = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
        ours = sampler.invert_step(out, len(sampler.timesteps) - 1 - i, x)
        assert rel(ours, peer.step(out, int(peer.timesteps[i]), x, return_dict=False)[0]) < 1e-6


def test_invert_refuses_dpm():
    sampler = S.make_sampler("dpm", S.PRESETS["cogvideox-5b"], 4)
    with pytest.raises(ValueError, match="DDIM"):
        S.invert(lambda x, t: x, torch.zeros(1, 1, 1, 1, 1), sampler, progress=False)


def test_invert_then_denoise_returns_to_the_input(snapshots):
    """Acceptance: invert, then denoise from the inverted latent with the same prompt at guidance 1. The error is that of
    evaluating each step at the far end, first order in the step size: measured 0.283 at 10 steps, 0.069 at 50
    (relative L2 on the latents)."""
    pipe = load_pipeline(snapshots("5b"))
    text = encode_text(pipe, [SOURCE], MAX_TEXT)
    net = lambda x, t: pipe.transformer(x, text, t)
    z = latents("5b")
    errs = {}
    for steps, tol in ((10, 0.35), (50, 0.09)):
        sampler = S.make_sampler("ddim", pipe.scheduler, steps)
        trajectory = S.invert(net, z, sampler, progress=False)
        assert rel(trajectory[0], z) > 0.5  # fully inverted: far from the input (measured 0.91)
        errs[steps] = rel(S.denoise(net, trajectory[0], sampler, progress=False), z)
        assert errs[steps] < tol, errs
    print("\ninvert -> denoise relative error:", errs)
    assert errs[50] < errs[10] / 3  # shrinks ~ 1/steps


# ---- attention injection

def test_reference_attention_with_itself_as_reference_changes_nothing(snapshots):
    """Attending to [k; k] instead of k duplicates every key, which leaves the softmax unchanged; and the hook is put
    back afterwards, also after an exception."""
    pipe = load_pipeline(snapshots("5b"))
    text = encode_text(pipe, [SOURCE, PROMPT], MAX_TEXT)
    x, t = torch.cat([latents("5b", 1), latents("5b", 2)]), torch.tensor([500, 500])
    plain, hook = pipe.transformer(x, text, t), M.attention
    with E.reference_attention():
        injected = pipe.transformer(torch.cat([x, x]), torch.cat([text, text]), torch.cat([t, t]))
    assert rel(injected[:2], plain) < 1e-5 and rel(injected[2:], plain) < 1e-5
    with pytest.raises(RuntimeError):
        with E.reference_attention():
            raise RuntimeError
    assert M.attention is hook


class InjectionProcessor:
    """The official injection written for diffusers' Attention from the spec: the batch is [main; reference]; main
    queries attend to [main text+video; reference text+video], RoPE applied to each video segment; the reference
    attends to itself."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        L = encoder_hidden_states.shape[1]
        s = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, S_, _ = s.shape

        def heads(y):
            return y.view(B, S_, attn.heads, -1).transpose(1, 2)
        q, k, v = attn.norm_q(heads(attn.to_q(s))), attn.norm_k(heads(attn.to_k(s))), heads(attn.to_v(s))
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :L], apply_rotary_emb(q[:, :, L:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :L], apply_rotary_emb(k[:, :, L:], image_rotary_emb)], dim=2)
        (qm, qr), (km, kr), (vm, vr) = q.chunk(2), k.chunk(2), v.chunk(2)
        o = torch.cat([F.scaled_dot_product_attention(qm, torch.cat([km, kr], 2), torch.cat([vm, vr], 2)),
                       F.scaled_dot_product_attention(qr, kr, vr)])
        o = attn.to_out[0](o.transpose(1, 2).reshape(B, S_, -1))
        return o[:, L:], o[:, :L]


def official_edit(path, z, noise, prompt, steps, guidance, method):
    """The official ddim_inversion.py flow with the peer's pipeline (inject), or its plain variant (#783)."""
    from diffusers import CogVideoXPipeline, DDIMInverseScheduler
    from diffusers.utils import logging
    logging.set_verbosity_error()
    pipe = CogVideoXPipeline.from_pretrained(path)
    cfg = guidance > 1
    rope = None
    if pipe.transformer.config.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(z.shape[3] * 8, z.shape[4] * 8, z.shape[1], "cpu")

    def run(x, text, t, refs=None):
        x = torch.cat([x, x]) if cfg else x
        if refs is not None:
            x, text = torch.cat([x, torch.cat([refs] * (2 if cfg else 1))]), torch.cat([text, text])
        out = pipe.transformer(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(len(x)),
                               image_rotary_emb=rope, return_dict=False)[0].float()
        out = out[:len(out) // 2] if refs is not None else out
        return out.chunk(2)[0] + guidance * (out.chunk(2)[1] - out.chunk(2)[0]) if cfg else out

    def embed(p):
        pos, neg = pipe.encode_prompt(p, "", cfg, max_sequence_length=MAX_TEXT)
        return torch.cat([neg, pos]) if cfg else pos

    inverse = DDIMInverseScheduler(**pipe.scheduler.config)
    inverse.set_timesteps(steps)
    empty, text = embed(""), embed(prompt)
    x, trajectory = z, []
    for t in inverse.timesteps:  # the official inversion: guidance over two empty prompts
        x = inverse.step(run(x, empty, t), t, x, return_dict=False)[0]
        trajectory.append(x)
    pipe.scheduler.set_timesteps(steps)
    if method == "plain":
        x = trajectory[-1]
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(run(x, text, t), t, x, return_dict=False)[0]
        return x
    pipe.transformer.set_attn_processor(InjectionProcessor())
    x = noise
    for t, ref in zip(pipe.scheduler.timesteps, reversed(trajectory)):
        x = pipe.scheduler.step(run(x, text, t, ref), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("family,method,guidance", [("5b", "inject", 6.0), ("1.5", "inject", 1.0),
                                                    ("5b", "plain", 6.0)])
def test_edit_latents_matches_official_flow(snapshots, family, method, guidance):
    path = snapshots(family)
    pipe = load_pipeline(path)
    z = latents(family)
    ours = E.edit_latents(pipe, z, PROMPT, method=method, num_inference_steps=6, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(3), max_sequence_length=MAX_TEXT, progress=False)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    ref = official_edit(path, z, noise, PROMPT, 6, guidance, method)
    print(f"\n{family} {method} guidance {guidance}: relative difference to the official flow {rel(ours, ref):.2e}")
    assert rel(ours, ref) < 1e-5, rel(ours, ref)
    assert rel(ours, z) > 0.1 and rel(ours, noise) > 0.1  # neither the input nor the start: something happened


# ---- the video-level API and the command line

def test_check_edit_names_unsupported_variants(tmp_path):
    def info(preset):
        return model_info(str(tmp_path), M.PRESETS[preset], VAEConfig())
    for preset in ("cogvideox-5b", "cogvideox1.5-5b"):
        for method in E.METHODS:
            E.check_edit(info(preset), method)
    E.check_edit(info("cogvideox-2b"), "plain")
    with pytest.raises(ValueError, match="no RoPE.*--method plain"):
        E.check_edit(info("cogvideox-2b"), "inject")
    for preset in ("cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"):
        with pytest.raises(ValueError, match="image-to-video"):
            E.check_edit(info(preset), "plain")
    with pytest.raises(ValueError, match="'p2p' is unknown"):
        E.check_edit(info("cogvideox-5b"), "p2p")


def clip(num_frames):
    from shapes import ClipConfig, caption, make_clips, parse_caption
    videos, _ = make_clips(1, 0, [parse_caption(SOURCE)], ClipConfig(num_frames=num_frames, height=32, width=32,
                                                                      size=(6.0, 7.0), speed=(1.0, 1.0)))
    return torch.from_numpy(videos[0]).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W) in [0, 1]


def test_edit_video_pads_v15_and_is_deterministic(snapshots):
    pipe = load_pipeline(snapshots("1.5"))  # 17 frames -> 5 latent frames: one repeated in front, dropped after
    video = clip(19)
    a = E.edit(pipe, video, PROMPT, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=MAX_TEXT,
               progress=False)
    b = E.edit(pipe, video, PROMPT, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=MAX_TEXT,
               progress=False)
    assert a.shape == (1, 17, 3, 32, 32) and torch.equal(a, b) and a.std() > 0.01
    with pytest.raises(ValueError, match="fewer than num_frames=33"):
        E.edit(pipe, video, PROMPT, num_frames=33)


def test_offload_blocks_edits_the_same(snapshots):
    """edit.py streams the blocks through the same on_device as generate.py: with offload="blocks" the inject method
    (reference attention swapped in around the streamed blocks) gives the frames of a run without offload, bit for
    bit."""
    path, video = snapshots("5b"), clip(9)
    kw = dict(num_inference_steps=3, guidance_scale=2.0, max_sequence_length=MAX_TEXT, progress=False)
    assert torch.equal(E.edit(load_pipeline(path), video, PROMPT, **kw),
                       E.edit(load_pipeline(path, offload="blocks"), video, PROMPT, **kw))


def test_cli(snapshots, tmp_path, capsys):
    import imageio
    src = tmp_path / "in.mp4"
    imageio.mimwrite(src, list((clip(9).permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()), fps=8, format="FFMPEG")
    out = tmp_path / "out.gif"
    assert E.main(["--model", snapshots("5b"), "--video", str(src), "--prompt", PROMPT, "--steps", "2",
                   "--output", str(out)]) == 0
    assert out.exists() and (tmp_path / "out.png").exists()
    assert E.main(["--model", snapshots("5b"), "--video", str(tmp_path / "missing.mp4"), "--prompt", PROMPT]) == 2
    assert "missing.mp4: file not found" in capsys.readouterr().err


def test_edit_encodes_like_the_peer_vae(snapshots, monkeypatch):
    """The latent edit() inverts is the peer's posterior draw times the peer config's scaling_factor, same seed:
    diffusers' AutoencoderKLCogVideoX on the same snapshot, latent_dist.sample(generator) * scaling_factor."""
    from diffusers import AutoencoderKLCogVideoX
    path = snapshots("5b")
    pipe = load_pipeline(path)
    video = clip(9)  # 32x32: the model's size, so resize leaves it as it is
    seen = {}

    def capture(pipe, z, prompt, **kw):
        seen["z"] = z.clone()
        return z
    monkeypatch.setattr(E, "edit_latents", capture)
    E.edit(pipe, video, PROMPT, num_inference_steps=2, seed=5, height=32, width=32, max_sequence_length=MAX_TEXT,
           progress=False)
    peer = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae").eval()
    sf = peer.config.scaling_factor
    assert sf != 1.0
    with torch.no_grad():
        pixels = video.permute(1, 0, 2, 3)[None] * 2 - 1                               # (1, 3, F, H, W) in [-1, 1]
        ref = peer.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(5)) * sf
    ref = ref.permute(0, 2, 1, 3, 4)                                                     # (1, F', C, h, w)
    z = seen["z"]
    assert z.shape == ref.shape == (1, 3, 4, 4, 4), (z.shape, ref.shape)
    err = rel(z, ref)
    assert err < 1e-5, f"edit's latent vs the peer's encode * scaling_factor ({sf}): relative error {err:.3g}"


def test_edit_frames_takes_the_longest_valid_prefix(tmp_path):
    """Found by mutation testing (bench/MUTANTS.md): without --num-frames an edit takes the longest frame count the
    model accepts (1 + a multiple of frame_multiple) that the video has and that is not above the model's default."""
    for preset in ("cogvideox-5b", "cogvideox1.5-5b"):
        info = model_info(str(tmp_path), M.PRESETS[preset], VAEConfig())
        for available in range(info.frame_multiple + 1, info.num_frames + 3 * info.frame_multiple):
            want = max(n for n in range(1, min(available, info.num_frames) + 1) if (n - 1) % info.frame_multiple == 0)
            assert E.edit_frames(info, available, None) == want, (preset, available)
