"""The ablation cookbook (docs/ablations.md): inference-time changes to the demo model, each scored with evaluate.py.

    python bench/ablations.py --write docs/ablations.md    # every ablation; prints the table and puts it in the doc
    python bench/ablations.py --only baseline no-rope      # a few, printed only
    python bench/ablations.py --list                       # the names
    python bench/ablations.py --sheet tour/ablations.png   # one video per ablation, same prompt and seed (seconds)

Every row runs evaluate.evaluate_model (50 DDIM steps, guidance 6: generate.py's defaults, unless the row is about
guidance) on two prompt sets of shapes.split(): the 28 held-out prompts with 3 videos each (n = 84; the same videos
as `python evaluate.py --sets held-out --per-combo 3`) and a fixed subset of 84 of the 140 training prompts, evenly
spaced in split() order, one video each (n = 84: all 140 would add about 2 minutes per row). Seeds are
evaluate_model's, so every row sees the same initial noise and only the ablation differs.

Each ablation is a context manager applied around evaluate_model, built only from public hooks: `model.attention`
(the attention kernel every layer calls), `transformer.rope` (the RoPE tables), `transformer.transformer_blocks`,
and generate()'s own arguments (reached by wrapping `evaluate.generate`, the name evaluate_model calls). Nothing is
edited and everything is put back after the row (tour.patched).
"""
import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import model  # noqa: E402
import shapes  # noqa: E402
from generate import DEMO_MODEL, generate, load_pipeline  # noqa: E402
from tour import patched  # noqa: E402

START, END = "<!-- ablations-table:start -->", "<!-- ablations-table:end -->"


# ----------------------------------------------------------------------------------------------------------------------
# The ablations: each takes the pipeline and returns a context manager (the code docs/ablations.md quotes)


def frame_local_attention(pipe):
    """Video tokens attend to the text and to the video tokens of their own latent frame only; text attends to all."""
    L = pipe.transformer.config.max_text_seq_length                     # text comes first in [text; video]
    frames = (pipe.info.num_frames - 1) // pipe.info.temporal_compression + 1

    def attend(q, k, v):                                                # (B, heads, S, d), S = L + N
        S = q.shape[2]
        frame = torch.div(torch.arange(S, device=q.device) - L, (S - L) // frames, rounding_mode="floor")  # text: -1
        allowed = (frame[:, None] == frame[None, :]) | (frame[None, :] < 0) | (frame[:, None] < 0)     # (S, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return patched(model, "attention", attend)


def no_rope(pipe):
    """No rotary positions at all: every video token looks the same to attention wherever and whenever it is."""
    return patched(pipe.transformer, "rope", lambda *args: None)


def no_time_rope(pipe):
    """RoPE on height and width only: the time third of each head's angles set to 0 (the identity rotation)."""
    rope, n_t = pipe.transformer.rope, pipe.transformer.config.attention_head_dim // 8   # angles of the time axis

    def spatial_only(*args):
        cos, sin = (x.clone() for x in rope(*args))                     # (S, 1, d/2) each, [t | h | w] angles
        cos[..., :n_t], sin[..., :n_t] = 1.0, 0.0
        return cos, sin
    return patched(pipe.transformer, "rope", spatial_only)


def skip_last_block(pipe):
    blocks = pipe.transformer.transformer_blocks
    return patched(pipe.transformer, "transformer_blocks", blocks[:-1])


def with_prompts(prompt_fn=None, negative_fn=None):
    """Change the prompt or the negative prompt generate() receives, per caption, inside evaluate_model."""
    def run(pipe, prompt, **kw):
        return generate(pipe, prompt_fn(prompt) if prompt_fn else prompt,
                        negative_prompt=negative_fn(prompt) if negative_fn else "", **kw)
    return patched(evaluate, "generate", run)


OTHER_SHAPE = {"circle": "square", "square": "triangle", "triangle": "circle"}


def shape_swapped(caption: str) -> str:
    """The caption with its shape word replaced: "a red circle ..." -> "a red square ..."."""
    a = shapes.parse_caption(caption)
    return shapes.caption(a._replace(shape=OTHER_SHAPE[a.shape]))


@dataclass
class Ablation:
    name: str
    what: str
    hook: object = None                 # pipe -> context manager; None: no change
    guidance: float = 6.0
    kwargs: dict = field(default_factory=dict)

    def applied(self, pipe):
        return self.hook(pipe) if self.hook else contextlib.nullcontext()


ABLATIONS = [
    Ablation("baseline", "50 DDIM steps, guidance 6"),
    Ablation("guidance-1", "guidance 1: no classifier-free guidance (one branch, the prompt)", guidance=1.0),
    Ablation("negative-other-shape", "negative prompt = the caption with another shape word",
             lambda pipe: with_prompts(negative_fn=shape_swapped)),
    Ablation("empty-text", 'the prompt replaced by "" (guidance then has nothing to push along)',
             lambda pipe: with_prompts(prompt_fn=lambda c: "")),
    Ablation("frame-local-attention", "video tokens attend only within their latent frame (and to the text)",
             frame_local_attention),
    Ablation("no-rope", "RoPE removed (no positions at all)", no_rope),
    Ablation("no-time-rope", "RoPE on height and width only (time angles zeroed)", no_time_rope),
    Ablation("skip-last-block", "the last of the 4 transformer blocks skipped", skip_last_block),
]


# ----------------------------------------------------------------------------------------------------------------------
# Measuring


def prompt_sets(train_n: int = 84):
    """(held-out attrs, training attrs): all 28 held-out prompts, and train_n training prompts evenly spaced."""
    train, held_out = shapes.split()
    train_n = min(train_n, len(train))
    return held_out, [train[i * len(train) // train_n] for i in range(train_n)]


def run(pipe, ablation: Ablation, held_out, train, per_combo=3, steps=50, log=print) -> dict:
    t0 = time.process_time()                    # CPU time: the same whether or not other work shares the cores
    with ablation.applied(pipe):
        row = {"held-out": evaluate.evaluate_model(pipe, held_out, per_combo, steps, ablation.guidance),
               "train": evaluate.evaluate_model(pipe, train, 1, steps, ablation.guidance)}
    row["seconds"] = time.process_time() - t0
    log(f"{ablation.name}: {row['seconds']:.0f} s, held-out {fmt(row['held-out'])}, train {fmt(row['train'])}")
    return row


def fmt(r: dict) -> str:
    return " / ".join(f"{100 * r[k]:.1f}%" for k in ("colour", "shape", "motion"))


def table(results: dict, ablations: dict) -> str:
    first = next(iter(results.values()))
    n_h, n_t = first["held-out"]["n"], first["train"]["n"]
    lines = ["| ablation | held-out colour | shape | motion | training colour | shape | motion | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        h, t = row["held-out"], row["train"]
        cells = [f"{100 * r[k]:.1f}%" for r in (h, t) for k in ("colour", "shape", "motion")]
        lines.append(f"| `{name}`: {ablations[name].what} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    lines.append("")
    lines.append(f"n = {n_h} held-out videos and {n_t} training-prompt videos per row; seconds: CPU time of both sets "
                 "(with one thread, about the wall time on an idle core).")
    return "\n".join(lines)


def write_table(path: str, text: str) -> None:
    """Replace what lies between the START and END markers of `path` with `text`, through a temporary file."""
    with open(path) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        raise SystemExit(f"{path} has no {START} ... {END} markers to put the table between")
    head, rest = doc.split(START, 1)
    new = head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1]
    fd, tmp = tempfile.mkstemp(prefix=".ablations.", suffix=".md", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, os.stat(path).st_mode & 0o777)       # mkstemp makes it 0600; keep the doc's own mode
    os.replace(tmp, path)


def contact_sheet(pipe, path: str, prompt: str, seed: int, steps: int = 50) -> list:
    """One video per ablation for one prompt and seed, as rows of a PNG (tour.py's layout); returns what
    shapes.classify reads from each."""
    from tour import labelled_grid, save_png, uint8_frames
    L, rows, read = pipe.transformer.config.max_text_seq_length, [], []
    for a in ABLATIONS:
        with a.applied(pipe):
            frames = evaluate.generate(pipe, prompt, num_inference_steps=steps, guidance_scale=a.guidance, seed=seed,
                                       max_sequence_length=L, progress=False)
        rows.append(list(uint8_frames(frames[0])))
        read.append(shapes.classify(rows[-1]))
    labels = [f"{a.name}\n{r.colour} {r.shape} {r.motion}" for a, r in zip(ABLATIONS, read)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    title = f"{prompt!r}, seed {seed}: one row per ablation (the evaluator's reading under the name)"
    columns = [f"frame {j}" for j in range(len(rows[0]))]
    save_png(path, labelled_grid(rows, title, labels, columns, cell=2 * rows[0][0].shape[0]))
    return read


def main(argv=None):
    names = [a.name for a in ABLATIONS]
    p = argparse.ArgumentParser(description="Inference-time ablations of a moving-shapes model, scored from pixels.")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--only", nargs="+", choices=names, default=names)
    p.add_argument("--list", action="store_true", help="print the ablations and exit")
    p.add_argument("--train-prompts", type=int, default=84, help="training prompts, one video each (of 140)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", default=None, metavar="DOC", help="also put the table into DOC between its markers")
    p.add_argument("--sheet", default=None, metavar="PNG",
                   help="instead of the table: one video per ablation for --sheet-prompt, as rows of a PNG")
    p.add_argument("--sheet-prompt", default="a red circle moving right on a black background")
    p.add_argument("--sheet-seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.list:
        for a in ABLATIONS:
            print(f"{a.name:24s} {a.what}")
        return {}
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    if args.sheet:
        contact_sheet(pipe, args.sheet, args.sheet_prompt, args.sheet_seed, args.steps)
        print(f"wrote {args.sheet}")
        return {}
    held_out, train = prompt_sets(args.train_prompts)
    chosen = {a.name: a for a in ABLATIONS if a.name in args.only}
    t0, c0 = time.perf_counter(), time.process_time()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = {name: run(pipe, a, held_out, train, steps=args.steps, log=log) for name, a in chosen.items()}
    wall, cpu = (time.perf_counter() - t0) / 60, (time.process_time() - c0) / 60
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    text = (table(results, chosen) + f" Measured {datetime.date.today()} at commit {commit.strip() or '?'} on "
            f"{args.device} with {args.threads} thread(s): {cpu:.1f} CPU minutes in all ({wall:.1f} min wall).")
    print(text)
    if args.write:
        write_table(args.write, text)
        print(f"wrote the table into {args.write}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
