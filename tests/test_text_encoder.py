"""text_encoder.py against its peers, transformers' T5EncoderModel and T5Tokenizer, built and run here."""
import json
import os
import random
import shutil
import warnings

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config as PeerConfig
from transformers import T5EncoderModel, T5Tokenizer

from text_encoder import PRESETS, T5Encoder, Tokenizer, load_text_encoder, relative_position_bucket
from checkpoint import CheckpointError

# 3 layers, so the block-0 bias is reused; max_distance 20 < L, so the capped log buckets are exercised.
SMALL = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
FP32_TOL = 1e-5
# Half precision, with u the unit roundoff (2^-8 bf16, 2^-11 fp16) and errors relative to the largest output:
# - against fp32: 10u. Each sublayer rounds its input, its matmuls and its output to the dtype, so 3 blocks pile up a
#   few u; we measured 2.5-3u (bf16) and 2-4u (fp16) over 4 seeds, and transformers in the same dtype is as far off.
#   We also require to be no further from fp32 than 2x transformers is.
# - against transformers in the same dtype: bf16 makes the same roundings in the same order (measured: bit-exact on
#   CPU), 1u leaves room for another SDPA kernel; fp16 differs on purpose (our residual stream is fp32 from the
#   embedding on, the peer's from block 0's feed-forward on), measured 2-3u, allowed 10u.
U = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
HALF_TOL = {dt: 10 * u for dt, u in U.items()}
PEER_TOL = {torch.bfloat16: U[torch.bfloat16], torch.float16: 10 * U[torch.float16]}


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def padded_ids(lengths, L, vocab=128, seed=0):
    """A right-padded batch as the pipeline builds it: tokens, then </s> (1), then <pad> (0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)  # (B, L)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        ids[b, n] = 1
    return ids


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    torch.manual_seed(1)
    model = T5EncoderModel(PeerConfig(**SMALL)).eval()
    with torch.no_grad():  # the peer draws the linears and the embedding from normals; randomise the rest too
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    root = tmp_path_factory.mktemp("t5")
    model.save_pretrained(root / "snapshot" / "text_encoder")  # whole: model.safetensors
    model.save_pretrained(root / "sharded", max_shard_size="20KB")  # model-0000k-of-0000n + index
    assert len([f for f in os.listdir(root / "sharded") if f.endswith(".safetensors")]) > 2
    return model, root


@pytest.mark.parametrize("layout", ["snapshot", "snapshot/text_encoder", "sharded"])
def test_fp32_parity(peer, layout):
    model, root = peer
    ours = load_text_encoder(str(root / layout))
    for ids in (padded_ids([5, 17, 39, 0], L=40), padded_ids([6], L=7, seed=1)):
        with torch.no_grad():
            ref = model(ids).last_hidden_state
            out = ours(ids)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert rel_err(out, ref) <= FP32_TOL, rel_err(out, ref)


def test_embed_tokens_alias(peer, tmp_path):
    model, root = peer
    folder = tmp_path / "text_encoder"
    shutil.copytree(root / "snapshot" / "text_encoder", folder)
    sd = load_file(folder / "model.safetensors")
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    ids = padded_ids([5, 17], L=24)
    with torch.no_grad():
        assert torch.equal(load_text_encoder(str(folder))(ids), load_text_encoder(str(root / "sharded"))(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(peer, dtype):
    model, root = peer
    path = str(root / "snapshot")
    ids = padded_ids([5, 17, 39, 0], L=40)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        peer_half = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype).eval()(ids).last_hidden_state
        ours = load_text_encoder(path, dtype=dtype)
        out = ours(ids)
    wo = {p.dtype for n, p in ours.named_parameters() if n.endswith(".wo.weight")}
    rest = {p.dtype for n, p in ours.named_parameters() if not n.endswith(".wo.weight")}
    assert rest == {dtype} and wo == {torch.float32 if dtype == torch.float16 else dtype}
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) <= HALF_TOL[dtype], rel_err(out, ref)
    assert rel_err(out, peer_half) <= PEER_TOL[dtype], rel_err(out, peer_half)
    assert rel_err(out, ref) <= 2 * rel_err(peer_half, ref), (rel_err(out, ref), rel_err(peer_half, ref))


def test_fp16_survives_activations_beyond_fp16_range(peer, tmp_path):
    """Scale every `wo` so the feed-forward outputs exceed 65504, as T5-XXL's do: a plain `.half()` model then gives
    inf/NaN, while load_text_encoder(fp16) stays finite and close to fp32."""
    model, root = peer
    folder = tmp_path / "text_encoder"
    shutil.copytree(root / "snapshot" / "text_encoder", folder)
    sd = load_file(folder / "model.safetensors")
    sd = {k: v * 3e4 if k.endswith(".wo.weight") else v for k, v in sd.items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    ids = padded_ids([5, 17, 39, 0], L=40)
    with torch.no_grad():
        fp32 = load_text_encoder(str(folder))
        ffn_out = fp32.encoder.block[0].layer[1](fp32.shared(ids))
        assert ffn_out.abs().max() > 65504  # the premise: this overflows fp16
        ref = fp32(ids)
        assert not torch.isfinite(fp32.half()(ids)).all()
        out = load_text_encoder(str(folder), dtype=torch.float16)(ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= HALF_TOL[torch.float16], rel_err(out, ref)


def test_xxl_preset_matches_peer_on_meta():
    cfg = PRESETS["t5-v1_1-xxl"]
    with torch.device("meta"):
        ours = T5Encoder(cfg)
        theirs = T5EncoderModel(PeerConfig(**vars(cfg)))
    # The peer's state_dict also lists `encoder.embed_tokens.weight`, a tied alias of `shared.weight` that
    # save_pretrained does not write; we accept it at load time instead of holding it.
    peer_sd = {k: v for k, v in theirs.state_dict().items() if k not in T5EncoderModel._tied_weights_keys}
    ours_sd = ours.state_dict()
    assert list(ours_sd) == list(peer_sd)
    assert all(ours_sd[k].shape == peer_sd[k].shape for k in ours_sd)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 4_762_310_656


def test_relative_position_bucket():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-300, 301)
    for buckets, dist in ((32, 128), (8, 20)):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=dist)
        assert torch.equal(relative_position_bucket(rel, buckets, dist), ref)


def test_config_rejects_other_feed_forward(peer, tmp_path):
    _, root = peer
    folder = tmp_path / "text_encoder"
    shutil.copytree(root / "snapshot" / "text_encoder", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="gated-gelu"):
        load_text_encoder(str(folder))


# ---------------------------------------------------------------- tokenizer

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sta", "tor", "vel", "qu", "ix", "on", "er", "é", "ü", "ß", "日", "本", "ça", "ñ"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A unigram SentencePiece model trained here with T5's special ids (pad 0, eos 1, unk 2, no bos), laid out like
    the official tokenizer/ folder, and transformers' T5Tokenizer loaded from it as the pipelines load it."""
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = []
    for _ in range(2000):
        line = [rng.choice(words) for _ in range(rng.randint(3, 15))]
        line[rng.randrange(len(line))] = line[0].capitalize()
        lines.append(" ".join(line + [rng.choice([".", ",", "!", "?", "123", "42", "(x)"])]))
    root = tmp_path_factory.mktemp("tok")
    folder = root / "snapshot" / "tokenizer"
    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=300,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    os.remove(folder / "spiece.vocab")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 226, "legacy": True,
         "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    peer = T5Tokenizer.from_pretrained(str(root / "snapshot"), subfolder="tokenizer")
    return peer, root, words


def prompts(words):
    rng = random.Random(1)
    fixed = [
        "", " ", "   ", "\n", "\t\t", "\r\n\r\n", "a", "kalo mine", "  kalo   mine  ", "kalo\nmine", "kalo\r\nmine\n\n",
        "kalo\tmine", "Kalo, mine! 123.", "日本 ça ñ ß", "emoji 😀🎉 text", "кириллица текст", "中文字符测试", "ｆｕｌｌｗｉｄｔｈ",
        "①② ﬁ", "e\u0301 café", "Ω≈ç√∫", "ｶﾀｶﾅ", "\u00adsoft hyphen", "nul\x00byte", "a\u00a0b", "a\u3000b", "a\u2028b",
        "a\u2029b", "a\u0085b", "a\u1680b", "a\u2009b", "a\u200bb", "a\x1cb", "a\x0bb\x0cc", "a\u202fb\u205fc",
        "a </s> b", "a</s>b", "<pad>", "x <extra_id_0> y", "<extra_id_99>z", "<unk>", "<extra_id_100> <extra_id_07>",
        "a\u2581\u2581b", "\u2581", "  leading", "trailing  ", "tab\t end ",
    ]
    random_ = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(10)]
    long = [" ".join(rng.choice(words) for _ in range(n)) for n in (120, 300, 600)]  # > 226 tokens
    return fixed + random_ + long


def test_tokenizer_parity(tokenizers):
    peer, root, words = tokenizers
    tok = Tokenizer(str(root / "snapshot"))
    ps = prompts(words)
    assert len(ps) >= 50
    ref = peer(ps, padding="max_length", max_length=226, truncation=True, add_special_tokens=True,
               return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tok(ps)
    assert out.dtype == torch.long and out.shape == (len(ps), 226)
    for p, a, b in zip(ps, out.tolist(), ref.tolist()):
        assert a == b, repr(p)
    # the long prompts were cut, and each warning says how long the prompt was, against the limit
    full = [len(peer(p).input_ids) for p in ps]
    cut = [n for n in full if n > 226]
    notes = [str(w.message) for w in caught]
    assert len(cut) >= 2 and len(notes) == len(cut)
    assert all(f"{n} tokens" in note and "226" in note for n, note in zip(cut, notes)), notes
    assert all(row[-1] == 1 for row, n in zip(out.tolist(), full) if n > 226)  # truncation keeps </s>


def test_tokenizer_paths_ids_and_single_string(tokenizers):
    peer, root, _ = tokenizers
    folder = root / "snapshot" / "tokenizer"
    toks = [Tokenizer(str(p)) for p in (folder / "spiece.model", folder, root / "snapshot")]
    for tok in toks:
        assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (peer.pad_token_id, peer.eos_token_id, len(peer))
        assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, tok.sp.get_piece_size() + 100)
        assert torch.equal(tok("kalo mine", max_length=16), tok(["kalo mine"], max_length=16))
    for i in (0, 99):
        assert toks[0](f"<extra_id_{i}>")[0, 0].item() == peer.convert_tokens_to_ids(f"<extra_id_{i}>")


def test_tokenizer_json_only_folder_is_an_error(tokenizers, tmp_path):
    peer, _, _ = tokenizers
    peer.save_pretrained(str(tmp_path))
    if (tmp_path / "spiece.model").exists():
        os.remove(tmp_path / "spiece.model")
    assert (tmp_path / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="no spiece.model at .*only tokenizer.json"):
        Tokenizer(str(tmp_path))


# ---------------------------------------------------------------- the demo's tokenizer: prompts are case-insensitive

# Each caption word's id in the tokenizer the shipped demo transformer was trained with (before case folding was
# added to it): the transformer depends on them, so they must never change.
CAPTION_WORD_IDS = {"a": 3, "background": 4, "on": 5, "moving": 6, "white": 7, "black": 8, "gray": 9, "circle": 10,
                    "triangle": 11, "square": 12, "down": 13, "up": 14, "right": 15, "left": 16, "blue": 17, "red": 18,
                    "green": 19, "yellow": 44}
CASED = "A BLUE Square Moving Left On A Black Background"


def demo_captions():
    import shapes
    train, held_out = shapes.split()
    return sorted({shapes.caption(a) for a in train + held_out})


def case_variants(text, rng):
    return [text.upper(), text.title(), "".join(c.upper() if rng.random() < 0.5 else c for c in text)]


def test_demo_tokenizer_keeps_the_trained_ids_and_folds_case():
    from generate import DEMO_MODEL
    tok = Tokenizer(DEMO_MODEL)
    assert {w: tok.encode(w) for w in CAPTION_WORD_IDS} == {w: [i] for w, i in CAPTION_WORD_IDS.items()}
    assert tok.encode(CASED) == tok.encode(CASED.lower()) == [3, 17, 12, 6, 16, 5, 3, 8, 4]
    assert tok.encode("a ÀÉÎ Ｂlue") == tok.encode("a àéî blue")  # NFKC, then lowercase: beyond ASCII too


def test_demo_tokenizer_case_folding_matches_the_peers():
    """Capitalised captions give the lowercase ids, in ours and in transformers' T5Tokenizer and T5TokenizerFast
    loaded from the demo folder as CogVideoXPipeline loads it (the precompiled normalisation table in spiece.model
    is applied by both: in transformers 5 the two names are one tokenizers-backed class)."""
    from transformers import T5TokenizerFast
    from generate import DEMO_MODEL
    folder = os.path.join(DEMO_MODEL, "tokenizer")
    L = json.load(open(os.path.join(folder, "tokenizer_config.json")))["model_max_length"]
    tok, peers = Tokenizer(folder), [T5Tokenizer.from_pretrained(folder), T5TokenizerFast.from_pretrained(folder)]
    rng = random.Random(0)
    captions = demo_captions()
    assert len(captions) == 168
    for caption in captions:
        want = tok(caption, max_length=L)[0].tolist()
        for text in [caption] + case_variants(caption, rng):
            assert tok(text, max_length=L)[0].tolist() == want, text
            for peer in peers:
                ids = peer(text, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)
                assert ids.input_ids == want, (type(peer).__name__, text)


def test_demo_generates_the_same_video_whatever_the_case():
    from generate import generate, load_pipeline
    pipe = load_pipeline()
    kw = dict(seed=5, num_inference_steps=2, progress=False)
    cased, lower = generate(pipe, CASED, **kw), generate(pipe, CASED.lower(), **kw)
    assert torch.equal(cased, lower)
    assert (generate(pipe, "a red circle moving right on a black background", **kw) - lower).abs().max() > 0.1


def test_train_tiny_tokenizer_is_the_shipped_one(tmp_path):
    """train_tiny.py's tokenizer stage, at the default config, writes the shipped tokenizer: the same pieces in the
    same order, the same (case-folding) normalisation, the same files. The bytes are the same too with the
    sentencepiece it was made with (0.2.3), not asserted: another version may store the scores differently."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    import train_tiny
    from generate import DEMO_MODEL
    import shapes
    cfg = train_tiny.PRESETS["default"]
    train, _ = shapes.split()
    train_tiny.train_tokenizer(str(tmp_path), [shapes.caption(a) for a in train], cfg, random.Random(cfg.seed))
    shipped = os.path.join(DEMO_MODEL, "tokenizer")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(shipped)) == ["spiece.model", "tokenizer_config.json"]
    made_config, shipped_config = (json.load(open(os.path.join(d, "tokenizer_config.json"))) for d in (tmp_path, shipped))
    # the text length is the recipe's (16 since v2's recipe: "cyan" takes 5 pieces); the shipped v1 demo has 12
    assert made_config.pop("model_max_length") == cfg.max_text_seq_length
    assert made_config == {k: v for k, v in shipped_config.items() if k != "model_max_length"}
    made, ours = pb.ModelProto(), pb.ModelProto()
    made.ParseFromString(open(tmp_path / "spiece.model", "rb").read())
    ours.ParseFromString(open(os.path.join(shipped, "spiece.model"), "rb").read())
    assert [p.piece for p in made.pieces] == [p.piece for p in ours.pieces]
    assert made.normalizer_spec == ours.normalizer_spec and ours.normalizer_spec.name == "nmt_nfkc_cf"
    a, b = Tokenizer(str(tmp_path)), Tokenizer(shipped)
    assert all(a.encode(c) == b.encode(c) for c in demo_captions())


def test_a_cut_prompt_is_named_with_its_token_count_and_lost_words():
    """The tokenizer's warning on a prompt longer than max_length: its token count (with </s>) and the words that
    do not fit, whole or in part; none for a prompt that fits exactly."""
    import warnings
    from generate import DEMO_MODEL
    tok = Tokenizer(DEMO_MODEL)
    prompt = "a red circle moving right on a black background"   # one token per word, 9 + </s>
    assert tok.cut_note(prompt, 10) is None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ids = tok([prompt], max_length=7)
    assert ids[0, -1] == tok.eos_id and len(seen) == 1
    note = str(seen[0].message)
    assert "10 tokens" in note and "'a black background'" in note  # 6 tokens kept, then </s>
    note = tok.cut_note("a magenta circle", 5)  # 'magenta' is spelled letter by letter: cut in the middle
    assert "'magenta circle'" in note


def test_readme_lists_the_demo_vocabulary():
    """The README's list of the words the demo knows is its tokenizer's whole-word pieces, which are the words of
    shapes.py's training captions."""
    import re
    import shapes
    from generate import DEMO_MODEL
    sp = Tokenizer(DEMO_MODEL).sp
    words = {p[1:] for p in map(sp.id_to_piece, range(sp.get_piece_size())) if p.startswith("\u2581") and len(p) > 1}
    captions = {w for a in shapes.split()[0] for w in shapes.caption(a).split()}
    assert words == captions
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    listed = re.search(r"The demo knows these words only: ([^.]*)\.", " ".join(readme.split()))[1]
    assert set(re.findall(r"`(\w+)`", listed)) == words
