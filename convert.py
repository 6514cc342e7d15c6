"""SAT checkpoints and LoRAs to the official Hugging Face layout and back.

CogVideoX was trained with SwissArmyTransformer (SAT). SAT names the weights differently and fuses two things the
official (diffusers) layout, which this project loads, keeps apart: q/k/v in one Linear, and a block's twelve adaLN
modulation vectors in one Linear. Everything else is a rename. Facts: CogVideo `tools/convert_weight_sat2hf.py` and
`tools/export_sat_lora_weight.py`, SAT `lora2.py`, and the pitfalls they miss (CogVideo #244, #344, #625, #633).

    python convert.py sat2hf --transformer sat/transformer/1000/mp_rank_00_model_states.pt \\
        --vae sat/vae/3d-vae.pt --variant cogvideox-2b --out CogVideoX-2b [--dtype fp16]
    python convert.py hf2sat --snapshot CogVideoX-2b --out sat
    python convert.py lora --lora sat/lora/1000/mp_rank_00_model_states.pt --out my-lora [--alpha 1]

Legend: D hidden size, E time embedding size (512), r LoRA rank.
"""
import dataclasses
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import torch

import cli
import lora
import model
import vae
from checkpoint import config_from_dict, read_json, read_tensors, save_component, weight_files

VARIANTS = tuple(model.PRESETS)  # cogvideox-2b, -5b, -5b-i2v, cogvideox1.5-5b, -5b-i2v
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAT = "model.diffusion_model."  # the DiT in SAT's engine; conditioner.* (T5) and first_stage_model.* (VAE) are not

# Transformer modules, SAT (after SAT) -> official; {i} is the block index, the rest of the key (weight, bias) is
# kept. The official converter's 19 ordered substring replacements, written out one-to-one so they also run backwards.
TRANSFORMER_RENAMES = [
    ("transformer.layers.{i}.input_layernorm.", "transformer_blocks.{i}.norm1.norm."),
    ("transformer.layers.{i}.attention.dense.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("mixins.adaln_layer.query_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_q."),
    ("mixins.adaln_layer.key_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_k."),
    ("transformer.layers.{i}.post_attention_layernorm.", "transformer_blocks.{i}.norm2.norm."),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.", "transformer_blocks.{i}.ff.net.2."),
    ("transformer.final_layernorm.", "norm_final."),
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("ofs_embed.0.", "ofs_embedding.linear_1."),  # 1.5-I2V
    ("ofs_embed.2.", "ofs_embedding.linear_2."),
    ("mixins.patch_embed.proj.", "patch_embed.proj."),  # 1.0: Conv2d (D, C, 2, 2); 1.5: Linear (D, 8C)
    ("mixins.patch_embed.text_proj.", "patch_embed.text_proj."),
    ("mixins.final_layer.norm_final.", "norm_out.norm."),
    ("mixins.final_layer.adaLN_modulation.1.", "norm_out.linear."),  # (shift, scale) on both sides
    ("mixins.final_layer.linear.", "proj_out."),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),  # kept only for 5b-I2V, where it is learned
]
# Position tables SAT saves but rebuilds itself (2b's frozen sincos pos_embedding, 1.0 RoPE's freqs): the official
# layout does not store them, and SAT, with `force_inference: True` as in its inference.yaml, accepts them missing.
SAT_POS_TABLE = "mixins.pos_embed.pos_embedding"
SAT_RECOMPUTED = ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos")

# QKV: SAT's fused Linear outputs [q | k | v], each laid out (heads, head_dim), so it is a plain 3-way split.
SAT_QKV = re.compile(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")
HF_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)$")
# adaLN: SAT's Linear emits 12 vectors of size D per block: shift, scale, gate for attention, then for the MLP (video
# tokens), then the same six for text. The official layout has one Linear before attention (norm1) and one before the
# MLP (norm2), each emitting video shift, scale, gate, then text shift, scale, gate: the only reordering anywhere.
SAT_ADALN = re.compile(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
HF_ADALN = re.compile(r"transformer_blocks\.(\d+)\.norm([12])\.linear\.(weight|bias)$")
ADALN_CHUNKS = {"1": (0, 1, 2, 6, 7, 8), "2": (3, 4, 5, 9, 10, 11)}

# VAE: the official converter's substring replacements, SAT -> official in this order (reversed to go back), plus a
# flip of the decoder's level index: SAT numbers up levels by resolution (0 = full), up_blocks run in execution order.
VAE_RENAMES = [("block.", "resnets."), ("down.", "down_blocks."), ("downsample", "downsamplers.0"),
               ("upsample", "upsamplers.0"), ("nin_shortcut", "conv_shortcut"),
               ("mid.block_1", "mid_block.resnets.0"), ("mid.block_2", "mid_block.resnets.1")]

# SAT LoRA (lora2.LoraMixin) wraps the attention Linears: the base weight moves to `.original.` and factors
# matrix_A.k (r, D) and matrix_B.k (D, r) are added for k = q, k, v of query_key_value and once for dense.
SAT_LORA = re.compile(r"transformer\.layers\.(\d+)\.attention\.(query_key_value|dense)\.matrix_([AB])\.(\d)$")
LORA_TARGETS = {("query_key_value", "0"): "to_q", ("query_key_value", "1"): "to_k",
                ("query_key_value", "2"): "to_v", ("dense", "0"): "to_out.0"}

# SAT training saves also hold numpy's RNG state (an array of uint32): the only non-tensor types allowed to unpickle.
_rebuild = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_rebuild, "numpy.core.multiarray._reconstruct"),
                (_rebuild, "numpy._core.multiarray._reconstruct")]


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file or key and how to fix it."""


def rename(key, table, reverse=False):
    """`key` renamed by the first row of a {i}-template table whose left side is a prefix of it, or None."""
    for sat, hf in table:
        src, dst = (hf, sat) if reverse else (sat, hf)
        if m := re.match(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)") + "(?P<rest>.*)$", key):
            return dst.replace("{i}", m.groupdict().get("i") or "") + m["rest"]
    return None


def sat_to_hf(sd, config):
    """SAT DiT state dict (full SAT keys) -> (official transformer state dict, SAT keys that no rule matched).
    `config` is the official config.json dict: it says whether SAT's pos_embedding is a learned weight."""
    out, unmatched = {}, []
    for key, t in sd.items():
        if not key.startswith(SAT):  # T5 and VAE copies in fine-tuned saves (#244, #633)
            continue
        k = key[len(SAT):].replace(".original.", ".")  # base weights of a LoRA fine-tune (#625)
        if ".matrix_A." in k or ".matrix_B." in k:  # LoRA factors: `convert.py lora` exports them
            continue
        if m := SAT_QKV.match(k):
            for name, part in zip("qkv", t.chunk(3)):  # 3 x (D, D) or (D,)
                out[f"transformer_blocks.{m[1]}.attn1.to_{name}.{m[2]}"] = part.clone()
        elif m := SAT_ADALN.match(k):
            chunks = t.chunk(12)  # 12 x (D, E) or (D,)
            for norm, idx in ADALN_CHUNKS.items():
                out[f"transformer_blocks.{m[1]}.norm{norm}.linear.{m[2]}"] = torch.cat([chunks[j] for j in idx])
        elif k in SAT_RECOMPUTED or (k == SAT_POS_TABLE and not config.get("use_learned_positional_embeddings")):
            continue
        elif (new := rename(k, TRANSFORMER_RENAMES)) is not None:
            out[new] = t
        else:
            unmatched.append(key)
    return out, unmatched


def hf_to_sat(sd):
    """Official transformer state dict -> SAT DiT state dict (full SAT keys)."""
    out, qkv, ada = {}, {}, {}
    for k, t in sd.items():
        if m := HF_QKV.match(k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
        elif m := HF_ADALN.match(k):
            ada.setdefault((m[1], m[3]), {})[m[2]] = t
        elif (new := rename(k, TRANSFORMER_RENAMES, reverse=True)) is not None:
            out[SAT + new] = t
        else:
            raise ConvertError(f"official transformer key {k!r} has no SAT name")
    for (i, wb), p in qkv.items():
        out[f"{SAT}transformer.layers.{i}.attention.query_key_value.{wb}"] = torch.cat([p["q"], p["k"], p["v"]])
    for (i, wb), p in ada.items():
        chunks = [None] * 12
        for norm, idx in ADALN_CHUNKS.items():
            for j, part in zip(idx, p[norm].chunk(6)):
                chunks[j] = part
        out[f"{SAT}mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}"] = torch.cat(chunks)  # (12D, E) or (12D,)
    return out


def vae_to_hf(sd, reverse=False):
    """SAT VAE state dict -> official one (or back with reverse=True). SAT's training loss weights are dropped."""
    src, dst = ("up_blocks", "up") if reverse else ("up", "up_blocks")
    levels = 1 + max((int(m[1]) for k in sd if (m := re.match(rf"decoder\.{src}\.(\d+)\.", k))), default=0)
    out = {}
    for k, t in sd.items():
        if "loss" in k:
            continue
        k = re.sub(rf"^decoder\.{src}\.(\d+)\.", lambda m: f"decoder.{dst}.{levels - 1 - int(m[1])}.", k)
        for sat, hf in reversed(VAE_RENAMES) if reverse else VAE_RENAMES:
            k = k.replace(hf, sat) if reverse else k.replace(sat, hf)
        out[k] = t
    return out


def sat_lora_to_diffusers(sd):
    """SAT LoRA factors -> (diffusers LoRA state dict, rank). SAT scales the update by alpha / r as peft does, so
    alpha carries over: lora.save_lora records it where diffusers reads it (without it diffusers takes alpha = r)."""
    out = {}
    for key, t in sd.items():
        if key.startswith(SAT) and (m := SAT_LORA.match(key[len(SAT):])):
            if (m[2], m[4]) not in LORA_TARGETS:
                raise ConvertError(f"unexpected LoRA factor {key!r}")
            out[f"transformer.transformer_blocks.{m[1]}.attn1.{LORA_TARGETS[m[2], m[4]]}.lora_{m[3]}.weight"] = t
    if not out:
        raise ConvertError("no SAT LoRA factors (`...attention.query_key_value.matrix_A.0` etc.) in the checkpoint")
    for k in out:
        if (pair := k.replace("lora_A", "lora_B") if "lora_A" in k else k.replace("lora_B", "lora_A")) not in out:
            raise ConvertError(f"LoRA factor {pair!r} is missing (its pair {k!r} is present)")
    if len(ranks := {t.shape[0] for k, t in out.items() if "lora_A" in k}) != 1:
        raise ConvertError(f"LoRA factors have several ranks {sorted(ranks)}; expected one")
    return out, ranks.pop()


def expected_shapes(component, config):
    """{key: shape} of the model this project builds from `config` (a config.json dict), made on the meta device."""
    with torch.device("meta"):
        net = (model.CogVideoXTransformer(config_from_dict(model.TransformerConfig, config))
               if component == "transformer" else vae.CogVideoXVAE(config_from_dict(vae.VAEConfig, config)))
    return {k: tuple(t.shape) for k, t in net.state_dict().items()}


def signature(shapes):
    """What tells the transformer variants apart, read from official key shapes."""
    return {"hidden size": shapes.get("patch_embed.text_proj.weight", (None,))[0],
            "layers": sum(k.endswith("norm1.linear.weight") for k in shapes),
            "patch_embed.proj.weight": shapes.get("patch_embed.proj.weight"),
            "ofs embedding": "ofs_embedding.linear_1.weight" in shapes,
            "learned positions": "patch_embed.pos_embedding" in shapes}


def check(sd, expected, where, unmatched=(), allow_missing=False, variant=None):
    """Converted weights against the model's keys and shapes; with allow_missing, report and drop the extras."""
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    if variant and signature(shapes) != signature(expected):
        raise ConvertError(f"{where} does not look like --variant {variant}: it has {signature(shapes)}, "
                           f"{variant} has {signature(expected)}. Pick the matching --variant.")
    for k in shapes.keys() & expected.keys():
        if shapes[k] != expected[k]:
            raise ConvertError(f"{where}: {k!r} has shape {shapes[k]}, the model expects {expected[k]}")
    missing, extra = sorted(expected.keys() - sd.keys()), sorted({*unmatched, *(sd.keys() - expected.keys())})
    if missing or extra:
        report = f"{where}: {len(missing)} missing keys {missing[:5]}, {len(extra)} unmatched keys {extra[:5]}"
        if not allow_missing:
            raise ConvertError(report + "; pass --allow-missing to convert what matched")
        print("warning:", report, file=sys.stderr)
    return {k: t for k, t in sd.items() if k in expected}


def load_sat(path):
    """The flat state dict in a SAT .pt file (or SAT save folder with `latest`), read with weights_only=True."""
    if os.path.isfile(os.path.join(path, "latest")):  # <save>/latest names the iteration folder
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip(), "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise ConvertError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ConvertError(f"{path} is not a PyTorch checkpoint ({e})") from None
        what = (m[1] or m[2]) if (m := re.search(r"GLOBAL (\S+)|but got (<[^>]*>)", str(e))) else "a non-tensor object"
        raise ConvertError(f"{path} needs code execution to unpickle ({what}); refusing to load it. If you trust the "
                           "file, re-save only its tensors: torch.save({'module': state_dict}, new_path)") from None
    except Exception as e:  # torch raises assorted types for files that are not checkpoints at all
        raise ConvertError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "module", "state_dict"):  # DeepSpeed / SAT / VAE containers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise ConvertError(f"{path} holds no state dict (expected a dict of tensors under 'module' or 'state_dict')")
    return obj


def parse_size(text):
    """'5GB' -> 5 * 10**9 bytes, as Hugging Face's max_shard_size."""
    if not (m := re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?B)", text.strip().upper())):
        raise ConvertError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")
    return int(float(m[1]) * 1000 ** "BKMG".index(m[2][0]))


def write_atomically(out, writers, tool="convert.py"):
    """Run each writer(path) into a temporary folder inside `out`, then rename the results into place: a failed or
    interrupted conversion never leaves a half-written component behind. `out` is a folder this tool created (or a
    new one), and each component it replaces holds nothing but what this tool wrote there: main() checks both before
    reading a checkpoint, and they are checked again here, before anything is replaced. The marker in `out` records
    every file of every component, so that a file added to one later is seen (and refused) by the next run.
    Prints what it wrote."""
    cli.claim_folder(out, tool, "--out", parts=writers)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=out)
    try:
        for name, write in writers.items():
            write(os.path.join(tmp, name))
            cli.ordinary_permissions(os.path.join(tmp, name))  # safetensors creates its files 0600
        cli.check_folder(out, "--out", exact=False, parts=writers)  # nothing of the user's appeared meanwhile
        new = [f"{name}/{p}" for name in writers if os.path.isdir(os.path.join(tmp, name))
               for p in cli.listing(os.path.join(tmp, name), top=False)]
        cli.record(out, [*writers, *new], tool)  # before the rename: an interrupted run leaves nothing unlisted
        for name in writers:
            if os.path.lexists(final := os.path.join(out, name)):
                os.rename(final, os.path.join(tmp, name + ".old"))
            os.rename(os.path.join(tmp, name), final)
        cli.record(out, list(writers), tool, relist=True)  # exactly what is there now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [os.path.join(out, name, *p.split("/")) for name in writers for p in
             (cli.listing(os.path.join(out, name), top=False) if os.path.isdir(os.path.join(out, name)) else [""])]
    print("wrote " + ", ".join(os.path.normpath(f) for f in files if not os.path.isdir(f)))


def cmd_sat2hf(a):
    tag = {"_diffusers_version": "0.30.0"}  # the first diffusers with CogVideoX, as the official config.json files
    t_cfg = {"_class_name": "CogVideoXTransformer3DModel", **tag, **dataclasses.asdict(model.PRESETS[a.variant])}
    v_cfg = {"_class_name": "AutoencoderKLCogVideoX", **tag,
             **dataclasses.asdict(vae.PRESETS[a.variant.removesuffix("-i2v")])}
    writers = {}
    if a.transformer:
        sd, unmatched = sat_to_hf(load_sat(a.transformer), t_cfg)
        sd = check(sd, expected_shapes("transformer", t_cfg), a.transformer, unmatched, a.allow_missing, a.variant)
        sd = {k: t.to(DTYPES.get(a.dtype, t.dtype)) for k, t in sd.items()}
        writers["transformer"] = lambda d: save_component(sd, t_cfg, d, max_shard_bytes=a.max_shard_size)
    if a.vae:  # the VAE stays in fp32, as the official converter keeps it
        vsd = check(vae_to_hf(load_sat(a.vae)), expected_shapes("vae", v_cfg), a.vae, (), a.allow_missing)
        writers["vae"] = lambda d: save_component(vsd, v_cfg, d, max_shard_bytes=a.max_shard_size)
    write_atomically(a.out, writers)


def read_component(snapshot, name, dtype=None):
    folder = os.path.join(snapshot, name)
    sd = read_tensors(weight_files(folder, "diffusion_pytorch_model"), dtype=dtype)
    return check(sd, expected_shapes(name, read_json(os.path.join(folder, "config.json"))), folder)


def cmd_hf2sat(a):
    """SAT's layout: transformer/1/mp_rank_00_model_states.pt ({'module': sd}) with transformer/latest naming the
    iteration, and vae/3d-vae.pt ({'state_dict': sd})."""
    writers = {}
    if os.path.isdir(os.path.join(a.snapshot, "transformer")):
        sd = hf_to_sat(read_component(a.snapshot, "transformer", DTYPES.get(a.dtype)))

        def write_transformer(d):
            os.makedirs(os.path.join(d, "1"))
            torch.save({"module": sd}, os.path.join(d, "1", "mp_rank_00_model_states.pt"))
            with open(os.path.join(d, "latest"), "w") as f:
                f.write("1")
        writers["transformer"] = write_transformer
    if os.path.isdir(os.path.join(a.snapshot, "vae")):
        vsd = vae_to_hf(read_component(a.snapshot, "vae"), reverse=True)
        writers["vae"] = lambda d: (os.makedirs(d), torch.save({"state_dict": vsd}, os.path.join(d, "3d-vae.pt")))
    if not writers:
        raise ConvertError(f"{a.snapshot} has neither transformer/ nor vae/: pass the snapshot root")
    write_atomically(a.out, writers)


def components(a):
    """What a command will write into --out (and replace there), known from its arguments alone."""
    if a.command == "sat2hf":
        return [name for name in ("transformer", "vae") if getattr(a, name)]
    if a.command == "hf2sat":
        return [name for name in ("transformer", "vae") if os.path.isdir(os.path.join(a.snapshot, name))]
    return [lora.WEIGHT_NAME]


def cmd_lora(a):
    sd, rank = sat_lora_to_diffusers(load_sat(a.lora))
    sd = {k: t.to(DTYPES.get(a.dtype, t.dtype)).contiguous() for k, t in sd.items()}
    write_atomically(a.out, {lora.WEIGHT_NAME: lambda p: lora.save_lora(p, sd, rank, a.alpha)})


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sat2hf", help="SAT transformer and/or VAE -> official transformer/ and vae/")
    s.add_argument("--transformer", help="SAT mp_rank_00_model_states.pt (or the save folder holding `latest`)")
    s.add_argument("--vae", help="SAT 3d-vae.pt")
    s.add_argument("--variant", required=True, choices=VARIANTS, help="the model the checkpoint is")
    s.add_argument("--max-shard-size", default="5GB", help="shard the safetensors files above this size")
    s.add_argument("--allow-missing", action="store_true", help="write what matched instead of failing")
    h = sub.add_parser("hf2sat", help="official snapshot (transformer/, vae/) -> SAT layout")
    h.add_argument("--snapshot", required=True, help="the snapshot root folder")
    lo = sub.add_parser("lora", help="SAT LoRA checkpoint -> diffusers pytorch_lora_weights.safetensors")
    lo.add_argument("--lora", required=True, help="SAT checkpoint of a LoRA fine-tune")
    lo.add_argument("--alpha", type=cli.positive_float, default=1.0,
                    help="lora_alpha of the SAT run (1 in all official configs)")
    for q in (s, h, lo):
        q.add_argument("--out", required=True, help="output folder: a new one, or one convert.py wrote before")
        q.add_argument("--dtype", choices=DTYPES, help="cast transformer / LoRA weights (default: as stored)")
    a = p.parse_args(argv)
    if a.command == "sat2hf" and not (a.transformer or a.vae):
        p.error("sat2hf needs --transformer and/or --vae")

    def work():  # every path and size is checked before a checkpoint is read
        for flag in ("transformer", "vae", "snapshot", "lora"):
            if getattr(a, flag, None):
                cli.existing_path(f"--{flag}", getattr(a, flag))
        if a.command == "sat2hf":
            a.max_shard_size = parse_size(a.max_shard_size)
        cli.check_folder(a.out, "--out", exact=False, parts=components(a))
        {"sat2hf": cmd_sat2hf, "hf2sat": cmd_hf2sat, "lora": cmd_lora}[a.command](a)
    return cli.run(work)  # ConvertError, CheckpointError, or a config the model refuses: one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
