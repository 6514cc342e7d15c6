"""The command lines as a user meets them, each run in its own process on a temporary folder.

- Nothing of the user's is destroyed: an existing folder holding a sentinel survives every output mode of every CLI,
  and so does a file at every derived path (contact sheet, numbered videos, prompt-file outputs); what this project
  wrote is replaced, so the README command runs twice.
- Every bad value is refused before work starts: exit status 2, one line on stderr, the folder unchanged.
- Ctrl-C mid-denoise: exit 130, one line, no stray file.
- The README's Python example and the README's command give the same frames; a prompt file split over two torchrun
  processes gives the same files as one process.
The bad-value cases run a few processes at a time: each spends most of its ~3 s importing torch.
"""
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import cli
import generate
from generate import DEMO_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle moving right on a black background"
FAST = ["--steps", "2"]


def run(tool, *args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, tool), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tree(folder) -> dict:
    """Every file and folder below `folder` -> a digest of its bytes (None for folders), to compare before/after."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), folder)] = None
        for f in files:
            p = os.path.join(base, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress bars (they redraw with \\r)."""
    parts = re.split(r"[\r\n]+", stderr)
    return [p for p in parts if p.strip() and not re.search(r"\d+/\d+ \[|it/s|s/it", p)]


def assert_refused(r, needle: str):
    lines = error_lines(r.stderr)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr[-2000:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a user's files in it, and inputs for the bad-value cases."""
    d = tmp_path_factory.mktemp("user")
    (d / "outputs").mkdir()
    (d / "outputs" / "sentinel.txt").write_text("the user's\n")
    (d / "notes.txt").write_text("not a LoRA, not a video\n")
    (d / "empty.txt").write_text("\n# only a comment\n")
    video = (np.random.default_rng(0).random((9, 64, 64, 3)) * 255).astype(np.uint8)
    iio.imwrite(d / "in.mp4", video, fps=8)
    iio.imwrite(d / "first.png", video[0])
    (d / "clips").mkdir()
    (d / "not-a-snapshot").mkdir()
    return d


# ----------------------------------------------------------------------------------------------------------------------
# Bad values: exit 2, one line, nothing written. Each case: (tool, args, what the line must name)

G, E, T, C, S = "generate.py", "edit.py", "train_lora.py", "convert.py", "train_tiny.py"
LORA_ARGS = ["--model", DEMO_MODEL, "--data", "clips"]
BAD = [
    (G, ["--num-frames", "0"], "--num-frames: 0 is out of range"),
    (G, ["--num-frames", "10"], "num_frames=10 is not valid"),
    (G, ["--height", "0"], "--height: 0 is out of range"),
    (G, ["--width", "719"], "--width: 719 is out of range"),
    (G, ["--fps", "0"], "--fps: 0 is out of range"),
    (G, ["--fps", "-3"], "--fps: -3 is out of range"),
    (G, ["--fps", "fast"], "'fast' is not a number"),
    (G, ["--steps", "0"], "--steps: 0 is out of range"),
    (G, ["--steps", "1001"], "num_steps=1001"),
    (G, ["--guidance", "-5"], "--guidance: -5 is out of range"),
    (G, ["--guidance", "nan"], "--guidance: nan is out of range"),
    (G, ["--seed", "-1"], "--seed: -1 is out of range"),
    (G, ["--num-videos", "0"], "--num-videos: 0 is out of range"),
    (G, ["--step-cache", "-1"], "--step-cache: -1 is out of range"),
    (G, ["--step-cache", "0"], "--step-cache: 0 is out of range"),
    (G, ["--strength", "0", "--video", "in.mp4"], "--strength: 0 is out of range"),
    (G, ["--strength", "0.5"], "--strength applies to video-to-video only"),
    (G, ["--strength", "0.01", "--video", "in.mp4"], "keeps no step"),
    (G, ["--lora-scale", "0.5"], "--lora-scale needs --lora"),
    (G, ["--lora", "missing.safetensors"], "LoRA file not found"),
    (G, ["--lora", "notes.txt"], "cannot read LoRA file"),
    (G, ["--device", "foo"], "--device 'foo' is not a device"),
    (G, ["--device", "mps"], "--device mps"),
    (G, ["--sampler", "plms"], "invalid choice: 'plms'"),
    (G, ["--karras"], "no Karras spacing"),
    (G, ["--output", "out.avi"], "use .mp4, .gif, or a folder name"),
    (G, ["--output", "notes.txt/clip.mp4"], "is a file, not a folder"),
    (G, ["--output", "outputs"], "outputs is an existing folder that cogvideox-mini did not create"),
    (G, ["--output", "."], "is the current folder"),
    (G, ["--model", "/nonexistent/CogVideoX-2b"], "hf download THUDM/CogVideoX-2b --local-dir"),
    (G, ["--model", "not-a-snapshot"], "is not a CogVideoX snapshot"),
    (G, ["--image", "first.png"], "text-to-video model"),
    (G, ["--image", "missing.png"], "--image missing.png: file not found"),
    (G, ["--video", "notes.txt"], "cannot read video"),
    (G, ["--video", "in.mp4", "--num-frames", "17"], "fewer than --num-frames 17"),
    (G, ["--video", "in.mp4", "--image", "in.mp4"], "not both"),
    (G, ["--prompt-file", "missing.txt"], "--prompt-file missing.txt: file not found"),
    (G, ["--prompt-file", "empty.txt"], "holds no prompt"),
    (E, ["--video", "in.mp4", "--num-frames", "10"], "num_frames=10 is not valid"),
    (E, ["--video", "in.mp4", "--num-frames", "17"], "fewer than num_frames=17"),
    (E, ["--video", "missing.mp4"], "missing.mp4: file not found"),
    (E, ["--video", "in.mp4", "--output", "outputs"], "did not create"),
    (E, ["--video", "in.mp4", "--steps", "0"], "--steps: 0 is out of range"),
    (E, ["--video", "in.mp4", "--device", "cuda:7"], "--device cuda:7"),
    (T, [*LORA_ARGS, "--output", "outputs"], "did not create"),
    (T, ["--model", DEMO_MODEL, "--data", "missing", "--output", "runs/new"], "--data missing: folder not found"),
    (T, [*LORA_ARGS, "--rank", "0"], "--rank: 0 is out of range"),
    (T, [*LORA_ARGS, "--lr", "0"], "--lr: 0 is out of range"),
    (T, [*LORA_ARGS, "--validate-every", "5"], "--validate-every needs --validation-prompt"),
    (T, [*LORA_ARGS, "--device", "foo"], "is not a device"),
    (T, ["--model", "/nonexistent/CogVideoX-5b", "--data", "clips"], "model folder not found"),
    (C, ["lora", "--lora", "missing.pt", "--out", "new"], "--lora missing.pt: file or folder not found"),
    (C, ["lora", "--lora", "notes.txt", "--out", "outputs"], "did not create"),
    (C, ["lora", "--lora", "notes.txt", "--out", "new", "--alpha", "0"], "--alpha: 0 is out of range"),
    (C, ["sat2hf", "--vae", "notes.txt", "--variant", "cogvideox-2b", "--out", "new", "--max-shard-size", "big"],
     "--max-shard-size 'big'"),
    (S, ["--output", "outputs"], "did not create"),
    (S, ["--threads", "0"], "--threads: 0 is out of range"),
    (S, ["--device", "foo"], "is not a device"),
    (S, ["--vae-from", "missing", "--output", "runs/x"], "--vae-from"),
]


def _argv(case) -> list[str]:
    tool, args, _ = case
    if tool == E or (tool == G and "--prompt-file" not in args):
        args = ["--prompt", PROMPT, *FAST, *args]
    return [str(a) for a in args]


def test_bad_values_are_refused_before_work(workdir, monkeypatch, capsys):
    """Every case through the tool's main() in this process (fast: torch is imported once)."""
    import convert
    import edit
    import train_lora
    import train_tiny
    mains = {G: generate.main, E: edit.main, T: train_lora.main, C: convert.main, S: train_tiny.main}
    monkeypatch.chdir(workdir)
    before = tree(workdir)
    for case in BAD:
        capsys.readouterr()
        try:
            code = mains[case[0]](_argv(case))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        r = subprocess.CompletedProcess([case[0]], code, "", capsys.readouterr().err)
        try:
            assert_refused(r, case[2])
        except AssertionError as e:
            raise AssertionError(f"{case[0]} {shlex.join(_argv(case))}: {e}") from None
        assert tree(workdir) == before, case


def test_bad_values_in_fresh_processes(workdir):
    """A third of the cases, across the five tools, as a user runs them: a new process each."""
    if torch.cuda.is_available():
        pytest.skip("the --device cases assume a machine without a GPU")
    before = tree(workdir)
    cases = BAD[::3]
    assert {tool for tool, _, _ in cases} == {G, E, T, C, S}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(case[0], *_argv(case), cwd=workdir), cases))
    for case, r in zip(cases, results):
        try:
            assert_refused(r, case[2])
        except AssertionError as e:
            raise AssertionError(f"{case[0]} {shlex.join(_argv(case))}: {e}") from None
    assert tree(workdir) == before


def test_truncated_tokenizer_is_one_line(workdir, tmp_path):
    import shutil
    snap = tmp_path / "snap"
    shutil.copytree(DEMO_MODEL, snap)
    spm = snap / "tokenizer" / "spiece.model"
    spm.write_bytes(spm.read_bytes()[:3000])
    r = run(G, "--model", snap, "--prompt", PROMPT, *FAST, cwd=tmp_path)
    assert_refused(r, "is not a readable SentencePiece model")
    assert sorted(os.listdir(tmp_path)) == ["snap"]


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: replace only what the user named or this project wrote


def test_readme_command_twice_and_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        for _ in range(2):
            r = run(G, "--prompt", PROMPT, *FAST, cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-2000:]
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["output.mp4", "output.png"]
    for name in ("output.mp4", "output.png"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
        assert cli.written_by_us(str(tmp_path / name))
    assert iio.imread(tmp_path / "output.mp4", index=None).shape == (9, 64, 64, 3)


def test_a_named_file_is_replaced_a_derived_one_is_not(tmp_path):
    (tmp_path / "clip.mp4").write_text("the user's old clip, named on the command line\n")
    (tmp_path / "photo.png").write_text("the user's photo\n")
    (tmp_path / "many_1.mp4").write_text("the user's\n")
    r = run(G, "--prompt", PROMPT, *FAST, "--output", "clip.mp4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert iio.imread(tmp_path / "clip.mp4", index=None).shape[0] == 9          # replaced, as asked
    before = tree(tmp_path)
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "photo.mp4", cwd=tmp_path), "photo.png exists")
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "photo.gif", cwd=tmp_path), "photo.png exists")
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "photo", cwd=tmp_path), "photo.png exists")
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--num-videos", "2", "--output", "many.mp4", cwd=tmp_path),
                   "many_1.mp4 exists")
    assert tree(tmp_path) == before


def test_folder_output_is_ours_or_refused(tmp_path):
    r = run(G, "--prompt", PROMPT, *FAST, "--output", "frames", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "frames")) == [cli.MARKER_FILE] + [f"{i:04d}.png" for i in range(9)]
    assert os.stat(tmp_path / "frames").st_mode & 0o777 == 0o777 & ~cli._umask()
    r = run(G, "--prompt", PROMPT, *FAST, "--seed", "1", "--output", "frames", cwd=tmp_path)  # ours: replaced
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "frames" / "my-notes.txt").write_text("added by the user\n")
    before = tree(tmp_path)
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "frames", cwd=tmp_path), "'my-notes.txt'")
    assert tree(tmp_path) == before
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []    # no temporary folder left


def test_prompt_file_outputs_never_clobber(tmp_path):
    (tmp_path / "prompts.txt").write_text(f"# my prompts\n{PROMPT}\n\na blue square moving up on a white background\n")
    (tmp_path / "clip-0004.png").write_text("the user's\n")
    before = tree(tmp_path)
    assert_refused(run(G, "--prompt-file", "prompts.txt", *FAST, "--output", "clip.mp4", cwd=tmp_path),
                   "clip-0004.png exists")
    assert tree(tmp_path) == before
    r = run(G, "--prompt-file", "prompts.txt", *FAST, "--output", "out.mp4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"out-0002.mp4", "out-0002.png", "out-0004.mp4", "out-0004.png"} <= set(os.listdir(tmp_path))


def test_other_clis_leave_user_folders_alone(workdir, tmp_path):
    """Successful runs of edit.py and convert.py write only their outputs; a re-run replaces only their own."""
    r = run(E, "--video", workdir / "in.mp4", "--prompt", PROMPT, *FAST, "--output", "edit", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["edit", "edit.png"]
    (tmp_path / "edit.png").write_text("now the user's\n")
    assert_refused(run(E, "--video", workdir / "in.mp4", "--prompt", PROMPT, *FAST, "--output", "edit",
                       cwd=tmp_path), "edit.png exists")


def test_interrupted_writes_leave_nothing(tmp_path):
    """Ctrl-C while a file or a folder is being written: the old output is intact and no temporary is left."""
    target = tmp_path / "clip.mp4"
    target.write_text("old\n")

    def interrupted(path):
        open(path, "w").write("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cli.atomic_write(str(target), interrupted)
    assert os.listdir(tmp_path) == ["clip.mp4"] and target.read_text() == "old\n"
    tmp = cli.new_folder(str(tmp_path / "frames"))
    open(os.path.join(tmp, "0000.png"), "w").write("x")
    os.mkdir(tmp_path / "frames")  # the target appeared meanwhile and is not ours: refused at install time too
    open(tmp_path / "frames" / "user.txt", "w").write("user")
    with pytest.raises(ValueError, match="did not create"):
        cli.install_folder(tmp, str(tmp_path / "frames"), "test")
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "frames"] and os.listdir(tmp_path / "frames") == ["user.txt"]


def test_sigint_mid_denoise(tmp_path):
    # the child gets SIGINT's default action even where this run ignores it (started with nohup or in the background
    # of a script): Python then installs no KeyboardInterrupt handler and the test would time the whole run out
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, G), "--prompt", PROMPT, "--steps", "1000"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = ""
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the sampler's progress bar has moved
        chunk = os.read(p.stderr.fileno(), 4096).decode()
        err += chunk
        if re.search(r"\b[1-9]\d*/1000 \[", err) or not chunk:
            break
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=60)
    assert p.returncode == 130, err + rest
    assert error_lines(err + rest) == ["interrupted: nothing unfinished was written"]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------------
# The API is the CLI


def readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    command = re.search(r"^pip install -r requirements.txt && (python generate.py .*)$", text, re.M)[1]
    python = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)[1]  # the first Python block: "From Python"
    return command, python


def test_readme_python_example_equals_readme_command(tmp_path):
    command, python = readme_blocks()
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    args = shlex.split(command)[2:]
    r = run(G, *args, cwd=tmp_path / "cli")
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", python], cwd=tmp_path / "api", capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "api")) == sorted(os.listdir(tmp_path / "cli")) == ["output.mp4", "output.png"]
    a = iio.imread(tmp_path / "cli" / "output.mp4", index=None)
    b = iio.imread(tmp_path / "api" / "output.mp4", index=None)
    assert np.array_equal(a, b)
    assert (tmp_path / "cli" / "output.png").read_bytes() == (tmp_path / "api" / "output.png").read_bytes()


def test_torchrun_splits_a_prompt_file_with_identical_files(tmp_path):
    lines = [PROMPT, "a blue square moving up on a white background", "a green triangle moving left on a gray background"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    env = {"OMP_NUM_THREADS": "1"}  # torchrun gives each process one thread; the single process must match
    r = run(G, "--prompt-file", tmp_path / "prompts.txt", *FAST, "--output", one / "v.gif", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, G), "--prompt-file", str(tmp_path / "prompts.txt"), *FAST, "--output",
                        str(two / "v.gif"), "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(one)) == [f"v-000{i}.{e}" for i in (1, 2, 3) for e in ("gif", "png")]
    assert tree(one) == tree(two)


def test_generate_defaults_come_from_the_model():
    """The API fills in what the model says (the demo's 12-token text, 9 frames, 64x64), as the CLI does; a prompt
    list gives prompt-major videos, the first equal to that prompt alone with the same seed and batch position."""
    pipe = generate.load_pipeline(DEMO_MODEL, device="cpu")
    assert pipe.dtype == torch.float32 and pipe.info.max_text_seq_length == 12
    kw = dict(num_inference_steps=2, progress=False)
    a = generate.generate(pipe, PROMPT, **kw)
    assert torch.equal(a, generate.generate(pipe, PROMPT, max_sequence_length=12, num_frames=9, height=64, width=64, **kw))
    assert not torch.equal(a, generate.generate(pipe, PROMPT, max_sequence_length=226, **kw))
    both = generate.generate(pipe, [PROMPT, "a blue square moving up on a white background"], num_videos=2, **kw)
    assert both.shape == (4, 9, 3, 64, 64)
    with pytest.raises(ValueError, match="one negative prompt per prompt"):
        generate.generate(pipe, [PROMPT, PROMPT], negative_prompt=["x"], **kw)
    assert not generate.worth_tiling(pipe.vae, 64, 64) and generate.worth_tiling(pipe.vae, 96, 80)


def test_a_run_reads_each_model_config_once(tmp_path, monkeypatch, capsys):
    """The checks before the weights and the loading share one read of each component's config.json (ModelInfo
    carries the configs), so a file changed mid-run cannot give the checks and the model different shapes."""
    import builtins
    reads, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: reads.append(str(f)) or real_open(f, *a, **k))
    assert generate.main(["--prompt", PROMPT, *FAST, "--output", str(tmp_path / "v.gif")]) == 0
    for component in ("transformer", "vae", "text_encoder"):
        assert reads.count(os.path.join(DEMO_MODEL, component, "config.json")) == 1, component
