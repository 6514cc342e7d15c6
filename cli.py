"""The boundary between a shell and the models, shared by generate.py, edit.py, train_lora.py, convert.py and
train_tiny.py: argument checks that run before any weight is read, the device and dtype, and writing outputs so that
nothing the user did not ask to replace is ever destroyed.

Why outputs need rules: a generation takes minutes to hours, and the obvious implementation (delete the target, then
write) once turned `--output .` into an `rm -rf` of a checkout. The rules, which every writer here follows:
  - a file the user names (`--output clip.mp4`) may be replaced, as any command-line tool does, and atomically:
    it is written under a temporary name in the same folder and renamed over the old one, so a crash or Ctrl-C
    leaves the old file or the new one, never half of one;
  - every other path is replaced only if this project wrote it: folders we create hold MARKER_FILE, listing every
    file and folder we put there at any depth (a file the user adds inside a subfolder is as foreign as one at the
    top); files at derived paths (the contact sheet beside a video, numbered videos) carry MARK in their
    metadata (a PNG text chunk, the mp4's or GIF's comment). A path that fails the test is refused, with one line,
    before any work starts;
  - new files and folders get the permissions the umask gives (a temporary file is created 0600 and then widened,
    and so is everything inside a folder we install, where safetensors creates its files 0600).

Errors: every check raises ValueError (or argparse's error) with one line that names the value and the fix; `run`
turns them into that line on stderr and exit status 2, and Ctrl-C into one line and 130.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

MARK = "written by cogvideox-mini"
MARKER_FILE = ".cogvideox-mini.json"


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" says nothing: those helps say what the default is
        return action.help if action.default in (None, False, "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default shown in --help, and errors on one line (argparse prints its usage first)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(**kwargs)

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _number(cast, ok, need: str):
    """An argparse type: parse with `cast`, then require ok(value); the message says what is needed."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
        if (cast is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {need}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed = _number(int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")


def pixels(text: str) -> int:
    """A height or width: a positive multiple of 16; a refusal suggests the two nearest (any model's defaults are
    its own size, so the suggestion is never another model's)."""
    value = _number(int, lambda v: True, "")(text)
    if value < 16 or value % 16:
        lo = max(16, value // 16 * 16)
        raise argparse.ArgumentTypeError(f"{text} is out of range: use a positive multiple of 16, e.g. {lo} or "
                                         f"{lo + 16} (leave it out for the model's own size)")
    return value


positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
probability = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
strength = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
finite_float = _number(float, lambda v: True, "a finite number")


def existing_path(flag: str, path: str, kind: str = "file or folder") -> str:
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: {kind} not found")
    if kind == "file" and not os.path.isfile(path):
        raise ValueError(f"{flag} {path} is not a file")
    if kind == "folder" and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is not a folder")
    return path


def pick_device(name: str | None) -> torch.device:
    """cpu, cuda, cuda:N or mps, checked to exist here; None: the first GPU if there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {name}: {n} CUDA GPU(s) are visible, cuda:0 to cuda:{n - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return device


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(name: str | None, device: torch.device, gpu_dtype: torch.dtype) -> torch.dtype:
    """The dtype policy: what the user asks for; else fp32 on the CPU (fast enough, and exact), and on an accelerator
    the precision the checkpoint was trained in (ModelInfo.gpu_dtype: fp16 for CogVideoX-2b, bf16 for the others)."""
    if name is not None:
        return DTYPES[name]
    return torch.float32 if device.type == "cpu" else gpu_dtype


ROOT = os.path.dirname(os.path.abspath(__file__))


def _one_line(default):
    """A warning this project's code gives (a prompt cut to the text length, a word the model never learned) as one
    line on stderr, "warning: ..."; anyone else's as `default` shows it."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(ROOT + os.sep):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def run(work) -> int:
    """Run a command's body: a ValueError or OSError becomes one line on stderr and exit status 2 (CheckpointError is
    a ValueError), Ctrl-C one line and 130; this project's own warnings are one line each (`_one_line`). Temporary
    files are removed by the writers themselves on the way out."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line(warnings.showwarning)
            return work() or 0
    except KeyboardInterrupt:
        print("interrupted: nothing unfinished was written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------------------------
# Is it ours? Checks that run before any work


def written_by_us(path: str) -> bool:
    """A folder with our MARKER_FILE, or a file carrying MARK in its first or last MiB (where PNG text chunks, GIF
    comments and the mp4 `moov` box live)."""
    if os.path.isdir(path):
        return read_marker(path) is not None
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 20)))
            tail = f.read()
    except OSError:
        return False
    return MARK.encode() in head or MARK.encode() in tail


def read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER_FILE)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "cogvideox-mini" else None


def check_parent(path: str, flag: str) -> None:
    """The folder `path` goes into exists and is writable, or can be created."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable; choose another location")


def check_file(path: str, flag: str, named: bool) -> None:
    """A file output. named: the user typed this exact path, so an existing file may be replaced; otherwise (a derived
    path) only a file we wrote may be."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing folder; name a file, e.g. "
                         f"{os.path.join(path, 'output' + (os.path.splitext(path)[1] or '.mp4'))}")
    if os.path.lexists(path) and not named and not written_by_us(path):
        raise ValueError(f"{path} exists and was not written by cogvideox-mini, so it is not replaced: move it away, "
                         f"or choose another {flag}")
    check_parent(path, flag)


def listing(folder: str, top: bool = True) -> list[str]:
    """Every file and folder below `folder` at any depth, as relative paths with '/' separators, folders ending in
    '/'; top: `folder` is the one a marker signs, so its own MARKER_FILE is left out. A link is an entry of its own
    (never followed)."""
    out = []
    for base, dirs, files in os.walk(folder):
        rel = os.path.relpath(base, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out += [prefix + d + ("" if os.path.islink(os.path.join(base, d)) else "/") for d in dirs]
        out += [prefix + f for f in files]
    return sorted(p for p in out if p != MARKER_FILE or not top)


def _entry(folder: str, name: str) -> str:
    """`name` in a folder as listing() writes it: with a trailing '/' for a folder (not a link to one)."""
    p = os.path.join(folder, name)
    return name + "/" if os.path.isdir(p) and not os.path.islink(p) else name


def foreign(folder: str, marker: dict, parts=None) -> tuple[str, bool] | None:
    """The first thing below `folder` (or only inside its top-level entries `parts`) that this project did not write,
    as (relative path, verifiable), or None. The marker's "tree" lists everything we put there, at any depth; a file
    outside it that carries MARK (one of our PNGs, videos) is ours too. A marker written before trees were recorded
    ("files": top-level names only, or no list at all) cannot vouch for what is inside a subfolder: such a subfolder
    comes back with verifiable=False."""
    names = sorted(os.listdir(folder)) if parts is None else sorted(
        n for n in parts if os.path.lexists(os.path.join(folder, n)))
    names = [n for n in names if n != MARKER_FILE]
    tree = marker.get("tree")
    if tree is None:
        files = marker.get("files")
        for n in names:
            folder_entry = _entry(folder, n).endswith("/")
            if not folder_entry and (n in (files or ()) or written_by_us(os.path.join(folder, n))):
                continue
            return n, files is not None and n not in files
        return None
    ours = set(tree)
    for n in names:
        top = _entry(folder, n)
        below = [top] + ([top + p for p in listing(os.path.join(folder, n), top=False)] if top.endswith("/") else [])
        for p in below:
            if p not in ours and (p.endswith("/") or not written_by_us(os.path.join(folder, p))):
                return p.rstrip("/"), True
    return None


def check_folder(path: str, flag: str, exact: bool = True, parts=None) -> None:
    """A folder output: new, empty, or one this project created. exact: it must also hold nothing but what we put
    there, at any depth (it is about to be replaced whole); otherwise the tool only writes its own entries inside
    it, and `parts` names those it will replace (each must hold nothing but what we put there)."""
    here = os.path.abspath(path)
    if here == os.getcwd() or os.getcwd().startswith(here.rstrip(os.sep) + os.sep):
        raise ValueError(f"{flag} {path} is the current folder or holds it; choose a new folder name")
    if not os.path.lexists(path):
        return check_parent(path, flag)
    if not os.path.isdir(path) or os.path.islink(path):
        raise ValueError(f"{flag} {path} exists and is not a folder; choose a new folder name")
    entries = set(os.listdir(path))
    marker = read_marker(path)
    if entries and marker is None:
        raise ValueError(f"{flag} {path} is an existing folder that cogvideox-mini did not create; it is never "
                         f"replaced or written into: choose a new folder name")
    bad = foreign(path, marker, None if exact else parts) if marker and (exact or parts) else None
    if bad and bad[1]:
        raise ValueError(f"{flag} {path} holds {bad[0]!r}, which cogvideox-mini did not write; move it away or "
                         f"choose a new folder name")
    if bad:
        raise ValueError(f"{flag} {path}: {bad[0]!r} was written by an older cogvideox-mini, which did not record what "
                         f"it put inside, so it is not replaced: check it and delete it yourself, or choose a new "
                         f"folder name")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder is not writable")


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str) -> None:
    """What open()/mkdir() would have given, instead of mkstemp's 0600 / mkdtemp's 0700 (or safetensors' save_file,
    which creates its files 0600): for a folder, everything inside it too (links are left alone)."""
    mask = _umask()
    if os.path.isdir(path) and not os.path.islink(path):
        for base, dirs, files in os.walk(path):
            for name in files + dirs:
                if not os.path.islink(p := os.path.join(base, name)):
                    os.chmod(p, (0o777 if name in dirs else 0o666) & ~mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name in the same folder, then rename over `path`: a crash or Ctrl-C never leaves a
    partial file, and never a temporary one."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=ext, dir=folder)  # keeps the extension: writers read it
    os.close(fd)
    try:
        write(tmp)
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_marker(folder: str, marker: dict) -> None:
    marker["files"] = sorted({p.split("/")[0] for p in marker["tree"]})  # the top level, as earlier versions read it

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
            f.write("\n")
    atomic_write(os.path.join(folder, MARKER_FILE), write)


def _tree(folder: str, marker: dict | None) -> set:
    """The marker's tree; from a marker of before trees, the top-level files it listed (its folders stay unknown)."""
    if marker is None:
        return set()
    if "tree" in marker:
        return set(marker["tree"])
    return {n for n in marker.get("files") or [] if not _entry(folder, n).endswith("/")}


def write_marker(folder: str, tool: str, listed: bool = True) -> None:
    """Sign a folder as ours. listed: record everything in it, at any depth ("tree"), so that a later replacement can
    see anything added since; otherwise (a folder a tool writes its own entries into) record nothing yet: `record`
    adds each entry as it is written."""
    _save_marker(folder, {"written_by": "cogvideox-mini", "tool": tool, "tree": listing(folder) if listed else []})


def record(folder: str, paths, tool: str, relist: bool = False) -> None:
    """Add entries to the tree of our folder's marker: the relative paths given (a folder as 'name/'), their parent
    folders, and everything now below any of them. Called before writing them (so an interrupted write leaves
    nothing unlisted) and again after (for what a writer put inside a folder). relist: first forget what was
    recorded at and below those paths, so the tree holds exactly what is there now."""
    marker = read_marker(folder) or {"written_by": "cogvideox-mini", "tool": tool}
    tree = _tree(folder, marker)
    if relist:
        gone = [p.rstrip("/") for p in paths]
        tree = {t for t in tree if not any(t.rstrip("/") == g or t.startswith(g + "/") for g in gone)}
    for p in paths:
        parts = p.rstrip("/").split("/")
        full = os.path.join(folder, *parts)
        if relist and not os.path.lexists(full):
            continue
        tree.update("/".join(parts[:i]) + "/" for i in range(1, len(parts)))
        tree.add(_entry(folder, p.rstrip("/")) if os.path.lexists(full) else p)
        if os.path.isdir(full) and not os.path.islink(full):
            tree.update(p.rstrip("/") + "/" + q for q in listing(full, top=False))
    marker["tree"] = sorted(tree)
    _save_marker(folder, marker)


def claim_folder(path: str, tool: str, flag: str, parts=None) -> None:
    """Create (or reuse) a folder a tool writes its own entries into (train_lora's runs, convert's output, the tour);
    `parts`: the entries it will replace, which must be ours (check_folder)."""
    check_folder(path, flag, exact=False, parts=parts)
    os.makedirs(path, exist_ok=True)
    if read_marker(path) is None:
        write_marker(path, tool, listed=False)


def new_folder(path: str) -> str:
    """A hidden temporary folder beside `path`, to be filled and then moved into place by `install_folder`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", dir=parent)


def install_folder(tmp: str, path: str, tool: str, flag: str = "--output") -> None:
    """Sign `tmp` and rename it to `path`. An earlier folder there must pass check_folder (checked again now, not only
    before the work); it is moved aside first and deleted only once the new one is in place. On any failure
    (Ctrl-C included) `tmp` is removed and `path` is left as it was."""
    old = None
    try:
        write_marker(tmp, tool)
        ordinary_permissions(tmp)
        if os.path.lexists(path):
            check_folder(path, flag)
            old = tmp + ".old"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old and not os.path.lexists(path):
            os.replace(old, path)  # put the earlier folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old)


@contextlib.contextmanager
def output_folder(path: str, tool: str):
    """`with output_folder(path, tool) as tmp:` fill tmp, a new hidden folder beside `path`; when the block ends it is
    installed at `path` (install_folder), and on any failure (Ctrl-C included) removed, leaving `path` as it was."""
    tmp = new_folder(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install_folder(tmp, path, tool)


def write_png(path: str, image: np.ndarray) -> None:
    """(H, W, 3) uint8 -> a PNG file (Pillow's encoder), with MARK in a tEXt chunk ahead of the pixels."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", MARK)
    Image.fromarray(image).save(path, format="PNG", pnginfo=info)
