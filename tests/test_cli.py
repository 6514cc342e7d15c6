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
import media
import pipeline
from pipeline import DEMO_MODEL, worth_tiling
from text_encoder import Tokenizer

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


def assert_refused(r, name: str):
    """Exit status 2 and one line on stderr, "error: ...", that names `name` (the flag, argument or value refused)."""
    lines = error_lines(r.stderr)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], r.stderr[-2000:]


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
BAD = [  # (tool, its arguments, what the one line must name: the flag, argument or value refused)
    (G, ["--num-frames", "0"], "--num-frames"),
    (G, ["--num-frames", "10"], "num_frames=10"),
    (G, ["--height", "0"], "--height"),
    (G, ["--width", "719"], "--width"),
    (G, ["--fps", "0"], "--fps"),
    (G, ["--fps", "-3"], "--fps"),
    (G, ["--fps", "fast"], "'fast'"),
    (G, ["--steps", "0"], "--steps"),
    (G, ["--steps", "1001"], "num_steps=1001"),
    (G, ["--guidance", "-5"], "--guidance"),
    (G, ["--guidance", "nan"], "--guidance"),
    (G, ["--seed", "-1"], "--seed"),
    (G, ["--num-videos", "0"], "--num-videos"),
    (G, ["--step-cache", "-1"], "--step-cache"),
    (G, ["--step-cache", "0"], "--step-cache"),
    (G, ["--strength", "0", "--video", "in.mp4"], "--strength"),
    (G, ["--strength", "0.5"], "--strength"),
    (G, ["--strength", "0.01", "--video", "in.mp4"], "strength=0.01"),
    (G, ["--lora-scale", "0.5"], "--lora-scale"),
    (G, ["--lora", "missing.safetensors"], "missing.safetensors"),
    (G, ["--lora", "notes.txt"], "notes.txt"),
    (G, ["--device", "foo"], "--device"),
    (G, ["--device", "mps"], "--device"),
    (G, ["--sampler", "plms"], "'plms'"),
    (G, ["--karras"], "karras"),
    (G, ["--output", "out.avi"], "--output"),
    (G, ["--output", "notes.txt/clip.mp4"], "--output"),
    (G, ["--output", "outputs"], "--output"),
    (G, ["--output", "."], "--output"),
    (G, ["--model", "/nonexistent/CogVideoX-2b"], "/nonexistent/CogVideoX-2b"),
    (G, ["--model", "not-a-snapshot"], "not-a-snapshot"),
    (G, ["--image", "first.png"], "image"),
    (G, ["--image", "missing.png"], "--image"),
    (G, ["--video", "notes.txt"], "notes.txt"),
    (G, ["--video", "in.mp4", "--num-frames", "17"], "num_frames=17"),
    (G, ["--video", "in.mp4", "--image", "in.mp4"], "video"),
    (G, ["--prompt-file", "missing.txt"], "--prompt-file"),
    (G, ["--prompt-file", "empty.txt"], "--prompt-file"),
    (E, ["--video", "in.mp4", "--num-frames", "10"], "num_frames=10"),
    (E, ["--video", "in.mp4", "--num-frames", "17"], "num_frames=17"),
    (E, ["--video", "missing.mp4"], "--video"),
    (E, ["--video", "in.mp4", "--output", "outputs"], "--output"),
    (E, ["--video", "in.mp4", "--steps", "0"], "--steps"),
    (E, ["--video", "in.mp4", "--device", "cuda:7"], "--device"),
    (T, [*LORA_ARGS, "--output", "outputs"], "--output"),
    (T, ["--model", DEMO_MODEL, "--data", "missing", "--output", "runs/new"], "--data"),
    (T, [*LORA_ARGS, "--rank", "0"], "--rank"),
    (T, [*LORA_ARGS, "--lr", "0"], "--lr"),
    (T, [*LORA_ARGS, "--validate-every", "5"], "--validate-every"),
    (T, [*LORA_ARGS, "--device", "foo"], "--device"),
    (T, ["--model", "/nonexistent/CogVideoX-5b", "--data", "clips"], "/nonexistent/CogVideoX-5b"),
    (C, ["lora", "--lora", "missing.pt", "--out", "new"], "--lora"),
    (C, ["lora", "--lora", "notes.txt", "--out", "outputs"], "--out"),
    (C, ["lora", "--lora", "notes.txt", "--out", "new", "--alpha", "0"], "--alpha"),
    (C, ["sat2hf", "--vae", "notes.txt", "--variant", "cogvideox-2b", "--out", "new", "--max-shard-size", "big"],
     "--max-shard-size"),
    (S, ["--output", "outputs"], "--output"),
    (S, ["--threads", "0"], "--threads"),
    (S, ["--device", "foo"], "--device"),
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
    assert_refused(r, "spiece.model")
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
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "photo.mp4", cwd=tmp_path), "photo.png")
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "photo.gif", cwd=tmp_path), "photo.png")
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--output", "photo", cwd=tmp_path), "photo.png")
    assert_refused(run(G, "--prompt", PROMPT, *FAST, "--num-videos", "2", "--output", "many.mp4", cwd=tmp_path),
                   "many_1.mp4")
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
                   "clip-0004.png")
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
                       cwd=tmp_path), "edit.png")


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
    with pytest.raises(ValueError) as e:
        cli.install_folder(tmp, str(tmp_path / "frames"), "test")
    assert str(tmp_path / "frames") in str(e.value)
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
    lines = error_lines(err + rest)
    assert len(lines) == 1 and "interrupted" in lines[0], lines
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
    """The API fills in what the model says (the demo's 16-token text, 9 frames, 64x64), as the CLI does; a prompt
    list gives prompt-major videos, the first equal to that prompt alone with the same seed and batch position."""
    pipe = generate.load_pipeline(DEMO_MODEL, device="cpu")
    assert pipe.dtype == torch.float32 and pipe.info.max_text_seq_length == 16
    kw = dict(num_inference_steps=2, progress=False)
    a = generate.generate(pipe, PROMPT, **kw)
    assert torch.equal(a, generate.generate(pipe, PROMPT, max_sequence_length=16, num_frames=9, height=64, width=64, **kw))
    assert not torch.equal(a, generate.generate(pipe, PROMPT, max_sequence_length=226, **kw))
    both = generate.generate(pipe, [PROMPT, "a blue square moving up on a white background"], num_videos=2, **kw)
    assert both.shape == (4, 9, 3, 64, 64)
    with pytest.raises(ValueError) as e:
        generate.generate(pipe, [PROMPT, PROMPT], negative_prompt=["x"], **kw)
    assert "negative" in str(e.value)
    assert not worth_tiling(pipe.vae.config, 64, 64) and worth_tiling(pipe.vae.config, 96, 80)


def test_a_run_reads_each_model_config_once(tmp_path, monkeypatch, capsys):
    """The checks before the weights and the loading share one read of each component's config file (ModelInfo
    carries the configs), so a file changed mid-run cannot give the checks and the model different shapes."""
    import builtins
    reads, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: reads.append(str(f)) or real_open(f, *a, **k))
    assert generate.main(["--prompt", PROMPT, *FAST, "--output", str(tmp_path / "v.gif")]) == 0
    for config in ("transformer/config.json", "vae/config.json", "text_encoder/config.json",
                   "scheduler/scheduler_config.json"):
        assert reads.count(os.path.join(DEMO_MODEL, *config.split("/"))) == 1, config


# ----------------------------------------------------------------------------------------------------------------------
# Re-runs: what a folder output replaces must be ours at every depth


def test_a_folder_is_checked_at_every_depth(tmp_path):
    """A folder we wrote, with subfolders: the marker records every file in it, at any depth, so a file or folder
    the user adds anywhere inside is seen and refuses the replacement; entries a tool only writes into (`parts`) are
    checked the same way, other entries left alone; a file that carries our mark is ours wherever it is."""
    out = tmp_path / "snap"
    with cli.output_folder(str(out), "test") as tmp:
        os.makedirs(os.path.join(tmp, "transformer", "deep"))
        open(os.path.join(tmp, "transformer", "deep", "weights.bin"), "w").write("ours")
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    cli.check_folder(str(out), "--output")                     # ours, nothing added: may be replaced
    for added in ("transformer/notes.txt", "transformer/deep/notes.txt", "transformer/deep/more/x.txt", "notes.txt"):
        path = out / added
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's\n")
        for parts in (None, [added.split("/")[0]]):  # the whole folder, or only the entry the user's file is in
            with pytest.raises(ValueError) as e:
                cli.check_folder(str(out), "--output", exact=parts is None, parts=parts)
            first = added.rsplit("/", 1)[0] if "/more/" in added else added  # the first thing not ours: a new folder
            assert f"'{first}'" in str(e.value) and "--output" in str(e.value)
        cli.check_folder(str(out), "--output", exact=False, parts=["config.json"])  # the user's file is elsewhere
        path.unlink()
        if path.parent.name == "more":
            path.parent.rmdir()
    cli.check_folder(str(out), "--output")
    cli.write_png(str(out / "transformer" / "sheet.png"), np.zeros((4, 4, 3), np.uint8))  # marked: ours anywhere
    cli.check_folder(str(out), "--output")
    (out / "config.json").unlink()
    (out / "config.json").mkdir()                              # the user's folder where we wrote a file
    with pytest.raises(ValueError) as e:
        cli.check_folder(str(out), "--output")
    assert "'config.json'" in str(e.value)


def test_folders_of_other_tools_and_of_older_versions_are_not_replaced_with_user_files(tmp_path, capsys):
    """generate.py --output FOLDER on a folder another of our tools writes into, signed without a list (as tour.py
    and convert.py signed theirs), with a user's file beside our picture, and on a snapshot signed by an older
    version (top-level names only, like the shipped demo's) with a user's file in a subfolder: refused, nothing
    changed."""
    tour_out = tmp_path / "tour"
    tour_out.mkdir()
    (tour_out / cli.MARKER_FILE).write_text('{"written_by": "cogvideox-mini", "tool": "tour.py"}')  # no list at all
    cli.write_png(str(tour_out / "x0.png"), np.zeros((4, 4, 3), np.uint8))
    (tour_out / "notes.txt").write_text("the user's\n")
    old = tmp_path / "old-snapshot"
    (old / "transformer").mkdir(parents=True)
    (old / "transformer" / "config.json").write_text("{}")
    (old / cli.MARKER_FILE).write_text('{"written_by": "cogvideox-mini", "tool": "train_tiny.py", '
                                       '"files": ["transformer"]}')
    (old / "transformer" / "mine.txt").write_text("the user's\n")
    before = tree(tmp_path)
    for folder, needle in ((tour_out, "'notes.txt'"), (old, "'transformer'")):
        capsys.readouterr()
        assert generate.main(["--prompt", PROMPT, *FAST, "--output", str(folder)]) == 2
        assert_refused(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err), needle)
    assert tree(tmp_path) == before


def test_umask_permissions_for_every_file_a_folder_output_holds(tmp_path):
    """Files written inside a temporary folder (safetensors' save_file creates them 0600) get what the umask gives
    once the folder is installed, at every depth."""
    old = os.umask(0o022)
    try:
        from safetensors.torch import save_file
        with cli.output_folder(str(tmp_path / "out"), "test") as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            save_file({"a": torch.zeros(2)}, os.path.join(tmp, "sub", "w.safetensors"))
    finally:
        os.umask(old)
    for base, dirs, files in os.walk(tmp_path / "out"):
        for name in dirs + files:
            mode = os.stat(os.path.join(base, name)).st_mode & 0o777
            assert mode == (0o755 if name in dirs else 0o644), (name, oct(mode))


# ----------------------------------------------------------------------------------------------------------------------
# Prompts the demo cannot follow as written


def test_a_cut_prompt_an_unknown_word_and_an_empty_prompt_each_get_one_readable_line(tmp_path, capsys):
    """The demo reads max_text_seq_length tokens (from its config) and knows only its captions' words: a prompt with
    a word it spells letter by letter is cut; each gets one "warning:" line (no Python UserWarning), the cut one
    naming its token count and the lost words, the unknown-word one listing the words the demo knows."""
    L = pipeline.read_model_info(DEMO_MODEL).max_text_seq_length
    prompt = "a magenta circle moving right on a black background" + " on a black background" * (L // 4)
    assert generate.main(["--prompt", prompt, *FAST, "--output", str(tmp_path / "m.gif")]) == 0
    lines = [line for line in error_lines(capsys.readouterr().err) if "warning" in line.lower()]
    assert len(lines) == 2 and all(line.startswith("warning: ") for line in lines), lines
    cut = next(line for line in lines if "tokens" in line)
    n = len(Tokenizer(os.path.join(DEMO_MODEL, "tokenizer")).encode(prompt)) + 1
    assert f"{n} tokens" in cut and str(L) in cut and "background" in cut
    unknown = next(line for line in lines if "magenta" in line)
    assert all(word in unknown.split() for word in ("circle", "square", "triangle", "red", "left", "gray"))
    for empty in ("", "   "):
        assert generate.main(["--prompt", empty, *FAST, "--output", str(tmp_path / "e.gif")]) == 0
        lines = [line for line in error_lines(capsys.readouterr().err) if "warning" in line.lower()]
        assert len(lines) == 1 and lines[0].startswith("warning: ") and "empty" in lines[0], lines
    assert generate.main(["--prompt", PROMPT, *FAST, "--output", str(tmp_path / "p.gif")]) == 0
    assert not [line for line in error_lines(capsys.readouterr().err) if "warning" in line.lower()]


# ----------------------------------------------------------------------------------------------------------------------
# Every command-line argument has its Python keyword, as the README's table says


def test_every_flag_maps_to_a_python_keyword_as_the_readme_table_says():
    import inspect
    import lora
    import parallel
    text = open(os.path.join(ROOT, "README.md")).read()
    table = re.search(r"^\| command line \| Python \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)", text, re.M)[1]
    mapped = {}
    for row in table.splitlines():
        flags_cell, python_cell = row.strip("|").split("|")[:2]
        flags = re.findall(r"--[a-z-]+", flags_cell)
        calls = re.findall(r"(\w+)\(([^)]*)\)", python_cell)
        assert flags and calls, row
        for name, args in calls:
            keywords = re.findall(r"(\w+)=", args)
            if not keywords:  # a method call (--compile): torch's Module has it
                assert callable(getattr(torch.nn.Module, name)), row
                keywords = [""]
            else:
                fn = getattr(generate, name, None) or getattr(lora, name, None) or getattr(parallel, name)
                params = inspect.signature(fn).parameters
                for kw in keywords:
                    assert kw in params, (row, name, kw)
            for flag in flags:
                mapped.setdefault(flag, []).extend(f"{name}({kw}=)" for kw in keywords)
    dests = vars(generate.parse_args(["--prompt", "x"]))
    flags = {"--" + d.replace("_", "-") for d in dests}
    assert set(mapped) == flags, (sorted(flags - set(mapped)), sorted(set(mapped) - flags))
    # the names that differ from the flag are diffusers' (the pipelines' keywords), shown in the table
    for flag, kw in (("--steps", "num_inference_steps"), ("--guidance", "guidance_scale"),
                     ("--dynamic-cfg", "use_dynamic_cfg")):
        assert f"generate({kw}=)" in mapped[flag], (flag, mapped[flag])


def test_refusals_suggest_what_fits_this_model_and_read_cleanly(tmp_path, capsys):
    """A bad --height on the 64x64 demo suggests sizes near it (never 480 or 720, the big models' sizes); a file
    imageio cannot read is named once, without imageio's stray doubled backtick."""
    with pytest.raises(SystemExit) as e:  # argparse's refusal
        generate.main(["--prompt", PROMPT, *FAST, "--height", "50", "--output", str(tmp_path / "o.gif")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--height" in err and "48 or 64" in err and "480" not in err
    (tmp_path / "bad.png").write_text("not an image\n")
    for reader in (media.read_image, media.read_video):
        with pytest.raises(ValueError) as e:
            reader(str(tmp_path / "bad.png"))
        assert "``" not in str(e.value) and str(tmp_path / "bad.png") in str(e.value)
