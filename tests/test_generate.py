"""generate.py end to end against the diffusers CogVideoX pipelines, on tiny random snapshots in the official layout.

Parity: our `generate()` and the peer's pipeline, same snapshot, same seed, fp32 CPU, must agree within 1e-4 max abs
on the output frames in [0, 1] (the issue's bound; observed differences are ~1e-6, float32 rounding in a different
operation order)."""
import os
import re
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import media
from generate import generate, load_pipeline
from media import to_uint8
from quantize import Int8Linear, quantize_int8
from tiny import MAX_TEXT

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, NEGATIVE = "a red circle moving right on a black background", "blue square"



def peer_pipeline(path, sampler):
    from diffusers import (CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline,
                           CogVideoXVideoToVideoPipeline)
    from diffusers.utils import logging
    logging.set_verbosity_error()
    cls = {"t2v": CogVideoXPipeline, "i2v": CogVideoXImageToVideoPipeline, "v2v": CogVideoXVideoToVideoPipeline}[sampler[0]]
    pipe = cls.from_pretrained(path)
    if sampler[1] == "dpm":
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peer_frames(path, mode, solver, *, num_videos=1, negative_prompt="", seed=42, **kw):
    pipe = peer_pipeline(path, (mode, solver))
    out = pipe(prompt=[PROMPT] * num_videos, negative_prompt=[negative_prompt] * num_videos,
               generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=MAX_TEXT, **kw)
    return out.frames


def resized_copy(src, dst, vae=(96, 80), transformer=None):
    """A copy of snapshot `src` at `dst` whose configs state other sample sizes (H, W): the VAE's sets its tiles
    (sample / 2, so 96x80 gives 48x40-px tiles, two each way on a 96x80 frame), the transformer's the RoPE base of
    1.5. Sizes only: the weights are the same. -> dst as a string."""
    import json
    import shutil
    shutil.copytree(src, dst)
    for component, size in (("vae", vae), ("transformer", transformer)):
        if size is None:
            continue
        config = os.path.join(dst, component, "config.json")
        with open(config) as f:
            cfg = json.load(f)
        cfg["sample_height"], cfg["sample_width"] = size
        with open(config, "w") as f:
            json.dump(cfg, f)
    return str(dst)


def refused(call, *names, error=ValueError):
    """call() raises `error` whose message names each of `names` (the argument, flag or value refused); -> message."""
    with pytest.raises(error) as e:
        call()
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    return str(e.value)


def configs_only(src, dst):
    """A copy of snapshot `src` at `dst` whose weight files are empty: what refuses a request on it was decided from
    the config files, before any weight was read (reading one fails). -> dst as a string."""
    import shutil
    shutil.copytree(src, dst)
    for base, _, files in os.walk(dst):
        for f in files:
            if f.endswith(".safetensors"):
                open(os.path.join(base, f), "wb").close()
    return str(dst)


def check(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref).abs().max().item()
    assert err <= TOL, err
    assert ref.std() > 0.01  # not a degenerate (constant) video


@pytest.mark.parametrize("family,solver,dynamic,negative,n", [
    ("2b", "ddim", False, NEGATIVE, 2),
    ("2b", "dpm", True, "", 1),
    ("5b", "dpm", False, NEGATIVE, 1),
    ("5b", "ddim", True, "", 2),
])
def test_text_to_video_parity(snapshots, family, solver, dynamic, negative, n):
    path = snapshots(family)
    kw = dict(num_frames=9, height=32, width=48, num_inference_steps=4, guidance_scale=6.0, use_dynamic_cfg=dynamic)
    ref = peer_frames(path, "t2v", solver, num_videos=n, negative_prompt=negative, **kw)
    pipe = load_pipeline(path)
    ours = generate(pipe, PROMPT, negative_prompt=negative, sampler=solver, num_videos=n, max_sequence_length=MAX_TEXT,
                    progress=False, **kw)
    check(ours, ref)
    assert ours.shape == (n, 9, 3, 32, 48)


def test_making_a_snapshot_leaves_the_global_rng_alone(tmp_path):
    """tests/tiny.make_snapshot seeds its own weights; the RNG stream of the test that calls it goes on as if it had
    not: a test draws the same inputs whether the module's `snapshots` made its snapshot now or for an earlier test
    (#38: it used to reseed the global RNG, so a test's inputs depended on which test ran first)."""
    from tiny import make_snapshot
    torch.manual_seed(123)
    want = torch.randn(4)
    torch.manual_seed(123)
    make_snapshot(str(tmp_path / "snap"), "2b")
    assert torch.equal(torch.randn(4), want)


def test_prompt_lists_parity(snapshots):
    """Several prompts with their own negative prompts and 2 videos each, batched as diffusers batches them. (The
    peer's CogVideoX pipelines set num_videos_per_prompt = 1 whatever is passed, so it gets each prompt twice.)"""
    path = snapshots("5b")
    prompts, negatives = [PROMPT, "a blue square moving up"], [NEGATIVE, "green"]
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=6.0)
    peer = peer_pipeline(path, ("t2v", "ddim"))
    twice = lambda xs: [x for x in xs for _ in range(2)]  # noqa: E731
    ref = peer(prompt=twice(prompts), negative_prompt=twice(negatives), output_type="pt",
               generator=torch.Generator().manual_seed(42), max_sequence_length=MAX_TEXT, **kw).frames
    ours = generate(load_pipeline(path), prompts, negative_prompt=negatives, num_videos=2, progress=False, **kw)
    check(ours, ref)
    assert ours.shape == (4, 9, 3, 32, 32) and not torch.equal(ours[0], ours[2])


def test_v15_pads_latent_frames(snapshots):
    path = snapshots("1.5")  # 17 frames -> 5 latent frames, padded to 6 for patch_size_t = 2
    kw = dict(num_frames=17, height=32, width=32, num_inference_steps=3, guidance_scale=4.0)
    ref = peer_frames(path, "t2v", "dpm", **kw)
    ours = generate(load_pipeline(path), PROMPT, sampler="dpm", max_sequence_length=MAX_TEXT, progress=False, **kw)
    check(ours, ref)
    assert ours.shape[1] == 17


@pytest.mark.parametrize("family", ["5b-i2v", "1.5-i2v"])
def test_image_to_video_parity(snapshots, family):
    path = snapshots(family)
    frames = 9 if family == "5b-i2v" else 17
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    kw = dict(num_frames=frames, height=32, width=32, num_inference_steps=3, guidance_scale=5.0)
    ref = peer_frames(path, "i2v", "ddim", image=image[None], **kw)
    ours = generate(load_pipeline(path), PROMPT, image=image, max_sequence_length=MAX_TEXT, progress=False, **kw)
    check(ours, ref)


def test_video_to_video_parity(snapshots):
    path = snapshots("2b")
    video = torch.rand(9, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    kw = dict(height=32, width=48, num_inference_steps=5, guidance_scale=6.0, strength=0.6)
    ref = peer_frames(path, "v2v", "ddim", video=[video], **kw)
    ours = generate(load_pipeline(path), PROMPT, video=video, max_sequence_length=MAX_TEXT, progress=False, **kw)
    check(ours, ref)


def test_offload_gives_identical_output(snapshots):
    path = snapshots("5b")
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=MAX_TEXT, progress=False)
    a = generate(load_pipeline(path), PROMPT, **kw)
    pipe = load_pipeline(path, offload=True)
    b = generate(pipe, PROMPT, **kw)
    assert torch.equal(a, b)
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())


def test_int8_halves_weight_memory_and_stays_close(snapshots):
    path = snapshots("5b")
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_TEXT, progress=False)
    pipe = load_pipeline(path, dtype=torch.bfloat16)
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in pipe.transformer.modules()
                       if isinstance(m, torch.nn.Linear))
    ref = generate(pipe, PROMPT, **kw)
    quantize_int8(pipe.transformer)
    q = [m for m in pipe.transformer.modules() if isinstance(m, Int8Linear)]
    assert q and not any(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    q_bytes = sum(m.weight.numel() * m.weight.element_size() + m.scale.numel() * m.scale.element_size() for m in q)
    # int8 weights + one bf16 scale per output row: just over half the bf16 bytes
    assert 0.5 <= q_bytes / linear_bytes <= 0.56, q_bytes / linear_bytes
    out = generate(pipe, PROMPT, **kw)
    # per-channel int8 rounds each weight to 1/254 of its row's range. On this random model that moves the frames by
    # ~0.006 on average in [0, 1] (measured), the size of bf16's own rounding; a few pixels move more
    diff = (out - ref).abs().float()
    assert diff.mean() < 0.02 and diff.quantile(0.99) < 0.06, (diff.mean(), diff.quantile(0.99))



def test_int8_linear_is_per_channel_symmetric_quantization():
    """Int8Linear against torch's own per-channel quantizer (scale = row absmax / 127, zero point 0, qint8): the same
    int8 values and scales, rows of small weights (|w| << 1) keep their precision, an all-zero row gives zeros (no
    division by 0), and the forward pass is F.linear with the dequantized weight, in the activation's dtype."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 6)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 16, generator=g) * torch.tensor([1e-3, 0.02, 0.5, 3.0, 40.0, 0.0])[:, None])
    q = Int8Linear(linear)
    w = linear.weight.detach()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    ref = torch.quantize_per_channel(w, scale.double(), torch.zeros(6, dtype=torch.long), 0, torch.qint8)
    assert q.weight.dtype == torch.int8 and torch.equal(q.weight, ref.int_repr())
    assert torch.allclose(q.scale[:5], scale[:5], rtol=1e-6, atol=0) and 0 < q.scale[5] <= 1e-12  # row 5: all zeros
    deq = q.weight.float() * q.scale[:, None]
    assert torch.equal(deq[5], torch.zeros(16)) and torch.all((deq - w).abs() <= scale[:, None] / 2 * (1 + 1e-5))
    x = torch.randn(3, 16, generator=g)
    assert torch.equal(q(x), torch.nn.functional.linear(x, deq, linear.bias))
    assert (q.in_features, q.out_features) == (16, 6)


# ---------------------------------------------------------------- the command line


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_writes_mp4_and_contact_sheet(snapshots, tmp_path):
    path = snapshots("2b")
    out = tmp_path / "clip.mp4"
    r = run_cli("--model", path, "--prompt", PROMPT, "--num-frames", "9", "--height", "32", "--width", "48",
                "--steps", "2", "--output", str(out))
    assert r.returncode == 0, r.stderr
    frames = iio.imread(out, index=None)
    assert frames.shape == (9, 32, 48, 3)
    sheet = iio.imread(tmp_path / "clip.png")
    assert sheet.ndim == 3 and sheet.shape[1] > 48 * 8
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "clip.png"]  # no temp files left behind


@pytest.mark.parametrize("bad,message", [
    (["--num-frames", "50"], "num_frames=50"),
    (["--width", "719"], "--width"),
    (["--model", "/nonexistent/CogVideoX-2b"], "/nonexistent/CogVideoX-2b"),
    (["--video", "UNREADABLE"], "junk.png"),
])
def test_cli_bad_input_fails_cleanly(snapshots, tmp_path, bad, message):
    path = snapshots("2b")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    args = ["--model", path, "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "out.mp4")]
    args += [str(junk) if a == "UNREADABLE" else a for a in bad]
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert os.listdir(tmp_path) == ["junk.png"]


def test_cli_unreadable_image(snapshots, tmp_path):
    path = snapshots("5b-i2v")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG broken")
    r = run_cli("--model", path, "--prompt", PROMPT, "--image", str(junk), "--output", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and str(junk) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["junk.png"]


def test_v15_video_to_video_pads_the_odd_latent_count(snapshots):
    # diffusers refuses 1.5 video-to-video (16k+1 frames always give an odd latent count); we pad like I2V training
    path = snapshots("1.5")
    video = torch.rand(17, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    pipe = load_pipeline(path)
    kw = dict(height=32, width=32, num_inference_steps=3, strength=0.5, max_sequence_length=MAX_TEXT, progress=False)
    a = generate(pipe, PROMPT, video=video, **kw)
    assert a.shape == (1, 17, 3, 32, 32)
    assert torch.equal(a, generate(pipe, PROMPT, video=video, **kw))
    assert not torch.equal(a, generate(pipe, PROMPT, video=video.flip(0), **kw))  # the input video matters


# ---------------------------------------------------------------- offload: where each stage lives, and when


def test_offload_moves_each_stage_in_just_for_its_use(snapshots, monkeypatch):
    """Spy on every stage's .to() and on its use: with offload, each stage goes to pipe.device right before it runs and
    back to the CPU right after, one at a time (T5, transformer, VAE), and all three end on the CPU. pipe.device is
    "cpu:0", the CPU under another name, so moves in and out can be told apart without a second device."""
    path = snapshots("5b")
    pipe = load_pipeline(path, offload=True)
    pipe.device = torch.device("cpu", 0)
    events = []
    stages = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "vae": pipe.vae}
    for name, module in stages.items():
        real_to = module.to

        def spy_to(*args, _name=name, _real=real_to, **kw):
            target = args[0] if args else kw.get("device")
            events.append(("to", _name, str(torch.device(target))))
            return _real(*args, **kw)
        monkeypatch.setattr(module, "to", spy_to, raising=False)
    pipe.text_encoder.register_forward_pre_hook(lambda m, a: events.append(("run", "text_encoder")))
    pipe.transformer.register_forward_pre_hook(lambda m, a: events.append(("run", "transformer")))
    real_decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: (events.append(("run", "vae")), real_decode(*a, **k))[1],
                        raising=False)
    generate(pipe, PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=MAX_TEXT,
             progress=False)
    squeezed = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # one "run" per stay on the device
    want = []
    for name in ("text_encoder", "transformer", "vae"):
        want += [("to", name, "cpu:0"), ("run", name), ("to", name, "cpu")]
    assert squeezed == want, squeezed
    for name, module in stages.items():
        assert all(p.device.type == "cpu" for p in module.parameters()), name
    events.clear()
    pipe.offload = None  # as load_pipeline leaves it without offload: the stages stay where they are
    generate(pipe, PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=MAX_TEXT,
             progress=False)
    assert [e for e in events if e[0] == "to"] == [] and ("run", "vae") in events, events


def test_offload_blocks_gives_identical_frames_and_ends_on_the_cpu(snapshots, monkeypatch):
    """offload="blocks": the blocks of T5 and the transformer are streamed (offload.BlockStream, checked block by
    block in tests/test_perf.py), the VAE moves as a stage. Same frames bit for bit, also when the step cache skips (the
    stream is left after block 0), and everything ends on the CPU."""
    from offload import BlockStream
    path = snapshots("5b")
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_TEXT, progress=False)
    plain = load_pipeline(path)
    pipe = load_pipeline(path, offload="blocks")
    assert pipe.offload == "blocks" and load_pipeline(path, offload=True).offload == "model"
    streams = []
    real_enter = BlockStream.__enter__
    monkeypatch.setattr(BlockStream, "__enter__", lambda self: streams.append(self) or real_enter(self))
    assert torch.equal(generate(plain, PROMPT, **kw), generate(pipe, PROMPT, **kw))
    a, b = ({} for _ in range(2))
    assert torch.equal(generate(plain, PROMPT, step_cache=100.0, timings=a, **kw),
                       generate(pipe, PROMPT, step_cache=100.0, timings=b, **kw))
    assert a["evaluations"] == b["evaluations"] == 2  # first and last steps only
    assert [s.model for s in streams] == [pipe.text_encoder, pipe.transformer] * 2  # T5 streams too
    assert pipe.transformer.block_source is None and pipe.text_encoder.block_source is None
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        assert all(t.device.type == "cpu" for t in list(module.parameters()) + list(module.buffers()))
    refused(lambda: load_pipeline(path, offload="block"), "offload", "'block'")


def test_offload_flag(snapshots, tmp_path):
    """--offload alone means "model" (as before), --offload blocks streams the blocks, in generate.py and edit.py;
    generate.py --offload and --offload blocks write the frames of a run without offload."""
    import edit
    import generate as gen
    for parse, required in ((gen.parse_args, ["--prompt", "p"]), (edit.parse_args, ["--video", "v", "--prompt", "p"])):
        got = [parse(required + flags).offload for flags in ([], ["--offload"], ["--offload", "blocks"])]
        assert got == [None, "model", "blocks"]
    path = snapshots("2b")
    want = api_frames(path)
    for flags in (["--offload"], ["--offload", "blocks"]):
        assert np.array_equal(cli_frames(path, tmp_path / flags[-1][2:], "--steps", "2", *flags), want), flags


# ---------------------------------------------------------------- each flag reaches generate()

_CLI_FRAMES = {}  # API frames, computed once per (snapshot, argument)


def api_frames(path, **kw):
    key = (path, tuple(sorted(kw.items())))
    if key not in _CLI_FRAMES:
        pipe = _CLI_FRAMES.setdefault(path, load_pipeline(path))
        kw = dict(dict(num_frames=9, height=32, width=48), **kw)
        _CLI_FRAMES[key] = to_uint8(generate(pipe, PROMPT, num_inference_steps=2, progress=False, **kw)[0])
    return _CLI_FRAMES[key]


@pytest.mark.parametrize("flag,kw", [
    (["--guidance", "2.5"], dict(guidance_scale=2.5)),
    (["--dynamic-cfg"], dict(use_dynamic_cfg=True)),
    (["--sampler", "dpm"], dict(sampler="dpm")),
    (["--sampler", "euler_a"], dict(sampler="euler_a")),
    (["--sampler", "dpm++2m", "--karras"], dict(sampler="dpm++2m", karras=True)),
    (["--negative-prompt", NEGATIVE], dict(negative_prompt=NEGATIVE)),
    (["--seed", "7"], dict(seed=7)),
    (["--num-frames", "17"], dict(num_frames=17)),  # the snapshot's own: 9 frames at 32x32
    (["--height", "48"], dict(height=48)),
], ids=["guidance", "dynamic-cfg", "sampler-dpm", "sampler-euler_a", "karras", "negative-prompt", "seed", "frames",
        "height"])
def test_cli_flag_gives_the_api_frames(snapshots, tmp_path, flag, kw):
    """generate.py FLAG writes exactly the frames generate(..., that argument) returns, and they differ from the
    default's, so a flag the command line dropped would fail here."""
    import generate as gen
    path = snapshots("2b")
    out = tmp_path / "frames"
    assert gen.main(["--model", path, "--prompt", PROMPT, "--num-frames", "9", "--height", "32", "--width", "48",
                     "--steps", "2", "--output", str(out), *flag]) == 0
    want, default = api_frames(path, **kw), api_frames(path)
    png = png_frames(out)  # every PNG written: the frame count is part of the shape compared below
    assert want.shape != default.shape or not np.array_equal(want, default), f"{flag} changes nothing here"
    assert png.shape == want.shape and np.array_equal(png, want), (
        f"{flag}: CLI frames differ from the API's by up to {np.abs(png.astype(int) - want).max()} "
        f"(from the default's by {np.abs(png.astype(int) - default).max()})")


# ---------------------------------------------------------------- README promises, each with a test that can fail


def cli_frames(path, out, *flags, size=("--num-frames", "9", "--height", "32", "--width", "48")):
    """Run generate.main in-process writing PNG frames to `out`; returns them as (F, H, W, 3) uint8."""
    import generate as gen
    assert gen.main(["--model", path, "--prompt", PROMPT, *size, "--output", str(out), *flags]) == 0
    return png_frames(out)


def png_frames(folder):
    """The PNG frames save_video wrote to `folder`, in order, as (F, H, W, 3) uint8."""
    return np.stack([iio.imread(folder / f) for f in sorted(os.listdir(folder)) if f.endswith(".png")])


def test_vae_tiling_through_generate_matches_peer_tiling(snapshots, tmp_path):
    """generate(vae_tiling=True) on a frame that spans two tiles gives the peer pipeline's frames with
    pipe.vae.enable_tiling() (its default tiles: sample size / 2, overlaps 1/6 and 1/5) within TOL, and differs from
    the untiled frames; a frame smaller than the sample size (worth_tiling False) is decoded whole, bit for bit.
    The tiny VAE's sample size is 32x32 (tiles of 2x2 latents do not tile evenly), so the snapshot is copied with
    sample 96x80 in vae/config.json (the size only sets the tiles: same weights), as tests/test_vae.py tiles."""
    from diffusers import CogVideoXPipeline
    import generate as gen
    path = resized_copy(snapshots("5b"), tmp_path / "snap")
    kw = dict(num_frames=9, height=96, width=80, num_inference_steps=2, guidance_scale=6.0)
    pipe = load_pipeline(path)
    # 64x64 spans two 48x40 tiles each way, but is below the sample size: not worth tiling, decoded whole
    assert gen.worth_tiling(pipe.vae.config, 96, 80) and not gen.worth_tiling(pipe.vae.config, 64, 64)
    tiled = generate(pipe, PROMPT, vae_tiling=True, max_sequence_length=MAX_TEXT, progress=False, **kw)
    whole = generate(pipe, PROMPT, max_sequence_length=MAX_TEXT, progress=False, **kw)
    peer = CogVideoXPipeline.from_pretrained(path)
    peer.set_progress_bar_config(disable=True)
    peer.vae.enable_tiling()
    assert (peer.vae.tile_latent_min_height, peer.vae.tile_latent_min_width) == (6, 5)  # 2x2 tiles over 12x10 latents
    ref = peer(prompt=[PROMPT], negative_prompt=[""], generator=torch.Generator().manual_seed(42), output_type="pt",
               max_sequence_length=MAX_TEXT, **kw).frames
    check(tiled, ref)  # observed ~8e-6
    assert (tiled - whole).abs().max() > 0.1, "tiling did not change the frames: vae_tiling never reached the VAE"
    png = cli_frames(path, tmp_path / "frames", "--steps", "2", "--vae-tiling",
                     size=("--num-frames", "9", "--height", "96", "--width", "80"))
    assert np.array_equal(png, to_uint8(tiled[0]))  # the flag reaches generate()
    small = dict(kw, height=64, width=64)
    assert torch.equal(generate(pipe, PROMPT, vae_tiling=True, max_sequence_length=MAX_TEXT, progress=False, **small),
                       generate(pipe, PROMPT, max_sequence_length=MAX_TEXT, progress=False, **small))


@pytest.mark.parametrize("family,sample,want", [
    ("1.5", dict(sample_height=300, sample_width=300, sample_frames=81), (768, 1360, 81, 16)),  # the official 1.5 card
    ("2b", dict(sample_height=60, sample_width=90, sample_frames=49), (480, 720, 49, 8)),      # the official 1.0 card
    ("1.5", dict(sample_height=4, sample_width=6, sample_frames=17), (32, 48, 17, 16)),        # 1.5, not the official
], ids=["official-1.5", "official-1.0", "other-1.5"])
def test_defaults_are_read_from_the_config(snapshots, tmp_path, family, sample, want):
    """The README's defaults (768x1360, 81 frames, 16 fps for 1.5; sample size x 8, 49 frames, 8 fps for 1.0) come
    from the snapshot's config files alone: a folder holding only the transformer's, VAE's and scheduler's config
    files (and the five component folders) is enough, and the frames come from sample_frames. Compared against the
    numbers on the model cards."""
    import json
    import shutil
    from pipeline import read_model_info
    src = snapshots(family)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        os.makedirs(tmp_path / sub)
    for sub in ("transformer", "vae"):
        with open(os.path.join(src, sub, "config.json")) as f:
            cfg = json.load(f)
        if sub == "transformer":
            cfg.update(sample)
        with open(tmp_path / sub / "config.json", "w") as f:
            json.dump(cfg, f)
    shutil.copy(os.path.join(src, "scheduler", "scheduler_config.json"), tmp_path / "scheduler")
    info = read_model_info(str(tmp_path))
    assert (info.height, info.width, info.num_frames, info.fps) == want
    assert info.frame_multiple == (16 if family == "1.5" else 8)


@pytest.mark.parametrize("mode", ["i2v", "v2v"])
def test_num_videos_with_image_and_video_input(snapshots, mode):
    """num_videos=2 with an input image (5b-i2v) or video (5b, strength 0.7) gives the peer pipeline's frames for the
    prompt given twice with the input given twice (its pipelines force num_videos_per_prompt = 1, and draw one
    posterior sample per input, then the noise, from one generator: the same stream as ours), within TOL, and the
    two videos differ (each has its own posterior draw and noise)."""
    g = torch.Generator().manual_seed(5)
    kw = dict(height=32, width=32, num_inference_steps=3, guidance_scale=5.0)
    if mode == "i2v":
        path, image = snapshots("5b-i2v"), torch.rand(3, 32, 32, generator=g)
        ours_in, peer_in = dict(image=image, num_frames=9), dict(image=torch.stack([image, image]), num_frames=9)
    else:
        path, video = snapshots("5b"), torch.rand(9, 3, 32, 32, generator=g)
        ours_in, peer_in = dict(video=video, strength=0.7), dict(video=[video, video], strength=0.7)
    ref = peer_frames(path, mode, "ddim", num_videos=2, **peer_in, **kw)
    ours = generate(load_pipeline(path), PROMPT, num_videos=2, max_sequence_length=MAX_TEXT, progress=False,
                    **ours_in, **kw)
    check(ours, ref)
    assert ours.shape == (2, 9, 3, 32, 32) and (ours[0] - ours[1]).abs().max() > 0.01


def _api_uint8(path, lora=None, lora_scale=1.0, dtype=None, steps=2, **kw):
    from lora import load_lora
    pipe = load_pipeline(path, dtype=dtype)
    if lora is not None:
        load_lora(pipe.transformer, lora, lora_scale)
    return to_uint8(generate(pipe, PROMPT, num_frames=9, height=32, width=48, num_inference_steps=steps,
                             progress=False, **kw)[0])


def test_cli_lora_scale(snapshots, tmp_path):
    """--lora X --lora-scale 0.5 writes exactly the frames of load_lora(pipe.transformer, X, 0.5) then generate(),
    and they differ from scale 1's (a dropped --lora-scale would give those)."""
    from lora import add_lora, lora_state_dict, save_lora
    from model import load_transformer
    path = snapshots("2b")
    model = load_transformer(os.path.join(path, "transformer"))
    torch.manual_seed(0)
    add_lora(model, 2, 2.0)
    for n, p in model.named_parameters():
        if ".lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)  # B is zero at init: a zero LoRA would change nothing
    lora = str(tmp_path / "lora.safetensors")
    save_lora(lora, lora_state_dict(model), 2, 2.0)
    png = cli_frames(path, tmp_path / "frames", "--steps", "2", "--lora", lora, "--lora-scale", "0.5")
    want, full = _api_uint8(path, lora, 0.5), _api_uint8(path, lora, 1.0)
    assert not np.array_equal(want, full), "scale 0.5 and 1 give the same frames here: the test cannot tell"
    assert np.array_equal(png, want), np.abs(png.astype(int) - want).max()
    png = cli_frames(path, tmp_path / "default", "--steps", "2", "--lora", lora)  # no --lora-scale: 1
    assert np.array_equal(png, full), np.abs(png.astype(int) - full).max()


def test_cli_step_cache(snapshots, tmp_path, capsys):
    """--step-cache 0.3 writes exactly generate(..., step_cache=0.3)'s frames, with fewer transformer evaluations than
    steps (timings["evaluations"], and the CLI's own report), and the frames differ from the uncached ones."""
    path = snapshots("2b")
    png = cli_frames(path, tmp_path / "frames", "--steps", "8", "--step-cache", "0.3")
    timings = {}
    want = _api_uint8(path, steps=8, step_cache=0.3, timings=timings)
    assert 1 <= timings["evaluations"] < 8, timings
    assert f"step cache: {timings['evaluations']} transformer evaluations for 8 steps" in capsys.readouterr().out
    assert not np.array_equal(want, _api_uint8(path, steps=8)), "the cache changes nothing here: the test cannot tell"
    assert np.array_equal(png, want), np.abs(png.astype(int) - want).max()


def test_cli_dtype_bf16_on_cpu(snapshots, tmp_path):
    """--dtype bf16 on the CPU writes exactly the frames of load_pipeline(dtype=torch.bfloat16) + generate(), which
    differ from fp32's (the CPU default)."""
    path = snapshots("2b")
    png = cli_frames(path, tmp_path / "frames", "--steps", "2", "--dtype", "bf16", "--device", "cpu")
    want = _api_uint8(path, dtype=torch.bfloat16)
    assert not np.array_equal(want, _api_uint8(path)), "bf16 gives fp32's frames here: the test cannot tell"
    assert np.array_equal(png, want), np.abs(png.astype(int) - want).max()


def test_cli_fps(snapshots, tmp_path):
    """--fps 7.5 writes an mp4 whose container says 7.5 fps (read back with imageio's metadata); without --fps the
    model's fps is used (8 for CogVideoX 1.0)."""
    path = snapshots("2b")
    size = ("--num-frames", "9", "--height", "32", "--width", "32", "--steps", "1")
    import generate as gen
    assert gen.main(["--model", path, "--prompt", PROMPT, *size, "--fps", "7.5", "--output", str(tmp_path / "a.mp4")]) == 0
    assert gen.main(["--model", path, "--prompt", PROMPT, *size, "--output", str(tmp_path / "b.mp4")]) == 0
    assert iio.immeta(tmp_path / "a.mp4")["fps"] == pytest.approx(7.5, abs=1e-6)
    assert iio.immeta(tmp_path / "b.mp4")["fps"] == pytest.approx(8.0, abs=1e-6)


# ---- found by mutation testing (bench/MUTANTS.md) ----------------------------------------------------------------

def test_output_paths_follow_the_documented_names():
    """The names the docstring and README promise: the output itself for one video of one prompt (the only one the
    user named), clip-0007.mp4 for line 7 of a prompt file, clip_0.mp4 ... for several videos, and a folder output
    (trailing slash, PNG frames) gets the same suffixes on the folder name."""
    from generate import output_paths
    assert output_paths("out/clip.mp4", 1) == [("out/clip.mp4", True)]
    assert output_paths("out/clip.mp4", 1, line=7) == [("out/clip-0007.mp4", False)]
    assert output_paths("out/clip.mp4", 2) == [("out/clip_0.mp4", False), ("out/clip_1.mp4", False)]
    assert output_paths("clip.gif", 2, line=12) == [("clip-0012_0.gif", False), ("clip-0012_1.gif", False)]
    assert output_paths("frames_X/", 2) == [("frames_X_0", False), ("frames_X_1", False)]
    assert output_paths("frames/", 1, line=3) == [("frames-0003", False)]


def test_vae_tiling_pays_off_from_the_sample_size_on():
    """--vae-tiling tiles a frame once either side reaches the VAE's sample size (two tiles of half that size)."""
    from pipeline import worth_tiling
    from vae import VAEConfig
    vae = VAEConfig(sample_height=480, sample_width=720)
    assert worth_tiling(vae, 480, 64) and worth_tiling(vae, 64, 720) and worth_tiling(vae, 480, 720)
    assert not worth_tiling(vae, 479, 719)


def test_image_and_video_files_are_read_as_pil_converts_them(tmp_path, monkeypatch):
    """read_image / read_video against the pixels written (PNG and GIF are lossless) and PIL's convert("RGB"), which
    diffusers' load_image applies: RGB, RGBA (alpha dropped), gray and gray + alpha (replicated), 16-bit (/ 65535);
    (3, H, W) and (F, 3, H, W) in [0, 1]; unreadable files and impossible shapes are refused by name."""
    from PIL import Image
    from media import read_image, read_video
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    for name, pixels in [("rgb", rgba[..., :3]), ("rgba", rgba), ("gray", rgba[..., 0]), ("la", rgba[..., :2])]:
        path = tmp_path / f"{name}.png"
        iio.imwrite(path, pixels)
        want = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255  # (H, W, 3)
        got = read_image(str(path))
        assert got.shape == (3, 12, 20) and got.dtype == torch.float32, (name, got.shape)
        assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1)), name
    deep = rng.integers(0, 65536, (12, 20), dtype=np.uint16)  # 16-bit gray (PIL writes no 16-bit RGB PNG)
    iio.imwrite(tmp_path / "deep.png", deep)
    assert torch.equal(read_image(str(tmp_path / "deep.png")), torch.from_numpy(deep.astype(np.float32) / 65535)[None].expand(3, -1, -1))

    frames = rng.integers(0, 2, (5, 16, 24, 3), dtype=np.uint8) * 255  # 8 colours: a GIF palette keeps them exactly
    iio.imwrite(tmp_path / "clip.gif", frames, loop=0)
    got = read_video(str(tmp_path / "clip.gif"))
    assert got.shape == (5, 3, 16, 24)
    assert torch.equal(got, torch.from_numpy(frames.astype(np.float32) / 255).permute(0, 3, 1, 2))

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for reader in (read_image, read_video):
        refused(lambda: reader(str(tmp_path / "broken.png")), str(tmp_path / "broken.png"))
    for shape, dtype, reader, named in [((4, 4, 5), np.uint8, read_image, "(4, 4, 5)"),
                                        ((4,), np.uint8, read_image, "(4,)"),
                                        ((2, 4, 4, 5), np.uint8, read_video, "(2, 4, 4, 5)"),
                                        ((4, 4, 3), np.float32, read_image, "float32"),
                                        ((2, 4, 4, 3), np.int16, read_video, "int16")]:
        monkeypatch.setattr(iio, "imread", lambda *a, **k: np.zeros(shape, dtype))
        refused(lambda: reader("x"), "x", named)


@pytest.mark.parametrize("size,target", [((40, 80), (32, 32)), ((96, 48), (32, 48)), ((20, 30), (48, 64)),
                                         ((64, 96), (32, 48)), ((32, 48), (32, 48))])
def test_resize_covers_and_centre_crops_as_pil_fit(size, target):
    """generate.resize (an image or video of another size than the request) against PIL's ImageOps.fit: scale to
    cover, centre crop, bicubic with antialiasing. PIL crops in source pixels and then resamples, we resample and
    then crop, so the two differ by rounding: within 0.01 of [0, 1] (observed <= 0.0042); a crop off by one pixel
    on the 8-px checkerboard differs by up to 0.8. The request's own size is returned untouched."""
    from PIL import Image, ImageOps
    from media import resize
    (h, w), (H, W) = size, target
    y, x = np.mgrid[0:h, 0:w]
    pixels = (np.stack([x / w, y / h, ((x // 8 + y // 8) % 2) * 0.8 + 0.1], -1) * 255).round().astype(np.uint8)
    want = np.asarray(ImageOps.fit(Image.fromarray(pixels), (W, H), method=Image.BICUBIC)).astype(np.float32) / 255
    frames = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255  # (1, 3, h, w)
    got = resize(torch.cat([frames, 1 - frames]), H, W)                      # two frames: each resized alike
    assert got.shape == (2, 3, H, W)
    assert (got[0].permute(1, 2, 0) - torch.from_numpy(want)).abs().max() <= 0.01
    assert torch.allclose(got[1], 1 - got[0], atol=1e-5)
    if size == target:
        assert resize(frames, H, W) is frames


def test_prompt_file_lines_keep_their_numbers(tmp_path):
    """read_prompt_file in process (tests/test_cli.py runs prompt files end to end in subprocesses): blank lines and
    # comments, indented ones too, are skipped; every prompt keeps its 1-based line number (the -NNNN of its output);
    a file that is not UTF-8 or holds no prompt is refused by name."""
    from generate import read_prompt_file
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\n  a café at night  \n   # an indented comment\nsecond #1 prompt\n", encoding="utf-8")
    assert read_prompt_file(str(path)) == [(3, "a café at night"), (5, "second #1 prompt")]
    path.write_bytes("un caf\xe9\n".encode("latin-1"))
    refused(lambda: read_prompt_file(str(path)), "--prompt-file", str(path))
    path.write_text("\n# only comments\n")
    refused(lambda: read_prompt_file(str(path)), "--prompt-file", str(path))



@pytest.mark.parametrize("family", ["5b", "1.5"])
def test_encode_frames_is_the_peers_scaled_posterior_draw(snapshots, tmp_path, family):
    """encode_frames (the image / video input path) against diffusers' VAE: per video, encode -> latent_dist.sample
    (generator) in the pipelines' draw order, times scaling_factor; the I2V first frame (condition=True) divided by it
    on 1.5 (invert_scale_latents), as CogVideoXImageToVideoPipeline does, multiplied on 1.0; plain frames are never
    divided (the default). Tiled: against the peer with enable_tiling() on a frame of two tiles each way. bf16: the
    input and the latents in the pipeline's dtype, close to fp32."""
    from diffusers import AutoencoderKLCogVideoX
    import generate as gen
    path = resized_copy(snapshots(family), tmp_path / "snap")  # tiles of 48x40 px
    peer = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae").eval()
    sf = peer.config.scaling_factor
    pipe = load_pipeline(path)

    def ours(frames, **kw):
        return gen.encode_frames(pipe, frames, torch.Generator().manual_seed(5), **kw)

    def ref(frames, condition=False):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            z = torch.cat([peer.encode(v[None].permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.sample(g) for v in frames])
        z = z.permute(0, 2, 1, 3, 4)  # (B, F', C, h, w)
        return z / sf if condition and family == "1.5" else z * sf

    def close(a, b):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()

    frames = torch.rand(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, F, 3, H, W)
    close(ours(frames, tiled=False), ref(frames))
    close(ours(frames[:, :1], tiled=False, condition=True), ref(frames[:, :1], condition=True))
    assert torch.equal(ours(frames, tiled=False), ours(frames, tiled=False, condition=False))
    big = torch.rand(1, 1, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    peer.enable_tiling()
    tiled = ours(big, tiled=True)
    close(tiled, ref(big))
    assert (tiled - ours(big, tiled=False)).abs().max() > 1e-3  # the tiles did reach the VAE
    pipe = load_pipeline(path, dtype=torch.bfloat16)
    half = ours(frames, tiled=False)
    err = ((half.float() - ref(frames)).abs().max() / ref(frames).abs().max()).item()
    print(f"{family} bf16 encode vs fp32 peer: max abs {err:.3f} of the latents' range")
    assert half.dtype == torch.bfloat16 and err <= 0.05


def test_generate_defaults_are_the_documented_ones(snapshots, capsys):
    """generate() with only a prompt and a size: 50 steps, guidance 6, DDIM, seed 42, one video, a progress bar on
    stderr (the README's defaults); each equals passing it explicitly."""
    pipe = load_pipeline(snapshots("5b"))
    size = dict(num_frames=9, height=32, width=32, max_sequence_length=MAX_TEXT)
    implicit = generate(pipe, PROMPT, **size)
    assert "50/50" in capsys.readouterr().err
    explicit = generate(pipe, PROMPT, num_inference_steps=50, guidance_scale=6.0, sampler="ddim", seed=42,
                        num_videos=1, use_dynamic_cfg=False, negative_prompt="", progress=False, **size)
    assert capsys.readouterr().err == "" and torch.equal(implicit, explicit)


def test_generate_checks_each_argument_in_process(snapshots, tmp_path):
    """generate()'s own refusals, each naming the argument (tests/test_cli.py checks the CLI's in subprocesses), and
    the edges that must still be accepted: guidance 0, strength 1, a video of exactly num_frames frames."""
    pipe = load_pipeline(snapshots("5b"))
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=MAX_TEXT, progress=False)
    video = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bad, names in [(dict(num_inference_steps=0), ["num_inference_steps=0"]),
                       (dict(num_videos=0), ["num_videos=0"]),
                       (dict(guidance_scale=-0.5), ["guidance_scale=-0.5"]),
                       (dict(step_cache=0.0), ["step_cache=0.0"]),
                       (dict(video=video, strength=0.0), ["strength=0.0"]),
                       (dict(video=video, strength=1.5), ["strength=1.5"]),
                       (dict(video=video, num_frames=17), ["num_frames=17", "9"]),
                       (dict(video=video[0]), ["video", "(3, 32, 32)"]),
                       (dict(image=video), ["image", "(9, 3, 32, 32)"]),
                       (dict(image=video[0], video=video), ["image", "video"])]:
        refused(lambda: generate(pipe, PROMPT, **{**kw, **bad}), *names)
    assert generate(pipe, PROMPT, **{**kw, "guidance_scale": 0.0}).shape == (1, 9, 3, 32, 32)
    assert generate(pipe, PROMPT, video=video, strength=1.0, **kw).shape == (1, 9, 3, 32, 32)
    # a longer video is cut to num_frames; without num_frames its own length is the frame count
    long = torch.cat([video, video.flip(0)])[:17]
    cut = generate(pipe, PROMPT, video=long, strength=0.5, **kw)
    assert torch.equal(cut, generate(pipe, PROMPT, video=long[:9], strength=0.5, **kw))
    whole = {k: v for k, v in kw.items() if k != "num_frames"}
    assert generate(pipe, PROMPT, video=long, strength=0.5, **whole).shape == (1, 17, 3, 32, 32)
    # a path is read as the tensor it holds (image and video)
    frames = (video.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    iio.imwrite(tmp_path / "clip.gif", frames, loop=0)
    from media import read_video
    assert torch.equal(generate(pipe, PROMPT, video=str(tmp_path / "clip.gif"), strength=0.5, **kw),
                       generate(pipe, PROMPT, video=read_video(str(tmp_path / "clip.gif")), strength=0.5, **kw))


def test_guidance_up_to_one_is_unguided_as_in_the_peer(snapshots):
    """guidance_scale <= 1 turns classifier-free guidance off, as the pipelines' do_classifier_free_guidance
    (guidance_scale > 1): the text is encoded without negatives and each step runs one batch; guidance 1 equals the
    peer pipeline at 1, and 0 and 0.5 give the same frames; just above 1 guidance is on and the frames change."""
    path = snapshots("5b")
    pipe = load_pipeline(path)
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_TEXT, progress=False)
    at_one = generate(pipe, PROMPT, guidance_scale=1.0, **kw)
    check(at_one, peer_frames(path, "t2v", "ddim", num_frames=9, height=32, width=32, num_inference_steps=3,
                              guidance_scale=1.0))
    for g in (0.0, 0.5):
        assert torch.equal(generate(pipe, PROMPT, guidance_scale=g, **kw), at_one), g
    assert (generate(pipe, PROMPT, guidance_scale=1.5, **kw) - at_one).abs().max() > 1e-3
    # image-to-video: the condition latents are not doubled either
    path = snapshots("5b-i2v")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    check(generate(load_pipeline(path), PROMPT, image=image, guidance_scale=1.0, **kw),
          peer_frames(path, "i2v", "ddim", image=image[None], num_frames=9, height=32, width=32, num_inference_steps=3,
                      guidance_scale=1.0))


def test_karras_and_timings_reach_the_run(snapshots):
    """karras=True changes the dpm++2m schedule (tests/test_sampler.py checks the schedule against the peer); the
    timings dict receives each stage's wall time: durations, each a number >= 0 (not > 0: a fast machine may take
    less than the clock's resolution) and together no more than the whole call."""
    import time
    pipe = load_pipeline(snapshots("5b"))
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=4, max_sequence_length=MAX_TEXT, progress=False,
              sampler="dpm++2m")
    timings = {}
    t0 = time.perf_counter()
    karras = generate(pipe, PROMPT, karras=True, timings=timings, **kw)
    wall = time.perf_counter() - t0
    assert (karras - generate(pipe, PROMPT, **kw)).abs().max() > 1e-3
    assert set(timings) == {"text", "denoise", "decode", "evaluations"} and timings["evaluations"] == 4
    parts = [timings[k] for k in ("text", "denoise", "decode")]
    assert all(isinstance(p, float) and 0 <= p for p in parts) and sum(parts) <= wall, (timings, wall)


@pytest.mark.parametrize("family", ["1.5-i2v", "5b"])
def test_image_and_video_inputs_are_tiled_as_the_peer_tiles(snapshots, tmp_path, family):
    """vae_tiling reaches the encoding of the input too (the I2V condition frame, the video-to-video clip): the peer
    pipeline with vae.enable_tiling() on a 96x80 request (two tiles each way, as
    test_vae_tiling_through_generate_matches_peer_tiling) gives our frames. I2V on 1.5 (RoPE): the 1.0 I2V model's
    learned position table only takes its own 32x32."""
    path = resized_copy(snapshots(family), tmp_path / "snap", transformer=(12, 10))
    if family == "1.5-i2v":
        image = torch.rand(3, 96, 80, generator=torch.Generator().manual_seed(4))
        ours_in, peer_in, mode, n = dict(image=image), dict(image=image[None]), "i2v", 17
    else:
        video = torch.rand(9, 3, 96, 80, generator=torch.Generator().manual_seed(4))
        ours_in, peer_in, mode, n = dict(video=video, strength=0.7), dict(video=[video], strength=0.7), "v2v", 9
    kw = dict(height=96, width=80, num_inference_steps=2, guidance_scale=6.0)
    ours = generate(load_pipeline(path), PROMPT, vae_tiling=True, max_sequence_length=MAX_TEXT, progress=False,
                    num_frames=n, **ours_in, **kw)
    peer = peer_pipeline(path, (mode, "ddim"))
    peer.vae.enable_tiling()
    ref = peer(prompt=[PROMPT], negative_prompt=[""], generator=torch.Generator().manual_seed(42), output_type="pt",
               max_sequence_length=MAX_TEXT, **({} if mode == "v2v" else dict(num_frames=n)), **peer_in, **kw).frames
    check(ours, ref)



@pytest.mark.parametrize("family", ["5b", "1.5-i2v"])
def test_bf16_runs_every_input_kind(snapshots, family):
    """A bf16 pipeline (the GPU default) with a video (5b) or an image (1.5 I2V, with its ofs embedding) as input:
    the noised input latents and the ofs tensor in the pipeline's dtype; frames close to the fp32 run's."""
    path = snapshots(family)
    kw = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_TEXT, progress=False)
    if family == "5b":
        kw.update(video=torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(1)), strength=0.7)
    else:
        kw.update(image=torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)), num_frames=17)
    full = generate(load_pipeline(path), PROMPT, **kw)
    pipe = load_pipeline(path, dtype=torch.bfloat16)
    seen = set()  # the dtypes of the latents and the ofs tensor the transformer is given, at every step
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.update(v.dtype for v in (a[0], a[3]) if v is not None))
    half = generate(pipe, PROMPT, **kw)
    assert seen == {torch.bfloat16}
    diff = (half - full).abs()
    print(f"{family} bf16 vs fp32 frames: mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert half.dtype == torch.float32 and half.shape == full.shape and diff.mean() < 0.02


def test_image_path_is_read_as_its_tensor(snapshots, tmp_path):
    """generate(image=PATH) reads the file as read_image does (image-to-video through the API, not the CLI)."""
    from media import read_image
    path = snapshots("5b-i2v")
    pixels = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    iio.imwrite(tmp_path / "first.png", pixels)
    pipe = load_pipeline(path)
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=MAX_TEXT, progress=False)
    assert torch.equal(generate(pipe, PROMPT, image=str(tmp_path / "first.png"), **kw),
                       generate(pipe, PROMPT, image=read_image(str(tmp_path / "first.png")), **kw))


@pytest.mark.parametrize("kind", ["clip.mp4", "clip.gif", "frames"])
def test_save_video_writes_the_frames_fps_signature_and_contact_sheet(tmp_path, kind):
    """save_video in process (tests/test_cli.py checks the CLI's files in subprocesses, which mutation testing cannot
    follow): each format holds the frames (GIF and PNG exactly, mp4 within codec loss) at the fps (mp4 metadata; GIF
    frames of 1000 / fps ms, looping forever), every file carries cli.MARK (what lets a later run replace it), and
    the contact sheet beside it is contact_sheet() of the frames. A named path replaces a foreign file, a derived one
    (named=False) refuses to; fps <= 0 is refused, 0.5 is fine."""
    import imageio
    from PIL import Image
    import cli
    from media import contact_sheet, save_video, sheet_path
    blocks = (torch.rand(5, 3, 2, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()   # 8 colours
    frames = blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # (5, 3, 16, 32): 8-px blocks for the codec
    want = to_uint8(frames)
    path = str(tmp_path / kind)
    written = save_video(frames, path, 12.5)
    assert written == [path, str(tmp_path / f"{kind.split('.')[0]}.png")] and written[1] == sheet_path(path)
    assert np.array_equal(iio.imread(written[1])[..., :3], contact_sheet(want))
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".png")] if kind == "frames" else [path]
    assert all(cli.MARK.encode() in open(f, "rb").read() and cli.written_by_us(f) for f in files + [written[1]]), files
    if kind == "frames":
        assert [os.path.basename(f) for f in files] == [f"{i:04d}.png" for i in range(5)]
        assert np.array_equal(np.stack([iio.imread(f)[..., :3] for f in files]), want)
    elif kind == "clip.gif":
        assert np.array_equal(iio.imread(path, index=None)[..., :3], want)
        with Image.open(path) as im:
            assert im.info["duration"] == 80 and im.info["loop"] == 0, im.info
    else:
        reader = imageio.get_reader(path, format="FFMPEG")
        assert reader.get_meta_data()["fps"] == 12.5
        reader.close()
        got = iio.imread(path, index=None).astype(np.float32)
        assert got.shape == want.shape and np.abs(got - want).mean() < 10, np.abs(got - want).mean()  # observed 2.7
    # replacing: a foreign file at a named path is replaced, at a derived path refused
    foreign = str(tmp_path / ("other" + os.path.splitext(kind)[1]))
    if kind != "frames":
        with open(foreign, "wb") as f:
            f.write(b"not ours")
        refused(lambda: save_video(frames, foreign, 12.5, named=False), foreign)
        assert open(foreign, "rb").read() == b"not ours"
        save_video(frames, foreign, 12.5)
        assert cli.MARK.encode() in open(foreign, "rb").read()
    for fps in (0, -1):
        refused(lambda: save_video(frames, str(tmp_path / f"fps{fps}.gif"), fps), f"fps={fps}")
    save_video(frames, str(tmp_path / "slow.gif"), 0.5)


def test_contact_sheet_and_uint8_layout():
    """to_uint8 truncates x * 255 as diffusers' export_to_video does (1.0 -> 255, 0.999 -> 254); contact_sheet puts
    frame i at row i // 8, column i % 8, each framed by 2 white pixels."""
    from media import contact_sheet
    x = torch.tensor([0.0, 0.5, 0.999, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 127, 254, 255]
    frames = np.arange(10 * 3 * 5 * 3, dtype=np.uint8).reshape(10, 3, 5, 3)
    sheet = contact_sheet(frames)
    assert sheet.shape == (2 * (3 + 2) + 2, 8 * (5 + 2) + 2, 3)
    for i in range(10):
        r, c = divmod(i, 8)
        assert np.array_equal(sheet[2 + 5 * r:5 + 5 * r, 2 + 7 * c:7 + 7 * c], frames[i])
    mask = np.ones(sheet.shape[:2], bool)
    for i in range(10):
        r, c = divmod(i, 8)
        mask[2 + 5 * r:5 + 5 * r, 2 + 7 * c:7 + 7 * c] = False
    assert (sheet[mask] == 255).all()
    assert contact_sheet(frames[:3]).shape == (3 + 4, 3 * (5 + 2) + 2, 3)  # fewer frames than columns: one short row
    from media import sheet_path
    for video, sheet in [("clip.mp4", "clip.png"), ("out/clip.GIF", "out/clip.png"), ("runs/frames/", "runs/frames.png"),
                         ("runs/boX", "runs/boX.png"), ("runs/boX/", "runs/boX.png"), ("a b/c d.mp4", "a b/c d.png")]:
        assert sheet_path(video) == sheet, video


def test_load_pipeline_dtype_and_offload_arguments(snapshots):
    """dtype reaches every stage's weights (T5 in bf16 is half of T5-XXL's 19 GB in fp32), and offload takes None,
    False, True ("model"), "model" and "blocks"; anything else is refused by name."""
    path = snapshots("5b")
    pipe = load_pipeline(path, dtype=torch.bfloat16)
    for name in ("text_encoder", "transformer", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name
    assert pipe.dtype == torch.bfloat16
    for offload, want in [(None, None), (False, None), (True, "model"), ("model", "model"), ("blocks", "blocks")]:
        assert load_pipeline(path, offload=offload).offload == want, offload
    refused(lambda: load_pipeline(path, offload="disk"), "offload", "'disk'")
    refused(lambda: load_pipeline(path, device="tpu"), "'tpu'")  # a device name is checked as --device is


def test_generate_shows_its_progress_unless_asked_not_to(snapshots, capsys):
    pipe = load_pipeline(snapshots("2b"))
    kw = dict(num_inference_steps=3, max_sequence_length=MAX_TEXT)
    generate(pipe, PROMPT, **kw)
    assert "3/3" in capsys.readouterr().err  # the denoising bar, on by default
    generate(pipe, PROMPT, progress=False, **kw)
    assert "3/3" not in capsys.readouterr().err


def test_a_step_cache_that_never_refreshes_still_evaluates_the_first_and_the_last_step(snapshots):
    """generate(step_cache=...) gives the cache its threshold and the step count: with a threshold nothing reaches,
    2 of 4 steps run the blocks (StepCache's definition); with one every change exceeds, all 4, as without a cache."""
    pipe = load_pipeline(snapshots("2b"))
    kw = dict(num_inference_steps=4, max_sequence_length=MAX_TEXT, progress=False)
    for threshold, evaluations in ((1e9, 2), (1e-12, 4)):
        timings = {}
        frames = generate(pipe, PROMPT, step_cache=threshold, timings=timings, **kw)
        assert timings["evaluations"] == evaluations, threshold
    assert torch.equal(frames, generate(pipe, PROMPT, **kw))


def test_a_snapshot_without_one_of_its_five_folders_is_refused_naming_it(snapshots, tmp_path):
    import shutil
    from checkpoint import CheckpointError
    from pipeline import read_model_info
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        path = tmp_path / sub
        shutil.copytree(snapshots("2b"), path)
        shutil.rmtree(path / sub)
        refused(lambda: read_model_info(str(path)), f"{sub}/", error=CheckpointError)


def test_peak_memory_is_the_high_water_mark_in_gib(monkeypatch):
    """The CLI's "peak memory" figure: on the CPU the process's resident high-water mark, which Linux also states
    as VmHWM (kB) in /proc/self/status; on CUDA the allocator's peak, both in GiB (2**30 bytes)."""
    from generate import peak_memory_gb

    def vm_hwm_gib():
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 2**20

    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM is a Linux figure")
    low = vm_hwm_gib()
    got = peak_memory_gb(torch.device("cpu"))
    assert low * 0.99 <= got <= vm_hwm_gib() * 1.01 + 1e-3, (low, got)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 if device.index == 1 else 0)
    assert peak_memory_gb(torch.device("cuda", 1)) == 3.0


def test_cli_image_video_and_num_videos_give_the_api_frames(snapshots, tmp_path, capsys):
    """--image, --video (with and without --strength, cut to --num-frames) and --num-videos through main() write
    exactly the frames generate() returns for the same files and arguments, under the documented names."""
    import generate as gen
    g = torch.Generator().manual_seed(8)
    image, video = tmp_path / "first.png", tmp_path / "clip.gif"
    iio.imwrite(image, (torch.rand(32, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
    iio.imwrite(video, (torch.rand(17, 32, 48, 3, generator=g) * 255).to(torch.uint8).numpy(), duration=100, loop=0)

    def both(family, flags, outputs, **kw):
        path = snapshots(family)
        size = dict(height=32, width=32 if family == "5b-i2v" else 48)  # 5b-i2v: its learned positions' size only
        assert gen.main(["--model", path, "--prompt", PROMPT, "--steps", "3", "--height", str(size["height"]),
                         "--width", str(size["width"]), *flags]) == 0
        want = generate(load_pipeline(path), PROMPT, num_inference_steps=3, progress=False, **size, **kw)
        assert len(outputs) == len(want)
        for out, frames in zip(outputs, want):
            got = png_frames(out)
            assert np.array_equal(got, to_uint8(frames)), (flags, out)
        return want

    both("5b-i2v", ["--image", str(image), "--num-frames", "9", "--output", str(tmp_path / "i2v")], [tmp_path / "i2v"],
         image=str(image), num_frames=9)  # the 32 x 48 image is cropped to 32 x 32
    cut = media.read_video(str(video))[:9]
    a = both("2b", ["--video", str(video), "--num-frames", "9", "--output", str(tmp_path / "v2v")], [tmp_path / "v2v"],
             video=cut, strength=0.8)
    b = both("2b", ["--video", str(video), "--strength", "0.5", "--num-videos", "2", "--output", str(tmp_path / "s/")],
             [tmp_path / "s_0", tmp_path / "s_1"], video=str(video), strength=0.5, num_videos=2)
    both("2b", ["--video", str(video), "--num-frames", "17", "--output", str(tmp_path / "all")], [tmp_path / "all"],
         video=str(video))  # a video of exactly --num-frames frames is taken whole
    assert a.shape[1] == 9 and b.shape[1] == 17 and not torch.equal(a[0], b[0, :9])
    # what the sampler cannot run is refused before any weight is read (the snapshot has none), as in generate()
    no_weights = configs_only(snapshots("2b"), tmp_path / "no-weights")
    capsys.readouterr()
    for flags, name in [(["--video", str(video), "--strength", "0.1"], "strength=0.1"), (["--karras"], "karras")]:
        assert gen.main(["--model", no_weights, "--prompt", PROMPT, "--steps", "3", *flags,
                         "--output", str(tmp_path / "refused.mp4")]) == 2
        assert name in capsys.readouterr().err, flags
    assert gen.main(["--model", no_weights, "--prompt", PROMPT, "--steps", "3", "--output", str(tmp_path / "x.mp4")]) == 2
    assert ".safetensors" in capsys.readouterr().err  # a request that passes reaches the (empty) weights
    assert not (tmp_path / "refused.mp4").exists() and not (tmp_path / "x.mp4").exists()


def test_cli_prompt_file_under_torchrun_takes_every_world_th_prompt(snapshots, tmp_path, monkeypatch, capsys):
    """Under torchrun (RANK / WORLD_SIZE), process r of w generates prompts r, r + w, ... of the file, each seeded
    with --seed plus its index in the whole file and named after its line; a process left without a prompt writes
    nothing. (A file that appears at a derived name while the videos are made is refused when it is written:
    save_video(named=False), tested above.)"""
    import generate as gen
    path = snapshots("2b")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n# a comment\n\n{NEGATIVE}\na green triangle\n")
    argv = ["--model", path, "--prompt-file", str(prompts), "--steps", "2", "--num-frames", "9", "--height", "32",
            "--width", "48", "--seed", "3"]
    pipe = load_pipeline(path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert gen.main([*argv, "--output", str(tmp_path / "a/")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a-0004", "a-0004.png", "prompts.txt"]
    got = png_frames(tmp_path / "a-0004")
    want = generate(pipe, NEGATIVE, num_frames=9, height=32, width=48, num_inference_steps=2, seed=3 + 1,
                    progress=False)
    assert np.array_equal(got, to_uint8(want[0]))
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "b-0005.gif").write_bytes(b"not ours")  # a derived name is replaced only if we wrote it
    capsys.readouterr()
    assert gen.main([*argv, "--output", str(tmp_path / "b.gif")]) == 2
    assert "b-0005.gif" in capsys.readouterr().err and (tmp_path / "b-0005.gif").read_bytes() == b"not ours"
    assert not (tmp_path / "b-0001.gif").exists()  # refused before the first video, not after it
    os.remove(tmp_path / "b-0005.gif")
    t0 = time.perf_counter()
    assert gen.main([*argv, "--output", str(tmp_path / "b.gif")]) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert {"b-0001.gif", "b-0005.gif"} <= set(os.listdir(tmp_path)) and not (tmp_path / "b-0004.gif").exists()
    for line in (1, 5):  # each video's report names its files
        assert f"{tmp_path / f'b-{line:04d}.gif'}, {tmp_path / f'b-{line:04d}.png'}" in out
    # the progress lines count this process's videos and give each prompt's line in the file
    assert re.findall(r"\[(\d+)/(\d+)\] line (\d+): (.*)", out) == [("1", "2", "1", PROMPT), ("2", "2", "5", "a green triangle")]
    assert 0 <= float(re.search(r"loaded in (\d+\.\d)s", out)[1]) <= elapsed + 0.05  # a duration, not a clock
    # each video reports the time of its three stages (durations: together within the run's time), and no step
    # cache was asked for, so none is reported
    stages = [float(v) for row in re.findall(r"text (\d+\.\d)s, denoise (\d+\.\d)s, decode (\d+\.\d)s", out)
              for v in row]
    assert len(stages) == 6 and sum(stages) <= elapsed + 0.3 and "step cache" not in out  # 6 values rounded to 0.1 s
    named = tmp_path / "named.gif"  # the output the user names is theirs to replace, whoever wrote it
    named.write_bytes(b"an older file of the user's")
    assert gen.main(["--model", path, "--prompt", PROMPT, "--steps", "1", "--num-frames", "9", "--output", str(named)]) == 0
    assert iio.imread(named, index=None).shape == (9, 32, 32, 3)
    assert not re.search(r"\[\d+/\d+\] line", capsys.readouterr().out)  # prompt-file progress only for a prompt file
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert gen.main([*argv, "--output", str(tmp_path / "c.gif")]) == 0
    assert not any(f.startswith("c") for f in os.listdir(tmp_path))


def test_check_video_output_defaults_to_a_named_output_path(tmp_path):
    """Called with a path alone (as edit.py does), the path is the user's --output: a file there may be replaced; a
    derived path (named=False) only if we wrote it; refusals name the flag."""
    from media import check_video_output
    foreign = tmp_path / "clip.mp4"
    foreign.write_bytes(b"the user's")
    check_video_output(str(foreign))
    refused(lambda: check_video_output(str(foreign), named=False), str(foreign), "--output")
    refused(lambda: check_video_output(str(tmp_path / "clip.avi")), f"--output {tmp_path / 'clip.avi'}")
    refused(lambda: check_video_output(str(tmp_path / "clip.avi"), flag="--out"), f"--out {tmp_path / 'clip.avi'}")
    for bad in ("clip.gifX", "frames.v2/"):  # the extension is what is left once trailing slashes go, and only they
        refused(lambda: check_video_output(os.path.join(str(tmp_path), bad)), bad)  # (pathlib would drop the slash)
    (tmp_path / "clip.png").write_bytes(b"the user's photo")  # the contact sheet's path is derived: never replaced
    refused(lambda: check_video_output(str(foreign)), str(tmp_path / "clip.png"), "--output")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("the user's")
    refused(lambda: check_video_output(str(tmp_path / "frames")), f"--output {tmp_path / 'frames'}")


def test_resolve_model_path_downloads_only_a_hub_id_and_says_how_to_get_a_folder(tmp_path, monkeypatch, capsys):
    """Found by mutation testing (bench/MUTANTS.md): which --model values go to the Hub. Only an `owner/name` id
    whose owner is not a local folder is downloaded (huggingface_hub's snapshot_download, faked here: no network);
    a relative, absolute, deeper or local-owner path is a missing folder, refused with the download command for the
    official repo its name matches (any case, trailing slash), CogVideoX-5b otherwise. A failed download is one
    line; without huggingface_hub the id is a missing folder. None is the bundled demo model, said on stdout."""
    import huggingface_hub
    import pipeline
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: calls.append(repo) or f"/hub/{repo}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    resolve = pipeline.resolve_model_path
    assert resolve("THUDM/CogVideoX-2b") == "/hub/THUDM/CogVideoX-2b" and calls == ["THUDM/CogVideoX-2b"]
    assert resolve("models") == "models"  # a folder that exists is taken as it is

    for model, repo in (("./THUDM/CogVideoX-2b", "CogVideoX-2b"), (".cache/cogvideox-5b-i2v", "CogVideoX-5b-I2V"),
                        ("/CogVideoX1.5-5B", "CogVideoX1.5-5B"), ("a/THUDM/CogVideoX-2b", "CogVideoX-2b"),
                        ("models/cogvideox1.5-5b-I2V/", "CogVideoX1.5-5B-I2V"), ("models/my-finetune", "CogVideoX-5b")):
        # the fix is the download command for the official repo the name matches
        refused(lambda: resolve(model), model, f"`hf download THUDM/{repo} --local-dir {model}`")
    assert calls == ["THUDM/CogVideoX-2b"]

    def offline(repo):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert "\n" not in refused(lambda: resolve("THUDM/CogVideoX-5b"), "THUDM/CogVideoX-5b", "offline")  # one line
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: import fails, a missing folder
    refused(lambda: resolve("THUDM/CogVideoX-5b"), "`hf download THUDM/CogVideoX-5b --local-dir THUDM/CogVideoX-5b`")

    assert resolve(None) == pipeline.DEMO_MODEL
    assert os.path.relpath(pipeline.DEMO_MODEL) in capsys.readouterr().out  # says which model it took
    monkeypatch.setattr(pipeline, "DEMO_MODEL", str(tmp_path / "demo"))
    refused(lambda: resolve(None), str(tmp_path / "demo"), "--model")


def test_check_request_takes_exactly_what_each_model_takes_and_suggests_values_it_takes():
    """Found by mutation testing (bench/MUTANTS.md): the boundaries of check_request and the values its messages
    suggest. Real configs (the presets, no weights): 1.0 takes 8k+1 frames and 1.5 16k+1, a single frame included;
    sizes are positive multiples of 16, and only 5b-I2V's learned position table pins the size; an image is needed by
    and only by the I2V models, a video by neither. Each refusal's suggestions are themselves accepted."""
    import re
    import generate as gen
    from model import PRESETS as T
    from pipeline import model_info
    from sampler import PRESETS as S
    from vae import PRESETS as V
    t2v = model_info("2b", T["cogvideox-2b"], V["cogvideox-2b"], S["cogvideox-2b"])
    i2v = model_info("5b-i2v", T["cogvideox-5b-i2v"], V["cogvideox-5b"], S["cogvideox-5b"])
    v15 = model_info("1.5", T["cogvideox1.5-5b"], V["cogvideox1.5-5b"], S["cogvideox-5b"])
    # 1.5: 16k+1 frames at 16 fps, its card's size; the precision each was trained in (fp16 for 2b only)
    assert [(i.frame_multiple, i.fps, i.height, i.width, i.gpu_dtype) for i in (t2v, i2v, v15)] == [
        (8, 8, 480, 720, torch.float16), (8, 8, 480, 720, torch.bfloat16), (16, 16, 768, 1360, torch.bfloat16)]
    image, video = torch.zeros(3, 480, 720), torch.zeros(9, 3, 480, 720)

    def suggested(info, n=49, h=480, w=720, name="num_frames"):
        """The refusal names the argument and value; -> the two values it suggests (its last two numbers)."""
        message = refused(lambda: gen.check_request(info, n, h, w), f"{name}={dict(num_frames=n, height=h, width=w)[name]}")
        return tuple(int(x) for x in re.findall(r"-?\d+", message)[-2:])

    for info, m in ((t2v, 8), (v15, 16)):
        for n in (1, m + 1, 6 * m + 1):
            gen.check_request(info, n, 480, 720)
        for n, lo in ((0, 1), (2, 1), (m, 1), (m + 2, m + 1), (2 * m - 1, m + 1), (5 * m, 4 * m + 1)):
            assert suggested(info, n) == (lo, lo + m), (n, m)
            for good in (lo, lo + m):
                gen.check_request(info, good, 480, 720)
    for v in (16, 32, 480, 720, 1360):
        gen.check_request(t2v, 49, v, 720)
        gen.check_request(t2v, 49, 480, v)
    for v, lo in ((0, 16), (-16, 16), (8, 16), (100, 96), (470, 464)):
        assert suggested(t2v, h=v, name="height") == suggested(t2v, w=v, name="width") == (lo, lo + 16), v
        gen.check_request(t2v, 49, lo, lo + 16)
    gen.check_request(t2v, 49, 256, 256)  # a table-free (RoPE or sincos) model takes any size
    gen.check_request(i2v, 49, 480, 720, image=image)
    refused(lambda: gen.check_request(i2v, 49, 480, 736, image=image), "480 x 736", "480 x 720")  # its table's size
    gen.check_request(t2v, 49, 480, 720)  # video-to-video: a text-to-video model takes a video
    for info in (t2v, i2v):  # an image and a video are refused together, before either is read
        refused(lambda: gen.plan(info, "p", image="missing.png", video="missing.mp4"), "image", "video")
    refused(lambda: gen.check_request(t2v, 49, 480, 720, image=image), "2b", "I2V")
    refused(lambda: gen.check_request(i2v, 49, 480, 720), "5b-i2v", "--image")
    refused(lambda: gen.plan(i2v, "p", video=video), "5b-i2v", "--image")


def test_a_size_the_learned_positions_lack_is_refused_before_loading(snapshots, tmp_path, capsys):
    """5b-I2V's learned position table covers its sample size only; the peer pipeline refuses other sizes in the
    transformer, after loading and encoding. We refuse them from the configs, before any weight is read."""
    import generate as gen
    from diffusers.utils import logging
    logging.set_verbosity_error()
    path = snapshots("5b-i2v")
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="different resolution"):  # the peer: the same model cannot take 32 x 48
        peer_frames(path, "i2v", "ddim", image=image[None], num_frames=9, height=32, width=48, num_inference_steps=1)
    pipe = load_pipeline(path)
    refused(lambda: generate(pipe, PROMPT, image=image, num_frames=9, height=32, width=48, progress=False),
            "32 x 48", "32 x 32")
    iio.imwrite(tmp_path / "first.png", (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    no_weights = configs_only(path, tmp_path / "no-weights")  # refused from the configs: no weight to read
    assert gen.main(["--model", no_weights, "--prompt", PROMPT, "--image", str(tmp_path / "first.png"), "--width",
                     "48", "--output", str(tmp_path / "v.mp4")]) == 2
    assert "32 x 48" in capsys.readouterr().err and not (tmp_path / "v.mp4").exists()


def test_command_line_defaults_are_generates_and_closed_flags_refuse_other_values(snapshots, tmp_path, capsys):
    """generate.py with nothing but a prompt writes the frames generate() returns for nothing but the prompt: every
    default is the same (steps, guidance, sampler, seed, negative prompt; frames, size and text length from the
    model). Each flag with a closed set of values refuses another with argparse's exit 2, naming the flag, and a
    prompt (--prompt or --prompt-file) is required."""
    import generate as gen
    path = snapshots("2b")
    png = cli_frames(path, tmp_path / "frames", size=())
    assert np.array_equal(png, to_uint8(generate(load_pipeline(path), PROMPT, progress=False)[0]))
    for flags, names in [(["--dtype", "fp64"], ["--dtype", "fp64"]), (["--offload", "disk"], ["--offload", "disk"]),
                         (["--quantize", "int4"], ["--quantize", "int4"]), (["--sampler", "plms"], ["--sampler", "plms"]),
                         (["--prompt", "a", "--prompt-file", "p.txt"], ["--prompt-file", "--prompt"]),
                         ([], ["--prompt", "--prompt-file"])]:
        with pytest.raises(SystemExit) as e:
            gen.parse_args(flags if not flags or flags[0] == "--prompt" else ["--prompt", PROMPT, *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(name in err for name in names), (flags, err)


def test_cli_quantize_and_compile_reach_the_transformer(snapshots, tmp_path, monkeypatch):
    """--quantize int8 writes the frames of quantize_int8(pipe.transformer) + generate() (which differ from fp32's);
    --compile calls the transformer's compile() once (recorded here: compiling needs a C++ toolchain on the CPU)."""
    import generate as gen
    from model import CogVideoXTransformer
    path = snapshots("2b")
    png = cli_frames(path, tmp_path / "int8", "--steps", "2", "--quantize", "int8")
    pipe = load_pipeline(path)
    quantize_int8(pipe.transformer)
    want = to_uint8(generate(pipe, PROMPT, num_frames=9, height=32, width=48, num_inference_steps=2,
                             progress=False)[0])
    assert not np.array_equal(want, api_frames(path)), "int8 gives fp32's frames here: the test cannot tell"
    assert np.array_equal(png, want)
    calls = []
    monkeypatch.setattr(CogVideoXTransformer, "compile", lambda self, *a, **k: calls.append(self))
    assert np.array_equal(cli_frames(path, tmp_path / "compiled", "--steps", "2", "--compile"), api_frames(path))
    assert len(calls) == 1
    cli_frames(path, tmp_path / "eager", "--steps", "2")
    assert len(calls) == 1


def test_torchrun_gives_each_process_its_gpu_and_the_gpu_dtype_is_the_models(snapshots, tmp_path, monkeypatch,
                                                                             capsys):
    """Under torchrun with GPUs and no --device, process LOCAL_RANK k runs on cuda:k (one GPU per process, README);
    --device wins; one process, or no GPU, keeps the default pick. Seen from outside: with torch.cuda.is_available
    faked (this machine has no GPU), the run is refused naming cuda:k, which is not there; where no cuda:k is
    chosen the device passes and the run stops at the next refusal, its .avi --output. On a GPU the default dtype
    is the checkpoint's training precision: fp16 for 2b, bf16 for 5b (README). Missing --image / --video files are
    named by flag."""
    import cli
    import generate as gen
    from pipeline import read_model_info
    argv = ["--model", snapshots("2b"), "--prompt", PROMPT, "--output", str(tmp_path / "v.avi")]
    with monkeypatch.context() as m:
        for world, local, available, extra, refused_at in [("2", "1", True, [], "cuda:1"), ("4", "3", True, [], "cuda:3"),
                                                           ("2", "1", True, ["--device", "cpu"], "--output"),
                                                           ("1", "0", True, [], "--output"),
                                                           ("2", "1", False, [], "--output")]:
            m.setenv("WORLD_SIZE", world)
            m.setenv("LOCAL_RANK", local)
            m.setenv("RANK", local)
            m.setattr(torch.cuda, "is_available", lambda: available)
            assert gen.main(argv + extra) == 2
            err = capsys.readouterr().err
            assert refused_at in err and ("cuda:" not in err or refused_at.startswith("cuda")), (world, local, err)
    for family, want in [("2b", torch.float16), ("5b", torch.bfloat16)]:
        gpu_dtype = read_model_info(snapshots(family)).gpu_dtype
        assert cli.pick_dtype(None, torch.device("cuda"), gpu_dtype) == want, family
        assert cli.pick_dtype(None, torch.device("cpu"), gpu_dtype) == torch.float32
        assert cli.pick_dtype("fp32", torch.device("cuda"), gpu_dtype) == torch.float32
    argv = ["--model", snapshots("2b"), "--prompt", PROMPT, "--output", str(tmp_path / "v.mp4")]
    for flag in ("--image", "--video"):
        assert gen.main(argv + [flag, str(tmp_path / "missing.png")]) == 2
        assert f"{flag} {tmp_path / 'missing.png'}" in capsys.readouterr().err
        (tmp_path / "a_folder").mkdir(exist_ok=True)
        assert gen.main(argv + [flag, str(tmp_path / "a_folder")]) == 2
        assert f"{flag} {tmp_path / 'a_folder'}" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


# ---- gaps found by rerunning bench/MUTANTS.md's mutants on issue 34's moved code (generate.plan)
def test_a_text_length_other_than_the_models_reaches_the_text_encoder(snapshots):
    """max_sequence_length (plan's text_length) other than the snapshot's own max_text_seq_length: the frames are the
    peer pipeline's at that same max_sequence_length, and differ from the model's default length (every other test
    passes MAX_TEXT, which is the tiny snapshots' own, so ignoring the argument went unseen: plan 199)."""
    path = snapshots("5b")
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2)
    short = MAX_TEXT // 2
    ours = generate(load_pipeline(path), PROMPT, max_sequence_length=short, progress=False, **kw)
    peer = peer_pipeline(path, ("t2v", "ddim"))
    ref = peer(prompt=[PROMPT], negative_prompt=[""], generator=torch.Generator().manual_seed(42), output_type="pt",
               max_sequence_length=short, **kw).frames
    check(ours, ref)
    default = generate(load_pipeline(path), PROMPT, progress=False, **kw)
    assert (ours - default).abs().max() > 1e-3


def preset_info_2b():
    """CogVideoX-2b's ModelInfo from the presets in source: real configs, no snapshot, no weights."""
    from model import PRESETS as T
    from pipeline import model_info
    from sampler import PRESETS as S
    from vae import PRESETS as V
    return model_info("2b", T["cogvideox-2b"], V["cogvideox-2b"], S["cogvideox-2b"])


def test_negative_prompts_must_pair_with_the_prompts():
    """plan() takes one negative prompt per prompt, or one string for all; a list of another length (or no prompt at
    all) is refused before anything is read (plan 21: only the empty prompt list was refused). Real configs, no
    weights."""
    import generate as gen
    info = preset_info_2b()
    for prompts, negatives in ((["a", "b"], ["x"]), (["a"], ["x", "y"]), ([], "")):
        refused(lambda: gen.plan(info, prompts, negative_prompt=negatives), "prompt(s)", "negative prompt(s)")
    assert [job.negatives for job in gen.plan(info, ["a", "b"], negative_prompt=["x", "y"]).jobs] == [["x", "y"]]
    assert [job.negatives for job in gen.plan(info, ["a", "b"], negative_prompt="x").jobs] == [["x", "x"]]


def test_plan_with_an_output_names_each_video_and_checks_the_paths(tmp_path):
    """The Python API's plan(output=...) (no prompt-file lines): one job whose videos go to the path given, or to
    derived names when there are several; a path holding a file someone else wrote is refused before any work."""
    import generate as gen
    info = preset_info_2b()
    out = str(tmp_path / "clip.mp4")
    assert [j.outputs for j in gen.plan(info, "a", output=out).jobs] == [[(out, True)]]
    two = gen.plan(info, "a", output=out, num_videos=2).jobs
    assert [j.outputs for j in two] == [[(str(tmp_path / "clip_0.mp4"), False), (str(tmp_path / "clip_1.mp4"), False)]]
    (tmp_path / "clip_0.mp4").write_text("someone else's")
    refused(lambda: gen.plan(info, "a", output=out, num_videos=2), "clip_0.mp4")


def test_plan_without_arguments_is_the_documented_default_run():
    """plan() called with a prompt alone (as train_lora's validation render calls it) plans the README's default run:
    one video, DDIM over 50 steps, guidance 6 without the dynamic schedule, seed 42, no tiling, no step cache, the
    model's own frames, size and text length (plan 9: two videos per prompt went unseen, since the render keeps the
    first, which equals a single video's)."""
    import generate as gen
    from sampler import make_sampler
    info = preset_info_2b()
    r = gen.plan(info, "p")
    assert (r.num_videos, r.guidance_scale, r.use_dynamic_cfg, r.tiled, r.step_cache) == (1, 6.0, False, False, None)
    assert (r.num_frames, r.height, r.width, r.text_length) == (49, 480, 720, 226)
    assert [(j.prompts, j.negatives, j.seed) for j in r.jobs] == [(["p"], [""], 42)]
    ddim = make_sampler("ddim", info.scheduler, 50)
    assert r.sampler.solver == "ddim" and r.sampler.num_steps == 50 and r.sampler.timesteps == ddim.timesteps
