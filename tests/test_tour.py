"""tour.py (the guided tour) and the hooks of bench/ablations.py (the ablation cookbook), on the shipped demo model.

The tour must be the real generation: its frames equal generate()'s for the same seed, every shape it prints is
the shape of a real tensor of the run, and those shapes follow from the configs by the patching arithmetic below,
computed here independently of the tour."""
import os
import re
import sys

import imageio.v3 as iio
import pytest
import torch

import evaluate
import model
import tour
from generate import DEMO_MODEL, generate, load_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import ablations  # noqa: E402  (bench/ablations.py)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(DEMO_MODEL)


def expected_shapes(pipe):
    """Every shape the tour prints, from the transformer/VAE configs and the demo's frame size alone, in the order the
    generation computes them (the tour prints each stage as it runs)."""
    c, info = pipe.transformer.config, pipe.info
    L, C, p, D, E = c.max_text_seq_length, c.out_channels, c.patch_size, c.num_attention_heads * c.attention_head_dim, \
        c.time_embed_dim
    lf = (info.num_frames - 1) // info.temporal_compression + 1                    # 9 frames -> 3 latent frames
    h, w = info.height // info.spatial_compression, info.width // info.spatial_compression
    N = lf * (h // p) * (w // p)                                                    # 3 x 4 x 4 = 48 video tokens
    S, heads, d = L + N, c.num_attention_heads, c.attention_head_dim
    latent = (1, lf, C, h, w)
    # the VAE decodes 2 latent frames per batch, the remainder joining the first; batch 0 decodes to 1 + 4(k - 1)
    # frames (the causal first frame stands alone), the others to 4k
    sizes = [2 + lf % 2] + [2] * (lf // 2 - 1) if lf >= 2 else [lf]
    shapes = {"ids": (2, L), "text": (2, L, c.text_embed_dim), "latents": latent,
              "patches": (2, N, C * p * p), "video tokens": (2, N, D), "text tokens": (2, L, D),
              "rope cos, sin": (S, 1, d // 2), "timestep sinusoid": (2, D), "emb": (2, E), "modulations": (6, 2, 1, D),
              "attention input": (2, S, D), "q, k, v": (2, heads, S, d), "attention probs": (2, heads, S, S),
              "block video out": (2, N, D), "block text out": (2, L, D), "proj_out": (2, N, p * p * C),
              "prediction": (2, lf, C, h, w), "uncond, cond": latent, "guided": latent, "x0 estimate": latent,
              "x next": latent, "final latents": latent}
    for j, k in enumerate(sizes):
        shapes[f"decoder batch {j} in"] = (1, C, k, h, w)
        shapes[f"decoder batch {j} out"] = (1, 3, 1 + 4 * (k - 1) if j == 0 else 4 * k, info.height, info.width)
    shapes["frames"] = (1, info.num_frames, 3, info.height, info.width)
    return shapes


def test_tour_prints_the_real_shapes_and_generates_what_generate_does(pipe, tmp_path, capsys):
    attention = model.attention
    result = tour.main(["--out", str(tmp_path), "--threads", "1"])
    printed = capsys.readouterr().out
    assert list(result["shapes"].items()) == list(expected_shapes(pipe).items())   # the same shapes, in run order
    for name, shape in result["shapes"].items():       # each printed beside its name, as recorded from the tensor
        assert re.search(rf"^    {re.escape(name)}\s+{re.escape(str(shape))}\s", printed, re.M), name
    for where in ("text_encoder.py:Tokenizer.__call__", "text_encoder.py:T5Encoder.forward", "model.py:patchify",
                  "model.py:CogVideoXTransformer.rope", "model.py:Block.forward", "LayerNormZero.forward",
                  "sampler.py:guidance", "sampler.py:Sampler.step", "vae.py:",
                  f"{tour.decode_latents.__module__}.py:decode_latents"):  # wherever generate's helpers live
        assert where in printed, where
    assert "prompt tokens: ▁a:" in printed and "▁circle" in printed

    frames = generate(pipe, tour.PROMPT, seed=42, max_sequence_length=pipe.transformer.config.max_text_seq_length,
                      progress=False)
    assert torch.equal(result["frames"], frames)       # the tour is the generation, not an imitation of it

    # the hooks are back as they were
    assert model.attention is attention and "rope" not in vars(pipe.transformer)

    info, cell = pipe.info, 2 * pipe.info.height
    lf = (info.num_frames - 1) // info.temporal_compression + 1
    L = pipe.transformer.config.max_text_seq_length
    size = lambda rows, cols: (tour.TITLE_H + tour.HEAD_H + rows * (cell + tour.GAP),   # noqa: E731
                               tour.LABEL_W + cols * (cell + tour.GAP), 3)
    x0, attention = (iio.imread(p) for p in result["pngs"])
    assert result["pngs"] == [str(tmp_path / "x0.png"), str(tmp_path / "attention.png")]
    assert x0.shape == size(7, info.num_frames)        # 7 steps x 9 frames
    assert attention.shape == size(lf, 1 + L)          # latent frames x (the video + one column per text token)
    assert x0.std() > 20 and attention.std() > 20      # pictures, not blank canvases
    assert sorted(os.listdir(tmp_path)) == [".cogvideox-mini.json", "attention.png", "x0.png"]  # no temporary files
    assert 0 < float(result["attention"].sum()) <= 1


def test_patched_restores_methods_modules_and_module_attributes(pipe):
    blocks = pipe.transformer.transformer_blocks
    with tour.patched(pipe.transformer, "rope", lambda *a: None):
        assert pipe.transformer.rope() is None
    assert "rope" not in vars(pipe.transformer) and pipe.transformer.rope.__func__ is model.CogVideoXTransformer.rope
    with tour.patched(pipe.transformer, "transformer_blocks", blocks[:1]):
        assert len(pipe.transformer.transformer_blocks) == 1
    assert pipe.transformer.transformer_blocks is blocks
    inner = model.attention
    with pytest.raises(RuntimeError), tour.patched(model, "attention", None):
        raise RuntimeError("restored on errors too")
    assert model.attention is inner


def test_every_cookbook_ablation_changes_the_video_and_is_undone(pipe):
    """Each row of docs/ablations.md really changes what generate() makes, through evaluate.generate (the name
    evaluate_model calls), and leaves nothing behind."""
    kw = dict(num_inference_steps=3, seed=0, max_sequence_length=pipe.transformer.config.max_text_seq_length,
              progress=False)
    caption = "a green triangle moving down on a black background"
    base = generate(pipe, caption, **kw)
    hooks = (model.attention, pipe.transformer.transformer_blocks, evaluate.generate)
    for a in ablations.ABLATIONS:
        with a.applied(pipe):
            frames = evaluate.generate(pipe, caption, guidance_scale=a.guidance, **kw)
        assert (a.name == "baseline") == torch.equal(frames, base), a.name
        assert (model.attention, pipe.transformer.transformer_blocks, evaluate.generate) == hooks
        assert "rope" not in vars(pipe.transformer)
    assert torch.equal(generate(pipe, caption, **kw), base)
    assert ablations.shape_swapped(caption) == "a green circle moving down on a black background"
    held_out, train = ablations.prompt_sets()
    assert (len(held_out), len(train), len(set(train))) == (28, 84, 84)


def test_short_runs_refusals_and_reruns(pipe, tmp_path, capsys):
    """--steps 1 runs with the default pictures (the middle step is step 0); without guidance (a batch of one) the
    frames are generate()'s too; a step, block or head out of range is refused by its flag before the model is loaded
    (never clamped); --help says each default once; a re-run replaces the tour's own pictures and leaves a user's file
    beside them."""
    import subprocess
    out = tmp_path / "tour"
    result = tour.main(["--steps", "1", "--out", str(out), "--threads", "1"])
    assert [os.path.basename(p) for p in result["pngs"]] == ["x0.png", "attention.png"]
    (out / "notes.txt").write_text("the user's\n")
    result = tour.main(["--steps", "2", "--guidance", "1", "--out", str(out), "--threads", "1"])
    assert (out / "notes.txt").read_text() == "the user's\n"
    assert sorted(os.listdir(out)) == [".cogvideox-mini.json", "attention.png", "notes.txt", "x0.png"]
    assert torch.equal(result["frames"], generate(pipe, tour.PROMPT, num_inference_steps=2, guidance_scale=1, seed=42,
                       max_sequence_length=pipe.transformer.config.max_text_seq_length, progress=False))
    for argv, flag in ((["--show-steps", "99"], "--show-steps 99"), (["--steps", "5", "--attn-step", "5"],
                       "--attn-step 5"), (["--attn-block", "99"], "--attn-block 99"), (["--attn-head", "-1"],
                       "--attn-head -1")):
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tour.py"),
                            *argv, "--out", str(tmp_path / "never")], capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and flag in lines[0] and "loaded" not in r.stdout, r
    assert not (tmp_path / "never").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tour.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]
    model_help = text[text.index("--model MODEL"):text.index("--prompt PROMPT")]
    assert model_help.count("default") == 1, model_help
