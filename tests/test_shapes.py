"""The moving-shapes data set: determinism, the held-out split, and an evaluator that reads clean clips right and
blank or noisy video wrong."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shapes


def _blur(videos, sigma):
    """Gaussian blur of uint8 (N, F, H, W, 3) videos over H and W, edges replicated; float (N, F, H, W, 3)."""
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 2r+1), one kernel per channel
    x = torch.as_tensor(videos).float().movedim(-1, -3).flatten(0, 1)  # (N*F, 3, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=3)
    return x.unflatten(0, videos.shape[:2]).movedim(-3, -1).numpy()


def test_render_is_deterministic_from_seed():
    train, _ = shapes.split()
    a, ca = shapes.make_clips(20, seed=3, attrs_list=train)
    b, cb = shapes.make_clips(20, seed=3, attrs_list=train)
    c, cc = shapes.make_clips(20, seed=4, attrs_list=train)
    assert a.shape == (20, 9, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c) and ca != cc
    # the same attributes from two generators seeded alike give the same clip, from different seeds another one
    attrs = shapes.parse_caption("a red circle moving right on a black background")
    r1 = shapes.render(attrs, np.random.default_rng(7))
    assert np.array_equal(r1, shapes.render(attrs, np.random.default_rng(7)))
    assert not np.array_equal(r1, shapes.render(attrs, np.random.default_rng(8)))


def test_render_draws_what_the_caption_says():
    attrs = shapes.parse_caption("a red circle moving right on a black background")
    v = shapes.render(attrs, np.random.default_rng(0)).astype(int)  # (F, H, W, 3)
    on = (v[..., 0] > 127) & (v[..., 1] < 10) & (v[..., 2] < 10)  # (F, H, W) red pixels
    off = v.sum(-1) == 0
    assert (on | off).mean() > 0.97  # the rest is the anti-aliased edge
    area = on.sum((1, 2))
    assert np.all((np.pi * 8.5 ** 2 < area) & (area < np.pi * 14.5 ** 2))
    cx = (on * np.arange(64)).sum((1, 2)) / area
    cy = (on * np.arange(64)[:, None]).sum((1, 2)) / area
    assert np.all(np.diff(cx) > 1.8) and np.all(np.diff(cx) < 3.2)  # 2-3 px per frame, rightwards
    assert np.ptp(cy) < 0.5
    for t in range(9):  # the whole shape stays inside the frame
        assert not (on[t, 0].any() or on[t, -1].any() or on[t, :, 0].any() or on[t, :, -1].any())


def test_caption_round_trip_and_errors():
    train, held = shapes.split()
    for a in train + held:
        assert shapes.parse_caption(shapes.caption(a)) == a
    assert shapes.caption(shapes.Attrs("red", "circle", "right", "black")) == \
        "a red circle moving right on a black background"
    with pytest.raises(ValueError, match="purple"):
        shapes.parse_caption("a purple circle moving right on a black background")
    with pytest.raises(ValueError, match="not of the form"):
        shapes.parse_caption("a red circle")


def test_held_out_split():
    train, held = shapes.split()
    every = [shapes.Attrs(*t) for t in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.MOTIONS,
                                                          shapes.BACKGROUNDS) if t[0] != t[3]]
    assert sorted(train + held) == sorted(every) and not set(train) & set(held)
    assert not any(a.colour == a.background for a in every)  # no white circle on white
    combos = lambda attrs: {a[:3] for a in attrs}  # colour, shape, motion
    assert not combos(train) & combos(held)
    n = len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.MOTIONS)
    assert 0.15 <= len(combos(held)) / n <= 0.2
    # composition: every value and every pair of values of a held-out combination is seen in training
    for i, j in itertools.combinations(range(3), 2):
        seen = {(a[i], a[j]) for a in train}
        assert all((h[i], h[j]) in seen for h in combos(held)), (i, j)
    for i, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.MOTIONS, shapes.BACKGROUNDS)):
        assert {a[i] for a in train} == set(values)
    # every held-out combination is evaluated on every background it can be drawn on
    assert len(held) == sum(len(shapes.BACKGROUNDS) - (c in shapes.BACKGROUNDS) for c, _, _ in combos(held))
    assert shapes.parse_caption("a red circle moving right on a black background") in train


@pytest.mark.parametrize("which", ["train", "held-out"])
def test_evaluator_reads_clean_clips(which):
    train, held = shapes.split()
    videos, captions = shapes.make_clips(300, seed=1, attrs_list=train if which == "train" else held)
    table = shapes.evaluate(videos, captions)
    assert table["n"] == 300
    for k in ("colour", "shape", "motion", "background", "all"):
        assert table[k] >= 0.98, (k, table)


def test_new_colour_is_known_to_captions_and_evaluator_but_never_trained():
    # the LoRA lesson's colour: no training or held-out clip has it, every clip asked for it is read as it, and the
    # colours next to it in RGB (blue, green, white) are not read as it
    train, held = shapes.split()
    assert not {a.colour for a in train + held} & set(shapes.NEW_COLOURS)
    lesson = [shapes.Attrs("cyan", s, m, b) for s in shapes.SHAPES for m in shapes.MOTIONS for b in shapes.BACKGROUNDS]
    assert shapes.parse_caption("a cyan square moving up on a white background") == ("cyan", "square", "up", "white")
    videos, captions = shapes.make_clips(72, seed=3, attrs_list=lesson)
    assert np.abs(videos.astype(int) - [0, 255, 255]).sum(-1).min() == 0  # pure cyan pixels are drawn
    table = shapes.evaluate(videos, captions)
    assert table["colour"] == 1.0 and table["all"] >= 0.98, table
    near = [a._replace(colour=c) for a in lesson for c in ("blue", "green", "white") if c != a.background]
    videos, captions = shapes.make_clips(72, seed=4, attrs_list=near)
    assert shapes.evaluate(videos, captions)["colour"] == 1.0


def test_evaluator_reads_softened_clips():
    # a VAE and a sampler blur edges and add speckle; the evaluator must not call that a different shape
    train, _ = shapes.split()
    videos, captions = shapes.make_clips(100, seed=2, attrs_list=train)
    noise = np.random.default_rng(0).normal(0, 8, videos.shape)
    soft = np.clip(_blur(videos, 1.5) + noise, 0, 255).round().astype(np.uint8)
    table = shapes.evaluate(soft, captions)
    for k in ("colour", "shape", "motion", "background"):
        assert table[k] >= 0.95, (k, table)


def test_evaluator_reads_other_clip_sizes():
    cfg = shapes.ClipConfig(num_frames=5, height=48, width=80)
    train, _ = shapes.split()
    videos, captions = shapes.make_clips(60, seed=5, attrs_list=train, cfg=cfg)
    assert videos.shape == (60, 5, 48, 80, 3)
    assert shapes.evaluate(videos, captions, cfg)["all"] >= 0.98
    with pytest.raises(ValueError, match="does not fit"):
        shapes.ClipConfig(num_frames=17)


def test_measure_locates_the_object():
    """The centroids measure() reads are the rendered shape's (the I2V lesson's "starts where the image's object
    is", within 4 px): within 1.5 px of the centroid of the pixels the shape covers (the half-coverage mask rounds
    its edge; up to 1.2 px measured on gray backgrounds), for every shape, frame and background; a blank video has
    no object in any frame."""
    train, _ = shapes.split()
    videos, captions = shapes.make_clips(30, seed=9, attrs_list=train)
    for v, c in zip(videos, captions):
        a = shapes.parse_caption(c)
        pred, cx, cy, found = shapes.measure(v)
        assert pred == a and found.all()
        bg = np.array(shapes.BACKGROUNDS[a.background]) * 255
        cover = np.abs(v.astype(float) - bg).sum(-1) / np.abs(np.array(shapes.COLOURS[a.colour]) * 255 - bg).sum()
        w = cover.sum((1, 2))  # (F,) the shape's area, anti-aliased edge included
        tx = (cover * (np.arange(64) + 0.5)).sum((1, 2)) / w
        ty = (cover * (np.arange(64)[:, None] + 0.5)).sum((1, 2)) / w
        assert np.abs(cx - tx).max() < 1.5 and np.abs(cy - ty).max() < 1.5, (c, cx - tx, cy - ty)
    pred, cx, cy, found = shapes.measure(np.zeros_like(videos[0]))
    assert pred.shape is None and not found.any()


def test_evaluator_is_not_fooled():
    train, _ = shapes.split()
    videos, captions = shapes.make_clips(60, seed=6, attrs_list=train)
    rng = np.random.default_rng(0)
    blank = np.zeros_like(videos)
    gray = np.full_like(videos, 128)
    noise = rng.integers(0, 256, videos.shape, dtype=np.uint8)
    still = np.repeat(videos[:, :1], videos.shape[1], axis=1)  # the right object, not moving
    for name, fake in (("blank", blank), ("gray", gray), ("noise", noise), ("still", still)):
        table = shapes.evaluate(fake, captions)
        assert table["motion"] == 0 and table["all"] == 0, (name, table)
        if name != "still":
            assert table["colour"] == 0 and table["shape"] == 0, (name, table)
    # a clean clip scored against a caption that differs in one attribute is wrong on that attribute only
    options = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "motion": shapes.MOTIONS}
    for v, c in zip(videos[:20], captions[:20]):
        a = shapes.parse_caption(c)
        for k, values in options.items():
            other = next(x for x in values if x != getattr(a, k) and x != a.background)
            score = shapes.score_video(v, a._replace(**{k: other}))
            assert not score[k] and all(score[j] for j in score if j != k), (c, k, other)


def test_tensor_round_trip():
    # no speed assertion (#38): how long making clips takes depends on the machine, not on the code under test
    train, _ = shapes.split()
    videos, _ = shapes.make_clips(4, seed=0, attrs_list=train)
    x = shapes.to_tensor(videos[:4])
    assert x.shape == (4, 9, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert np.array_equal(shapes.from_tensor(x), videos[:4])


def test_print_table(capsys):
    train, held = shapes.split()
    results = {name: shapes.evaluate(*shapes.make_clips(10, seed=0, attrs_list=a)) for name, a in
               (("train", train), ("held-out", held))}
    shapes.print_table(results)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| set | n | colour | shape | motion | background | all | shape: circle / square / triangle |"
    assert out[2].startswith("| train | 10 | 100.0%") and out[3].startswith("| held-out | 10 | 100.0%")
    assert out[2].endswith(" | 100 / 100 / 100 |") and out[1].count("|") == out[2].count("|")
    # per asked shape: a video asked for a square but drawn as a circle counts against squares only
    video = shapes.render(shapes.Attrs("red", "circle", "up", "black"), np.random.default_rng(0))
    r = shapes.evaluate(np.stack([video, video]), ["a red circle moving up on a black background",
                                                   "a red square moving up on a black background"])
    assert r["shape_of"] == {"circle": 1.0, "square": 0.0} and r["shape"] == 0.5
