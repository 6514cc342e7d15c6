"""evaluate.py as a user meets it: every bad value refused with one line and exit status 2 before any video is made,
Ctrl-C one line and 130, a progress bar over the videos, --help with every default."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if a video is generated: the refusals come first."""
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("a video was generated"))


@pytest.mark.parametrize("argv, flag", [
    (["--per-combo", "0"], "--per-combo"), (["--steps", "0"], "--steps"), (["--threads", "0"], "--threads"),
    (["--guidance", "-1"], "--guidance"), (["--steps", "ten"], "--steps"), (["--device", "cuda:9"], "--device"),
    (["--device", "foo"], "--device"), (["--model", "EMPTY"], "EMPTY"), (["--model", "CORRUPT"], "CORRUPT"),
    (["--model", "MISSING"], "MISSING"), (["--sets", "test"], "--sets")])
def test_every_bad_value_is_one_line_and_exit_2(argv, flag, tmp_path, no_generation, capsys):
    (tmp_path / "EMPTY").mkdir()
    shutil.copytree(generate.DEMO_MODEL, tmp_path / "CORRUPT")
    weights = tmp_path / "CORRUPT" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    try:
        code = evaluate.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and flag in err[0], err


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "generate", interrupted)
    assert evaluate.main(["--steps", "1", "--threads", "1"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("interrupted")]


def test_progress_bar_over_the_videos_and_the_table():
    """A fresh process, as a user runs it: a tqdm bar counting every video (28 held-out prompts x 1), then the
    table on stdout."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--sets", "held-out", "--steps", "1",
                        "--threads", "1"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"videos: 100%\|.*\| 28/28 ", r.stderr), r.stderr[-2000:]
    assert "held-out" in r.stdout and "colour" in r.stdout


def test_help_shows_every_default_and_unit(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("videos per prompt (default: 1)", "DDIM steps per video (default: 50)", "(default: 6.0)",
                   "(default: 2)", "(default: cpu)", "bundled demo model", "(default: ['held-out', 'train'])"):
        assert needle in text, needle


def test_psnr_and_ssim_known_values():
    """PSNR of a uniform error of 0.1 is 10 log10(1 / 0.01) = 20 dB. For flat frames, SSIM is its luminance term
    alone: (2 a b + C1) / (a^2 + b^2 + C1), 0.80006... for 0.5 against 0.25; equal videos give 1 and inf."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 0.8  # (F, 3, H, W)
    assert evaluate.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-5)  # x + 0.1 rounds in float32
    assert evaluate.psnr(x, x) == float("inf") and evaluate.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    a, b, c1 = 0.5, 0.25, 0.01 ** 2
    flat = torch.full((2, 3, 16, 16), a), torch.full((2, 3, 16, 16), b)
    assert evaluate.ssim(*flat) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    # more noise, less similar
    noisy = [evaluate.ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] > 0
