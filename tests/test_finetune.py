"""train_lora.py beyond one-size LoRA (issue 36, items 2, 3 and 5): buckets of mixed clip sizes and lengths, and full
fine-tuning (--full), on a tiny random 2b snapshot and clips made here.

Buckets: clips of two sizes in one folder train in two buckets, each batch from one, a too-short clip dropped and
named; a bad --buckets is refused in one line before any weight is read. Full: an interrupted and resumed run equals
the uninterrupted one bit for bit, frozen parameters stay the base's, and the transformer/ folder it writes loads in
diffusers' CogVideoXTransformer3DModel.from_pretrained with our outputs."""
import json
import os
import re
import shutil

import imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cli
import train_lora
from model import load_transformer
from pipeline import load_pipeline, read_model_info
from tiny import MAX_TEXT, make_snapshot


def write_clip(folder, name, frames, h, w, caption, seed=0):
    """A coloured square moving right on black, `frames` frames of h x w, with its caption file."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(64, 256, 3).astype(np.uint8)
    arr = np.zeros((frames, h, w, 3), np.uint8)
    for f in range(frames):
        x = (2 * f) % max(1, w - 12)
        arr[f, h // 3:h // 3 + 12, x:x + 12] = colour
    imageio.mimwrite(os.path.join(folder, name + ".mp4"), list(arr), fps=8, format="FFMPEG", macro_block_size=16)
    with open(os.path.join(folder, name + ".txt"), "w") as f:
        f.write(caption)


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return make_snapshot(str(tmp_path_factory.mktemp("snap")), "2b")


BUCKETS = "32x48x17,48x32x9"  # a landscape bucket of 17 frames, a portrait one of 9 (8k+1 for the tiny 2b)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Clips of two sizes and three lengths in one folder: two landscape 48x64 of 20 frames (-> 32x48x17), two
    portrait 64x48 of 12 frames (-> 48x32x9), a landscape one of 12 frames (too short for 32x48x17: -> 48x32x9, its
    aspect lost to its length) and a landscape one of 5 frames (too short for both: dropped)."""
    folder = str(tmp_path_factory.mktemp("mixed"))
    for i, (frames, h, w) in enumerate([(20, 48, 64), (20, 48, 64), (12, 64, 48), (12, 64, 48), (12, 48, 64)]):
        write_clip(folder, f"clip{i}", frames, h, w, f"a square moving right {i}", seed=i)
    write_clip(folder, "short", 5, 48, 64, "a short clip")
    return folder


def args_for(snap, data, out, *extra):
    return ["--model", snap, "--data", data, "--output", str(out), "--cache-dir", os.path.join(os.path.dirname(data),
            "cache"), "--rank", "4", "--alpha", "2", "--lr", "3e-2", "--warmup", "1", "--batch-size", "2", *extra]


# ---------------------------------------------------------------- buckets


def test_nearest_bucket_prefers_aspect_then_area_then_length_and_never_pads():
    buckets = [(480, 720, 49), (720, 480, 49), (768, 1360, 81), (480, 720, 81)]
    assert train_lora.nearest_bucket(100, 480, 720, buckets) == 3     # same size: the most frames that fit
    assert train_lora.nearest_bucket(60, 480, 720, buckets) == 0      # 81 would pad: never
    assert train_lora.nearest_bucket(60, 1080, 720, buckets) == 1     # portrait: the portrait bucket
    assert train_lora.nearest_bucket(90, 1080, 1920, buckets) == 2    # 16:9 -> 768x1360 (aspect before area)
    assert train_lora.nearest_bucket(60, 1080, 1920, buckets) == 0    # ... unless too short for it
    assert train_lora.nearest_bucket(48, 480, 720, buckets) is None   # shorter than every bucket


def test_micro_batches_come_from_one_bucket_and_one_bucket_is_the_plain_stream():
    groups = [[0, 1, 2, 3, 4], [5, 6], [7]]
    bucket = {i: b for b, g in enumerate(groups) for i in g}
    seen = []
    for m in range(3 + 1 + 1):  # one round: ceil(5/2) + ceil(2/2) + ceil(1/2) turns
        batch = train_lora.micro_batch(7, m, 2, groups)
        assert len(batch) == 2 and len({bucket[i] for i in batch}) == 1, batch
        assert batch == train_lora.micro_batch(7, m, 2, groups)  # a pure function: resume and torchrun rely on it
        seen += batch
    assert set(seen) == set(range(8))  # every clip within a round
    plain = [train_lora.dataset_index(7, p, 5) for p in range(20)]
    assert sum((train_lora.micro_batch(7, m, 4, [list(range(5))]) for m in range(5)), []) == plain


def test_clips_of_two_sizes_train_in_their_buckets(snap, mixed, tmp_path, capsys, monkeypatch):
    """The run reports clips per bucket and the dropped clip with why; the cache holds each clip's latents at its
    bucket's size (17 frames -> 5 latent frames of 4x6; 9 -> 3 of 6x4) and its shape under clips/, so a second
    listing decodes nothing; every batch stacks (one bucket each) and the loss is logged for each step."""
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    assert train_lora.main(args_for(snap, mixed, out, "--buckets", BUCKETS, "--steps", "4", "--cache-dir", cache,
                                    "--no-gradient-checkpointing")) == 0
    said = capsys.readouterr().out
    assert "clips per bucket: 32x48x17 2, 48x32x9 3; 1 dropped" in said, said
    assert "dropped short.mp4: 5 frames" in said and "shortest has 9" in said
    shapes = sorted(tuple(load_file(os.path.join(cache, "latents", n))["mean"].shape)
                    for n in os.listdir(os.path.join(cache, "latents")))
    assert shapes == [(3, 4, 6, 4)] * 3 + [(5, 4, 4, 6)] * 2, shapes
    assert len(os.listdir(os.path.join(cache, "clips"))) == 6  # the dropped clip's shape is kept too
    cli.check_folder(cache, "--cache-dir")  # every file in the cache is recorded as ours, so a later run may replace it
    assert [json.loads(x)["step"] for x in open(out / "loss.jsonl")] == [1, 2, 3, 4]

    info = read_model_info(snap)
    buckets = train_lora.parse_buckets(BUCKETS, info)
    settings = [train_lora.cache_settings(snap, f, h, w, MAX_TEXT, torch.float32) for h, w, f in buckets]
    monkeypatch.setattr(train_lora, "read_video", lambda *a: pytest.fail("a cached clip was decoded"))
    found = train_lora.sort_samples(*train_lora.find_samples(mixed), cache, settings, buckets, strict=False)
    assert [s.name for s, _, _ in found.good] == [f"clip{i}.mp4" for i in range(5)]
    assert found.bucket == [0, 0, 1, 1, 1] and len(found.dropped) == 1 and not found.problems
    assert all(os.path.isfile(train_lora.latent_path(cache, k)) for _, k, _ in found.good)
    one = [train_lora.cache_settings(snap, 9, 48, 32, MAX_TEXT, torch.float32)]
    alone = train_lora.sort_samples(*train_lora.find_samples(mixed), cache, one, [(48, 32, 9)], strict=False)
    assert alone.good[2][1] == found.good[2][1]  # the key is the bucket's, not the bucket list's
    assert found.good[0][1] != train_lora.cache_keys(found.good[0][0], train_lora.sha256_file(
        found.good[0][0].video), one[0])[0]  # another bucket, another key


def test_a_dataset_none_of_whose_clips_fits_a_bucket_is_refused(snap, tmp_path, capsys):
    """Every clip shorter than every bucket: exit 2 naming --buckets and the clip, and nothing written (not a run on
    zero samples)."""
    data = tmp_path / "short"
    data.mkdir()
    write_clip(str(data), "short", 5, 48, 64, "a short clip")
    rc = train_lora.main(args_for(snap, str(data), tmp_path / "out", "--buckets", BUCKETS, "--steps", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "--buckets" in err and "short.mp4" in err, err
    assert sorted(os.listdir(tmp_path)) == ["short"]  # no output folder, no cache


@pytest.mark.parametrize("buckets,extra,words", [
    ("32x48x8", [], ["--buckets 32x48x8", "8k+1", "9"]),
    ("32x40x9", [], ["--buckets 32x40x9", "width=40", "multiple of 16"]),
    ("32x48", [], ["--buckets '32x48'", "HEIGHTxWIDTHxFRAMES"]),
    ("32x48x9,", [], ["--buckets ''", "HEIGHTxWIDTHxFRAMES"]),
    ("32x48x9,32X48x9", [], ["32X48x9", "twice"]),
    ("32x48x9", ["--height", "32"], ["--buckets", "--height"]),
], ids=["frames", "width", "format", "empty", "twice", "with-height"])
def test_bad_buckets_are_refused_in_one_line_before_any_weight_is_read(snap, mixed, tmp_path, capsys, monkeypatch,
                                                                       buckets, extra, words):
    for name in ("load_transformer", "load_vae", "load_text_encoder", "read_video"):
        monkeypatch.setattr(train_lora, name, lambda *a, **k: pytest.fail("read before --buckets was checked"))
    rc = train_lora.main(args_for(snap, mixed, tmp_path / "out", "--buckets", buckets, *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not os.path.exists(tmp_path / "out")


def test_a_learned_position_table_allows_only_its_size(tmp_path):
    info = read_model_info(make_snapshot(str(tmp_path / "i2v"), "5b-i2v"))
    assert train_lora.parse_buckets("32x32x9, 32x32x17", info) == [(32, 32, 9), (32, 32, 17)]
    with pytest.raises(ValueError, match=r"--buckets 48x32x9: .* 32x32 only; every bucket must be 32x32xFRAMES"):
        train_lora.parse_buckets("32x32x9,48x32x9", info)


# ---------------------------------------------------------------- full fine-tuning


@pytest.fixture(scope="module")
def full_run(snap, mixed, tmp_path_factory):
    """4 steps of --full over both buckets (gradient checkpointing on, the default), patch_embed frozen, a checkpoint
    every 2 steps."""
    out = tmp_path_factory.mktemp("full")
    assert train_lora.main(args_for(snap, mixed, out, *FULL)) == 0
    return str(out)


FULL = ["--full", "--freeze", "patch_embed", "--lr", "1e-3", "--steps", "4", "--checkpoint-every", "2",
        "--buckets", BUCKETS]


def weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_full_fine_tuning_writes_the_official_layout_and_keeps_the_frozen_weights(snap, full_run):
    assert sorted(os.listdir(full_run)) == [".cogvideox-mini.json", "checkpoint-000002", "checkpoint-000004",
                                            "loss.jsonl", "transformer"]
    assert sorted(os.listdir(os.path.join(full_run, "checkpoint-000002"))) == [
        ".cogvideox-mini.json", "training_state.pt", "transformer"]
    config = lambda folder: json.load(open(os.path.join(folder, "transformer", "config.json")))
    assert config(full_run) == config(snap)
    base, tuned = weights(snap), weights(full_run)
    assert set(tuned) == set(base) and all(v.dtype == torch.float32 for v in tuned.values())
    same = {k for k in base if torch.equal(base[k].float(), tuned[k])}
    assert {k for k in base if k.startswith("patch_embed.")} <= same  # frozen
    assert not any(k.startswith("transformer_blocks.0.") for k in same), sorted(same)  # trained
    assert all(torch.equal(tuned[k], b) for k, b in weights(os.path.join(full_run, "checkpoint-000004")).items())


def test_full_resume_equals_the_uninterrupted_run(snap, mixed, full_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(full_run, copy, ignore=shutil.ignore_patterns("checkpoint-000004", "transformer"))
    shutil.copytree(os.path.join(full_run, "checkpoint-000002"), copy / "checkpoint-000002", dirs_exist_ok=True)
    assert train_lora.main(args_for(snap, mixed, copy, *FULL, "--resume", "latest")) == 0
    said, bar = capsys.readouterr()
    assert str(copy / "checkpoint-000002") in said and "patch_embed" in said  # what trains: all but the frozen
    assert "2/4" in bar and "4/4" in bar  # the progress bar starts at the resumed step and counts to --steps,
    assert re.search(r"loss=[0-9]", bar) and re.search(r"lr=[0-9]", bar)  # showing the loss and the learning rate
    a, b = weights(full_run), weights(str(copy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(copy / "loss.jsonl").read() == open(os.path.join(full_run, "loss.jsonl")).read()
    # another frozen list, or LoRA on a full run's checkpoint, is refused, naming what changed
    assert train_lora.main(args_for(snap, mixed, copy, *FULL, "--freeze", "time_embedding", "--resume", "latest")) == 2
    assert "--freeze was patch_embed" in capsys.readouterr().err
    assert train_lora.main(args_for(snap, mixed, copy, *FULL[3:], "--resume", "latest")) == 2
    assert "--full was True" in capsys.readouterr().err
    # a --full resume from a checkpoint without the transformer's weights (a LoRA run's) is refused, naming --resume
    shutil.rmtree(copy / "checkpoint-000002" / "transformer")
    assert train_lora.main(args_for(snap, mixed, copy, *FULL, "--resume", str(copy / "checkpoint-000002"))) == 2
    assert "--resume" in capsys.readouterr().err


def test_full_fine_tune_loads_in_diffusers_from_pretrained_with_our_outputs(snap, full_run, tmp_path):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.utils import logging
    logging.set_verbosity_error()
    peer = CogVideoXTransformer3DModel.from_pretrained(os.path.join(full_run, "transformer")).eval()
    ours, base = load_transformer(os.path.join(full_run, "transformer")), load_transformer(snap)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, MAX_TEXT, 32, generator=g)  # (B, F, C, H, W)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = peer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        out, before = ours(x, text, t), base(x, text, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - before).abs().max() > 1e-2  # the fine-tune changed the model
    # the README's recipe for generate.py: the base's other components linked beside it make a snapshot
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for name in os.listdir(snap):
        source = os.path.join(full_run if name == "transformer" else snap, name)
        os.symlink(source, tuned / name)
    with torch.no_grad():
        assert torch.equal(load_pipeline(str(tuned)).transformer(x, text, t), out)


def test_a_full_run_in_bf16_renders_its_validation_prompt(snap, mixed, tmp_path):
    """--full keeps fp32 master weights and computes in --dtype: its validation render runs the fp32 transformer under
    bf16 autocast beside T5 and the VAE in bf16 (without autocast the bf16 text states meet fp32 weights and fail)."""
    out = tmp_path / "run"
    assert train_lora.main(args_for(snap, mixed, out, "--full", "--steps", "1", "--dtype", "bf16", "--buckets", BUCKETS,
                                    "--validation-prompt", "a square moving right", "--validate-every", "1",
                                    "--cache-dir", str(tmp_path / "cache"))) == 0
    video = imageio.v3.imread(out / "validation" / "step-000001.mp4", index=None)
    assert video.shape[0] > 1 and video.std() > 1
    cli.check_folder(str(out), "--output")  # the renders are recorded as ours: a rerun may replace them
    cached = [load_file(os.path.join(b, f)) for b, _, fs in os.walk(tmp_path / "cache") for f in fs
              if f.endswith(".safetensors")]  # encoded in --dtype: half the disk of fp32
    assert cached and {t.dtype for c in cached for t in c.values()} == {torch.bfloat16}


def test_a_full_bf16_run_keeps_fp32_master_weights(snap, mixed, tmp_path):
    """--full --dtype bf16 computes in bf16 but trains and saves fp32 weights: one step at lr 1e-6 moves each trained
    weight by about 1e-6 (Adam's first step is lr * sign(gradient)), which bf16 weights (a step of ~1e-4 at 0.02)
    would round away, and loading them in bf16 would move every weight by up to that much."""
    out = tmp_path / "run"
    assert train_lora.main(args_for(snap, mixed, out, "--full", "--steps", "1", "--dtype", "bf16", "--lr", "1e-6",
                                    "--warmup", "0", "--buckets", BUCKETS, "--cache-dir", str(tmp_path / "cache"))) == 0
    base, tuned = load_transformer(snap).state_dict(), load_transformer(str(out / "transformer")).state_dict()
    moved = max((tuned[k] - base[k]).abs().max().item() for k in base)
    assert 0 < moved <= 1e-5, moved


def test_freeze_is_checked_before_any_weight_is_read(snap):
    info = read_model_info(snap)
    assert train_lora.check_freeze("patch_embed, *.norm1.*", info) == ["patch_embed", "*.norm1.*"]
    with pytest.raises(ValueError, match="--freeze 'patch_embd' matches no transformer parameter"):
        train_lora.check_freeze("patch_embed,patch_embd", info)
    with pytest.raises(ValueError, match="freezes every parameter"):
        train_lora.check_freeze("*", info)
    args = train_lora.parse_args(["--model", snap, "--data", "d", "--freeze", "patch_embed"])
    with pytest.raises(ValueError, match="add --full"):
        train_lora.check_args(args, info, 1)
    assert train_lora.parse_args(["--model", "m", "--data", "d", "--full"]).lr == 2e-5


def test_image_to_video_trains_in_buckets(snapshots, tmp_path, capsys):
    """1.5-I2V (patch_size_t 2, ofs) on clips of two sizes: each clip's conditioning frame is encoded at its bucket's
    size, and its zero-padded condition has its bucket's latent length, so both buckets train."""
    data = str(tmp_path / "clips")
    os.makedirs(data)
    for i, (h, w) in enumerate([(48, 64), (48, 64), (64, 48), (64, 48)]):
        write_clip(data, f"clip{i}", 20, h, w, f"a square moving right {i}", seed=i)
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    assert train_lora.main(args_for(snapshots("1.5-i2v"), data, out, "--buckets", "32x48x17,48x32x17", "--steps", "2",
                                    "--cache-dir", cache, "--no-gradient-checkpointing")) == 0
    assert "clips per bucket: 32x48x17 2, 48x32x17 2; 0 dropped" in capsys.readouterr().out
    images = sorted(tuple(load_file(os.path.join(cache, "latents", n))["image_mean"].shape)
                    for n in os.listdir(os.path.join(cache, "latents")))
    assert images == [(4, 4, 6)] * 2 + [(4, 6, 4)] * 2, images
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
