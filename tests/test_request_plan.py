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
