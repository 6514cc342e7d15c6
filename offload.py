"""Memory and placement: where the weights live while a pipeline runs, and which attention kernel runs on CUDA.

Nothing here changes what is computed, only where and with which kernel: every path gives the frames of a pipeline
that keeps everything on one device (tests/test_generate.py compares them bit for bit on the CPU).
  - on_device: stage offload (`--offload`), each stage (T5, transformer, VAE) on the device only while it runs;
  - BlockStream: block streaming (`--offload blocks`), the blocks of T5 and the transformer copied to the GPU one
    block ahead of the compute, from pinned host memory, on a side CUDA stream;
  - sdpa: the SDPA kernel order on CUDA (cuDNN first), what model.attention calls.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

OFFLOAD = ("model", "blocks")  # load_pipeline(offload=...) and --offload


@contextlib.contextmanager
def on_device(pipe, module: nn.Module):
    """With pipe.offload, move a stage of the pipeline to pipe.device for the duration of a `with` block, then back to
    the CPU. With offload="blocks" the blocks of T5 and the transformer stay on the CPU and stream in one at a time
    (BlockStream)."""
    streamed = pipe.offload == "blocks" and module in (pipe.transformer, pipe.text_encoder)
    if pipe.offload and not streamed:
        module.to(pipe.device)
    try:
        if streamed:
            with BlockStream(module, pipe.device, None if module is pipe.transformer else module.encoder.block):
                yield module
        else:
            yield module
    finally:
        if pipe.offload:
            if not streamed:
                module.to("cpu")
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()


class BlockStream:
    """Run a transformer whose blocks stay in host memory, each copied to `device` just before it runs.

        with BlockStream(model, "cuda"):   # all but the blocks move to the device until the with-block ends
            out = model(x, text, t)

    `blocks` is the list streamed: `model.transformer_blocks` by default; T5's is `encoder.block` (on_device
    streams both: T5-XXL is 9.5 GB in bf16, more than the rest of a 5b run needs at a time). While one is active,
    the model's forward takes its blocks from this object (`model.block_source`) instead of its list.

    Why: the 42 blocks of a 5b model are 11 GB in bf16, 99% of its weights, but a forward needs one at a time. So
    the blocks stay in (pinned) CPU memory and are handed to the forward one by one: while block i runs on the
    compute stream, block i + 1 is copied on a side CUDA stream (an event makes the compute stream wait for it;
    record_stream keeps the caching allocator from reusing a copy's memory before the kernels that read it have
    run). After block i has run, its parameters point at the host tensors again and the copies are dropped, so at
    most two blocks' copies exist at any time (about 0.5 GB for 5b; a dropped copy's memory goes back to the
    allocator once the kernels that read it have run). A 5b block at 480x720 with guidance is 16 TFLOP, about 30 ms
    on an H100, and its 264 MB cross PCIe in 5-10 ms, so one block ahead is enough for the copies to hide behind the
    compute (estimates; bench/gpu.py measures the whole). On the CPU the same code runs with plain copies, no
    streams, events or pinning, so the CPU tests check the logic (the output is bit-identical: the same kernels on
    the same values)."""

    def __init__(self, model: nn.Module, device, blocks: nn.ModuleList | None = None):
        self.model, self.device = model, torch.device(device)
        self.blocks = model.transformer_blocks if blocks is None else blocks
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None

    def __enter__(self):
        self._move_the_rest(self.device)
        if self.cuda:  # once per pipeline: later enters find them pinned (new LoRA or int8 tensors get pinned then)
            self._pack([t for t in self._tensors(self.blocks) if not t.is_pinned()])
        self.model.block_source = self
        return self.model

    def __exit__(self, *exc):
        self.model.block_source = None
        self._move_the_rest("cpu")

    def _move_the_rest(self, device):
        """Everything outside the blocks (embeddings, norms, projections: small) moves as a whole."""
        streamed = {id(t) for t in self._tensors(self.blocks)}
        for t in self._tensors(self.model):
            if id(t) not in streamed:
                t.data = t.data.to(device)

    @staticmethod
    def _tensors(module):
        return list(module.parameters()) + list(module.buffers())

    def _pack(self, tensors, chunk: int = 2**30):
        """Move tensors into shared host buffers of at most `chunk` bytes (pinned on CUDA), each tensor a view at a
        512-byte aligned offset. Why not t.pin_memory() per tensor: PyTorch's pinned allocator rounds every request
        up to a power of two, which costs 1.7x for the 5b blocks' 19-75 MB tensors (19 GB of pinned RAM for 11 GB
        of weights); a full 1 GiB buffer is a power of two, and only the last, smaller one is rounded up."""
        sizes = [-(-t.numel() * t.element_size() // 512) * 512 for t in tensors]
        left, buffer, used = sum(sizes), None, 0
        for t, size in zip(tensors, sizes):
            if buffer is None or used + size > len(buffer):
                buffer, used = torch.empty(max(min(chunk, left), size), dtype=torch.uint8, pin_memory=self.cuda), 0
            nbytes = t.numel() * t.element_size()
            t.data = buffer[used:used + nbytes].view(t.dtype).view(t.shape).copy_(t.data)
            used, left = used + size, left - size

    def _fetch(self, block):
        """Start copying a block's tensors to the device: (copies, event that marks their arrival)."""
        with torch.cuda.stream(self.side):  # no-op for None (CPU)
            copies = [t.to(self.device, copy=True, non_blocking=True) for t in self._tensors(block)]
        return copies, self.side.record_event() if self.cuda else None

    def __iter__(self):
        """Yield each block with its weights on the device; the next block's copy is under way meanwhile."""
        blocks = self.blocks
        pending = self._fetch(blocks[0])
        for i, block in enumerate(blocks):
            copies, arrived = pending
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(arrived)
                for t in copies:
                    t.record_stream(compute)
            pending = self._fetch(blocks[i + 1]) if i + 1 < len(blocks) else None  # overlaps block i's compute
            tensors = self._tensors(block)
            host = [t.data for t in tensors]
            for t, copy in zip(tensors, copies):
                t.data = copy
            try:
                yield block
            finally:
                for t, h in zip(tensors, host):
                    t.data = h
            del copies  # block i's copies go now, before block i + 2's are fetched


# The SDPA kernels tried on CUDA, fastest first. Attention is about half of a 5b step at 480x720 (S = 17,776 tokens,
# head_dim 64), and PyTorch's own order puts cuDNN after math, so it would never be picked, while on Hopper cuDNN's
# fused attention is the fastest kernel for head_dim 64 (bench/gpu.py times each). A kernel that cannot take the
# inputs (cuDNN or flash on fp32, flash before Ampere, a build without cuDNN) is skipped for the next; math takes
# anything. sdpa_kernel's priority order needs torch 2.6 (and 2.7 under torch.compile); older: PyTorch's choice.
if torch.__version__ >= "2.6":
    from torch.nn.attention import SDPBackend, sdpa_kernel
    CUDA_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH]
else:
    CUDA_SDPA_ORDER = None


def sdpa(q, k, v):
    """F.scaled_dot_product_attention(q, k, v), on CUDA with the first kernel of CUDA_SDPA_ORDER that takes these
    inputs; elsewhere PyTorch's choice (all compute the same result up to rounding)."""
    if q.is_cuda and CUDA_SDPA_ORDER:
        with sdpa_kernel(CUDA_SDPA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
