"""Gaps found by rerunning bench/MUTANTS.md's mutants on issue 34's moved code (generate.plan): behaviour the rest of
the suite left untested because every test ran at the tiny snapshots' own text length."""
import torch

from generate import generate, load_pipeline
from test_generate import PROMPT, check, peer_pipeline
from tiny import MAX_TEXT


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


def test_negative_prompts_must_pair_with_the_prompts():
    """plan() takes one negative prompt per prompt, or one string for all; a list of another length (or no prompt at
    all) is refused before anything is read (plan 21: only the empty prompt list was refused). Real configs, no
    weights."""
    import pytest
    import generate as gen
    from model import PRESETS as T
    from pipeline import model_info
    from sampler import PRESETS as S
    from vae import PRESETS as V
    info = model_info("2b", T["cogvideox-2b"], V["cogvideox-2b"], S["cogvideox-2b"])
    for prompts, negatives in ((["a", "b"], ["x"]), (["a"], ["x", "y"]), ([], "")):
        with pytest.raises(ValueError):
            gen.plan(info, prompts, negative_prompt=negatives)
    assert [job.negatives for job in gen.plan(info, ["a", "b"], negative_prompt=["x", "y"]).jobs] == [["x", "y"]]
    assert [job.negatives for job in gen.plan(info, ["a", "b"], negative_prompt="x").jobs] == [["x", "x"]]


def test_plan_without_arguments_is_the_documented_default_run():
    """plan() called with a prompt alone (as train_lora's validation render calls it) plans the README's default run:
    one video, DDIM over 50 steps, guidance 6 without the dynamic schedule, seed 42, no tiling, no step cache, the
    model's own frames, size and text length (plan 9: two videos per prompt went unseen, since the render keeps the
    first, which equals a single video's)."""
    import generate as gen
    from model import PRESETS as T
    from pipeline import model_info
    from sampler import PRESETS as S, make_sampler
    from vae import PRESETS as V
    info = model_info("2b", T["cogvideox-2b"], V["cogvideox-2b"], S["cogvideox-2b"])
    r = gen.plan(info, "p")
    assert (r.num_videos, r.guidance_scale, r.use_dynamic_cfg, r.tiled, r.step_cache) == (1, 6.0, False, False, None)
    assert (r.num_frames, r.height, r.width, r.text_length) == (49, 480, 720, 226)
    assert [(j.prompts, j.negatives, j.seed) for j in r.jobs] == [(["p"], [""], 42)]
    ddim = make_sampler("ddim", info.scheduler, 50)
    assert r.sampler.solver == "ddim" and r.sampler.num_steps == 50 and r.sampler.timesteps == ddim.timesteps
