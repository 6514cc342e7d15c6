"""Context parallelism: one video on N processes, Ulysses attention + CFG-parallel, over torch.distributed.

    torchrun --nproc_per_node 4 generate.py --context-parallel --model CogVideoX-5b --prompt "..."

    parallel.init(pipe.device)                    # Python: the process group torchrun describes
    with parallel.context_parallel(pipe.transformer):
        frames = generate(pipe, prompt)           # the same frames on every rank: write them on rank 0

What is split. Every rank holds the whole pipeline and runs everything outside the transformer's blocks itself (T5,
the VAE, the sampler, the embeddings and the output projection): those are cheap next to the blocks, and identical
inputs give identical results, so the ranks stay in step without sending latents around; rank 0's inputs are still
broadcast at each transformer call, so that no last-bit difference between ranks can ever build up. Inside a call:
  - CFG-parallel: with an even batch (guidance doubles it to [negative; positive]) and an even number of ranks, the
    ranks form two groups of N/2 and each group runs one half of the batch through the blocks;
  - Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023) within each group of m ranks: the video tokens are cut into m
    contiguous chunks, one per rank; the text tokens (226 for the released models, 1.3% of a 5b sequence at
    49x480x720) stay whole on every rank. Everything per token runs on the rank's own tokens: the expert adaLN
    (text and video modulated apart, as in one process), q/k/v, the FF; RoPE rotates each video token by its
    global position (the rank's rows of the table, `own_rows`); the absolute positions (2b, 5b-I2V) and 1.5's
    temporal patching happen before the split, in the model's own forward. Attention needs every token, so
    `ulysses_attention` turns (own video tokens, all heads) into (all video tokens, own heads) with one all-to-all,
    takes its own heads of the (replicated) text q/k/v, attends over [text; video], sends the video rows back with a
    second all-to-all and all-gathers the text rows' heads. After the last block the video tokens (and each group's
    text) are all-gathered, so the forward returns the whole prediction on every rank.

Any head count and any length, by padding, exactly: the video tokens are padded with zero tokens at the end to a
multiple of m (all padding then sits in the last ranks' chunks) and dropped from queries, keys and values right after
the all-to-all, so attention never sees them (no mask: the fastest kernels still apply) and the per-token layers' work
on them is thrown away; the heads are padded with zero heads to a multiple of m (2b's 30 heads in a group of 4: 32),
whose outputs are dropped. The cost is at most m - 1 tokens and ceil(h/m)*m - h heads of extra work.

Hooks, not edits: the model's forward is wrapped (for the broadcast), its block source is wrapped for the duration of
each call (split, the blocks, gather: whatever supplies the blocks inside, offload.BlockStream or the step cache, is
called unchanged), model.attention is swapped while the blocks run, and the step cache's measure
(generate.relative_change) is swapped for one summed over every rank, so all ranks take the same skip decision, the
one a single process would take.

Legend: B batch, b one group's batch, N video tokens, n = ceil(N/m) per rank, L text tokens, D width, h heads (hp
padded), d head dim, m ranks per group, i this rank's index in it.
"""
import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL on
    CUDA (one GPU per process), gloo elsewhere. Returns (rank, world size); a group already initialised is kept."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def command_line(pipe):
    """generate.py --context-parallel: join torchrun's group, run the with-block's transformer calls on all ranks
    together, leave the group at the end. Yields whether this rank writes the results (rank 0 only)."""
    rank, _ = init(pipe.device)
    try:
        with context_parallel(pipe.transformer):
            yield rank == 0
    finally:
        dist.destroy_process_group()


@dataclasses.dataclass
class Split:
    """How one transformer call is divided among the ranks (see the module docstring)."""
    group: object       # this rank's Ulysses group (None: the whole world)
    m: int              # ranks in it
    i: int              # this rank's index in it
    groups: int         # 2 under CFG-parallel (each group runs half the batch), else 1
    batch: slice        # the batch rows this rank's group runs
    text: int           # L
    tokens: int         # N, the real video tokens
    chunk: int          # n = ceil(N / m): video tokens per rank, padding included

    @property
    def real(self) -> int:
        """How many of this rank's n tokens are real (the padding sits at the end of the sequence)."""
        return max(0, min(self.chunk, self.tokens - self.i * self.chunk))


class context_parallel:
    """While active, every call of `transformer` is computed by all the ranks of the (initialised) default process
    group together, each returning the whole result. All ranks must make the same calls, as generate() does when
    every rank runs it with the same arguments.

        with context_parallel(pipe.transformer):
            frames = generate(pipe, prompt, ...)"""

    def __init__(self, transformer: model.CogVideoXTransformer):
        if not dist.is_initialized():
            raise ValueError("context parallelism needs an initialised process group: run under torchrun and call "
                             "parallel.init(device) first")
        self.transformer = transformer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.split = None  # the Split of the call in progress
        # CFG-parallel's two groups, created by every rank in the same order (new_group is collective)
        half = self.world // 2
        self.halves = [dist.new_group(list(range(half))), dist.new_group(list(range(half, self.world)))] \
            if self.world % 2 == 0 else None

    def __enter__(self):
        import generate  # the step cache's measure lives there; imported here, as generate imports this module
        self.step_cache, self.measure = generate, generate.relative_change
        generate.relative_change = self.relative_change
        self.had_forward = "forward" in vars(self.transformer)
        self.inner_forward = self.transformer.forward
        self.transformer.forward = self.forward
        return self

    def __exit__(self, *exc):
        self.step_cache.relative_change = self.measure
        if self.had_forward:
            self.transformer.forward = self.inner_forward
        else:
            del self.transformer.forward

    def forward(self, x, text, *args, **kwargs):
        """The model's forward on rank 0's x and text, with the blocks run by all ranks (run_blocks)."""
        x, text = broadcast(x), broadcast(text)
        inner = self.transformer.block_source
        self.transformer.block_source = [functools.partial(self.run_blocks, inner)]
        try:
            return self.inner_forward(x, text, *args, **kwargs)
        finally:
            self.transformer.block_source = inner

    def run_blocks(self, inner, x, c, emb, rope):
        """The block source the forward sees: x (B, N, D) and c (B, L, D) whole -> whole, the blocks (from `inner`,
        what supplied them before: the list, a BlockStream, a StepCache) run on this rank's share."""
        B, N, _ = x.shape
        s = self.split = self.divide(B, c.shape[1], N)
        x, c = x[s.batch], c[s.batch]
        emb = emb if emb.shape[0] == 1 else emb[s.batch]
        x = own_rows(x, s, dim=1)  # (b, n, D)
        rope = None if rope is None else tuple(torch.cat([t[:s.text], own_rows(t[s.text:], s, 0, identity)])
                                               for t, identity in zip(rope, (1.0, 0.0)))  # cos, sin (L + n, 1, d/2)
        attend = model.attention
        if s.m > 1:
            model.attention = functools.partial(ulysses_attention, split=s, attend=attend)
        try:
            for block in inner or self.transformer.transformer_blocks:
                x, c = block(x, c, emb, rope)  # (b, n, D), (b, L, D)
        finally:
            model.attention = attend
        return self.gather(x, c, s)

    def divide(self, batch: int, text: int, tokens: int) -> Split:
        """This rank's share of a call with this batch, text length and number of video tokens."""
        groups = 2 if self.halves is not None and batch % 2 == 0 else 1
        m = self.world // groups
        g, i = divmod(self.rank, m)
        b = batch // groups
        group = self.halves[g] if groups == 2 else None
        return Split(group, m, i, groups, slice(g * b, (g + 1) * b), text, tokens, -(-tokens // m))

    def gather(self, x, c, s: Split):
        """Each rank's (b, n, D) video rows and (b, L, D) text -> the whole (B, N, D) and (B, L, D) on every rank."""
        xs = all_gather(x)  # world x (b, n, D), rank-major: group 0's chunks in token order, then group 1's
        x = torch.cat([torch.cat(xs[g * s.m:(g + 1) * s.m], dim=1)[:, :s.tokens] for g in range(s.groups)])
        if s.groups > 1:
            cs = all_gather(c)
            c = torch.cat([cs[0], cs[s.m]])  # the text is the same on every rank of a group
        return x, c

    def relative_change(self, signal, previous) -> float:
        """The step cache's measure (generate.relative_change) of the whole batch and sequence: this rank's real
        tokens summed, then summed over all ranks, so every rank takes the decision one process would take."""
        n = self.split.real
        sums = torch.stack([(signal[:, :n] - previous[:, :n]).abs().sum(dtype=torch.float64),
                            previous[:, :n].abs().sum(dtype=torch.float64)])
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of t, on every rank (a new tensor: the caller's is left alone)."""
    t = t.clone(memory_format=torch.contiguous_format)
    dist.broadcast(t, 0)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def own_rows(t: torch.Tensor, s: Split, dim: int, value: float = 0.0) -> torch.Tensor:
    """This rank's n of the N video rows of t along dim, padded with `value` at the end of the sequence. The RoPE
    tables go through it too (padded with the identity rotation): each token is rotated by its global position."""
    t = t.movedim(dim, 0)[s.i * s.chunk:(s.i + 1) * s.chunk]  # fewer than n rows at the end of the sequence
    return torch.cat([t, t.new_full((s.chunk - len(t), *t.shape[1:]), value)]).movedim(0, dim)


def ulysses_attention(q, k, v, *, split: Split, attend):
    """model.attention for one rank of a Ulysses group: q, k, v (b, h, L + n, d) for [text; own video tokens], all
    heads -> (b, h, L + n, d), the same rows of full attention over [text; every rank's video tokens].
    `attend` is the attention that ran before (model.attention, e.g. offload.sdpa); it runs on (b, hp/m, L + N, d)."""
    s, h = split, q.shape[1]
    L, N, n, m = s.text, s.tokens, s.chunk, s.m
    hp = -(-h // m) * m
    hl = hp // m                                                         # heads per rank
    qkv = F.pad(torch.stack([q, k, v]), (0, 0, 0, 0, 0, hp - h))        # (3, b, hp, L + n, d): zero heads added
    text = qkv[:, :, s.i * hl:(s.i + 1) * hl, :L]                        # (3, b, hl, L, d): own heads of the text
    send = qkv[..., L:, :].unflatten(2, (m, hl)).movedim(2, 0)           # (m, 3, b, hl, n, d): part j goes to rank j
    video = all_to_all(send, s.group).movedim(0, 3).flatten(3, 4)        # (3, b, hl, m*n, d): all tokens, own heads
    q, k, v = torch.cat([text, video[..., :N, :]], dim=3)                # (b, hl, L + N, d) each: padding dropped
    o = attend(q, k, v)                                                  # (b, hl, L + N, d)
    o_text = torch.cat(all_gather(o[:, :, :L], s.group), dim=1)[:, :h]   # (b, h, L, d)
    send = F.pad(o[:, :, L:], (0, 0, 0, m * n - N)).unflatten(2, (m, n)).movedim(2, 0)  # (m, b, hl, n, d)
    o_video = all_to_all(send, s.group).movedim(0, 1).flatten(1, 2)[:, :h]  # (b, h, n, d): own tokens, all heads
    return torch.cat([o_text, o_video], dim=2)


def all_to_all(t: torch.Tensor, group) -> torch.Tensor:
    """t[j] goes to rank j of the group; returns r with r[j] from rank j (dim 0 is the group size)."""
    t = t.contiguous()
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out

