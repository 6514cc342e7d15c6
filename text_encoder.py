"""The text half of CogVideoX: the encoder of google/t5-v1_1-xxl and its SentencePiece tokenizer.

Shapes: B batch, L text tokens (226 in the pipelines), D d_model, h heads, d head dim (d_kv), F d_ff.

The parameter names equal transformers' `T5EncoderModel`, so the official `text_encoder/` folder loads
as is. What T5 v1.1's encoder does that a textbook transformer does not: attention scores are not
divided by sqrt(d); positions enter only as a learned bias on the scores (one table, in block 0,
shared by every layer); the norm is RMS without bias or mean; the feed-forward is gated GELU.
CogVideoX passes no attention mask, so `<pad>` tokens attend and are attended to, and their outputs
are part of the conditioning.
"""
import math
import os
import re
import warnings
from dataclasses import dataclass

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, component_folder, config_from_dict, load_weights, read_json


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    feed_forward_proj: str

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: only T5 v1.1's 'gated-gelu' is implemented")


PRESETS = {
    "t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                            relative_attention_num_buckets=32, relative_attention_max_distance=128,
                            layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"),
}


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets for rel = key position - query position: half of the buckets for keys
    after the query, half for keys before; in each half, small distances get a bucket each and larger
    ones share log-spaced buckets up to max_distance (anything farther lands in the last bucket)."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    far = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(rel < exact, rel, far.clamp(max=half - 1))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation ("gelu_new"), written op by op: in bf16 every op rounds, and this order
    reproduces transformers bit for bit, where the fused F.gelu(approximate="tanh") drifts by ~1 ulp."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class RMSNorm(nn.Module):
    """T5LayerNorm: scale by the root mean square, always measured in fp32, then cast to the weight's
    dtype (so under fp16 the fp32 residual stream enters each sublayer as fp16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, L: int, device) -> torch.Tensor:
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)  # (L, L)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, h, L, L)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.h, self.d).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, h, L, d)
        # T5 folds the 1/sqrt(d) into its initialisation, hence scale=1; the bias is the only position signal.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, h, L, d)
        return self.o(out.transpose(1, 2).reshape(B, L, self.h * self.d))  # (B, L, D)


class GatedFeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)  # (B, L, F)
        return self.wo(h.to(self.wo.weight.dtype))  # fp32 under fp16, see load_text_encoder


class AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return self.SelfAttention(self.layer_norm(x), bias)


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFeedForward(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, has_relative_bias), FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        x = x + self.layer[0](x, bias)
        return x + self.layer[1](x)


class T5Encoder(nn.Module):
    """ids (B, L) int64 -> last hidden state (B, L, d_model), in the dtype of the norm weights.

    The residual stream is kept in the dtype of the `wo` projections: the model dtype, except fp32
    when loaded in fp16 (see load_text_encoder). So cast with load_text_encoder, not `.half()`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList([Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers)]),
            final_layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)))
        self.block_source = None  # while a wrapper is active (offload.BlockStream), what it supplies the blocks from

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.encoder.block
        x = self.shared(ids).to(blocks[0].layer[1].DenseReluDense.wo.weight.dtype)  # (B, L, D)
        for i, block in enumerate(self.block_source or blocks):
            if i == 0:  # the relative-position table lives in block 0 (on the device only while it runs)
                bias = block.layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)  # (1, h, L, L)
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def load_text_encoder(path: str, dtype=torch.float32, device="cpu") -> T5Encoder:
    """Load the official `text_encoder/` folder (or a snapshot root holding one), strictly.

    fp16: T5 was trained in bf16, and its feed-forward outputs and residual stream grow past fp16's
    65504 (transformers #9295, #20287); the result is inf, then NaN. transformers therefore keeps `wo`
    in fp32 (`_keep_in_fp32_modules`), which by type promotion also turns its residual stream fp32
    from the first feed-forward on. We do the same on purpose: `wo` and the residual stream are fp32
    from the embedding on, every other weight and matmul is fp16, so no clamping is needed.
    bf16 has fp32's range, so there everything is bf16, as in transformers."""
    folder = component_folder(path, "text_encoder")
    d = read_json(os.path.join(folder, "config.json"))
    missing = [k for k in T5Config.__dataclass_fields__ if k not in d]
    if missing:
        raise CheckpointError(f"{os.path.join(folder, 'config.json')} lacks {', '.join(missing)}")
    with torch.device("meta"):
        model = T5Encoder(config_from_dict(T5Config, d))
    # transformers ties encoder.embed_tokens to shared and saves one of the two names.
    rename = lambda k: "shared.weight" if k == "encoder.embed_tokens.weight" else k  # noqa: E731
    half = dtype == torch.float16
    # fp16: read in the file's dtype, so that `wo` reaches fp32 without a detour through fp16.
    load_weights(model, folder, "model", dtype=None if half else dtype, device=device, rename=rename)
    if half:
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if name.endswith("DenseReluDense.wo.weight") else torch.float16)
    return model


class Tokenizer:
    """T5's SentencePiece tokenizer, with the exact output of transformers' T5Tokenizer as the
    CogVideoX pipelines call it (padding="max_length", truncation=True, add_special_tokens=True).

    `path` is a `spiece.model` file, a `tokenizer/` folder holding one, or a snapshot root. The
    official repos ship `tokenizer/spiece.model`; a folder written by transformers 5's save_pretrained
    may hold only `tokenizer.json`, which is an error here: copy spiece.model from the official repo.

    transformers 5 no longer runs SentencePiece itself: it converts the model to a `tokenizers`
    pipeline that (1) matches its special tokens in the raw text, (2) applies SentencePiece's
    normalisation table, (3) splits on every Unicode whitespace character (SentencePiece only knows
    ' '), (4) encodes each word with a '▁' prefix. We replay those steps with SentencePiece; the
    100 sentinels `<extra_id_0..99>` follow the pieces, in reverse (extra_id_0 is the last id)."""

    # Unicode White_Space (what `tokenizers` splits on) plus SentencePiece's own space symbol.
    WORD_SPLIT = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\u2581]+")

    def __init__(self, path: str):
        folder = component_folder(path, "tokenizer") if os.path.isdir(path) else None
        file = os.path.join(folder, "spiece.model") if folder else path
        if not os.path.isfile(file):
            hint = " (only tokenizer.json, as transformers 5 saves it)" if folder and os.path.isfile(
                os.path.join(folder, "tokenizer.json")) else ""
            raise CheckpointError(f"no spiece.model at {file}{hint}: copy tokenizer/spiece.model from the official "
                                  "repo (THUDM/CogVideoX-2b or google/t5-v1_1-xxl)")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=file)
        except RuntimeError as e:  # sentencepiece's "could not parse ModelProto": truncated, or not a model at all
            raise CheckpointError(f"{file} is not a readable SentencePiece model ({e}); download it again") from None
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise CheckpointError(f"{file} defines no pad or eos piece: not a T5 SentencePiece model")
        n = self.sp.get_piece_size()
        self.vocab_size = n + 100
        self.special = {t: self.sp.piece_to_id(t) for t in ("<pad>", "</s>", "<unk>")}
        self.special.update({f"<extra_id_{i}>": n + 99 - i for i in range(100)})
        self.special_split = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")

    def words(self, text: str) -> list[tuple[str, list[int]]]:
        """One prompt as (word, its token ids) pairs, in order: a special token is a word of its own."""
        out = []
        for i, part in enumerate(self.special_split.split(text)):  # odd parts are special tokens
            if i % 2:
                out.append((part, [self.special[part]]))
            else:
                words = [w for w in self.WORD_SPLIT.split(self.sp.normalize(part)) if w]
                out += zip(words, self.sp.encode(words))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without `</s>`."""
        return [t for _, ids in self.words(text) for t in ids]

    def cut_note(self, prompt: str, max_length: int) -> str | None:
        """One readable line when `prompt` does not fit in max_length tokens (with `</s>`): how many tokens it has and
        the words lost (whole, or their end); None when it fits."""
        words, n, kept = self.words(prompt), 0, 0
        for word, ids in words:
            if n + len(ids) > max_length - 1:
                break
            n, kept = n + len(ids), kept + 1
        total = sum(len(ids) for _, ids in words) + 1
        if total <= max_length:
            return None
        lost = " ".join(w for w, _ in words[kept:])
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        return (f"the prompt {short!r} is {total} tokens with </s>, and the model reads {max_length}: the words "
                f"{lost!r} are cut (in whole or part); shorten the prompt")

    def __call__(self, prompts: str | list[str], max_length: int = 226) -> torch.Tensor:
        """prompts -> ids (B, max_length): each prompt's tokens, cut to max_length-1 if longer (with a warning that
        names the words lost), then `</s>`, then `<pad>` up to max_length."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)  # (B, L)
        for b, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > max_length - 1:
                warnings.warn(self.cut_note(prompt, max_length))
                ids = ids[:max_length - 1]
            out[b, :len(ids) + 1] = torch.tensor(ids + [self.eos_id])
        return out
