"""checkpoint.py's errors, exercised through load_text_encoder: each is one line that names the problem."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import CheckpointError
from text_encoder import T5Config, T5Encoder, load_text_encoder

CONFIG = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")


def write_checkpoint(folder, sd, shards=1, config=CONFIG):
    """The official text_encoder/ layout: config.json plus model.safetensors, or shards and their index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["T5EncoderModel"], **config}, f)
    if shards == 1:
        save_file(sd, os.path.join(folder, "model.safetensors"))
        return
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture
def state():
    model = T5Encoder(T5Config(**CONFIG))  # nn.Linear/nn.Embedding draw random weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval(), {k: v.contiguous() for k, v in model.state_dict().items()}


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("shards", [1, 3])
def test_intact_checkpoint_loads(tmp_path, state, shards):
    model, sd = state
    write_checkpoint(tmp_path / "text_encoder", sd, shards)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(load_text_encoder(str(tmp_path))(ids), model(ids))


def test_truncated_file(tmp_path, state):
    write_checkpoint(tmp_path, state[1])
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = load_error(tmp_path)
    assert str(path) in msg and "truncated" in msg


def test_missing_shard(tmp_path, state):
    write_checkpoint(tmp_path, state[1], shards=3)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    msg = load_error(tmp_path)
    assert "missing" in msg and "model-00002-of-00003.safetensors" in msg and "index.json" in msg


def test_missing_key(tmp_path, state):
    sd = dict(state[1])
    del sd["encoder.final_layer_norm.weight"]
    write_checkpoint(tmp_path, sd)
    msg = load_error(tmp_path)
    assert "'encoder.final_layer_norm.weight'" in msg and "missing" in msg and "model.safetensors" in msg


def test_unexpected_key(tmp_path, state):
    sd = {**state[1], "encoder.block.2.layer.0.layer_norm.weight": torch.ones(16)}
    write_checkpoint(tmp_path, sd, shards=2)
    msg = load_error(tmp_path)
    assert "unexpected key 'encoder.block.2.layer.0.layer_norm.weight'" in msg and "index.json" in msg


def test_shape_mismatch(tmp_path, state):
    write_checkpoint(tmp_path, state[1], config={**CONFIG, "d_ff": 20})
    msg = load_error(tmp_path)
    assert "'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'" in msg and "(24, 16)" in msg and "(20, 16)" in msg


def test_missing_config_field_and_files(tmp_path, state):
    write_checkpoint(tmp_path / "a", state[1], config={k: v for k, v in CONFIG.items() if k != "d_kv"})
    assert "config.json lacks d_kv" in load_error(tmp_path / "a")
    write_checkpoint(tmp_path / "b", state[1])
    os.remove(tmp_path / "b" / "config.json")
    assert "missing file" in load_error(tmp_path / "b") and "config.json" in load_error(tmp_path / "b")
    write_checkpoint(tmp_path / "c", state[1])
    os.remove(tmp_path / "c" / "model.safetensors")
    assert "no weights in" in load_error(tmp_path / "c")



# ---- found by mutation testing (bench/MUTANTS.md): the safetensors reader against the safetensors library --------

def every_dtype():
    g = torch.Generator().manual_seed(0)
    sd = {f"f.{d}": (torch.randn(3, 5, generator=g) * 100).to(d) for d in
          (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)}
    sd.update({f"i.{d}": torch.randint(-100, 100, (7,), generator=g).to(d) for d in
               (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)})
    sd.update({"b": torch.rand(4, generator=g) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3, dtype=torch.int16),
               "odd": torch.arange(3, dtype=torch.int8)})  # 3 bytes: later tensors start unaligned
    return sd


def test_read_tensors_equals_the_safetensors_library(tmp_path):
    """Every dtype the format has, a 0-d and an empty tensor, unaligned offsets, two files and a rename: the same keys,
    dtypes, shapes and values as safetensors.torch.load_file; with dtype=, only the floating tensors are cast."""
    from safetensors.torch import load_file
    from checkpoint import read_tensors
    sd = every_dtype()
    save_file(dict(list(sd.items())[:7]), tmp_path / "a.safetensors")
    save_file(dict(list(sd.items())[7:]), tmp_path / "b.safetensors")
    ref = {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")}
    files = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    for dtype in (None, torch.bfloat16):
        ours = read_tensors(files, dtype=dtype, rename=lambda k: "x." + k)
        assert sorted(ours) == sorted("x." + k for k in ref)
        for k, want in ref.items():
            if dtype is not None and want.is_floating_point():
                want = want.to(dtype)
            got = ours["x." + k]
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert torch.equal(got.view(torch.uint8) if got.ndim else got, want.view(torch.uint8) if want.ndim else want), k
    save_file({"b": torch.zeros(1)}, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="key 'b' appears in both .*b.safetensors and .*c.safetensors"):
        read_tensors([str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors")])


def raw_safetensors(path, header: dict, data: bytes, length=None):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(blob) if length is None else length).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("case", ["offsets short", "offsets past the end", "begin after end", "unknown dtype",
                                  "header too long", "header too short"])
def test_corrupt_header_is_refused_like_the_library_refuses_it(tmp_path, case):
    from safetensors import safe_open
    from checkpoint import read_tensors
    header = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    length = None
    if case == "offsets short":
        header["t"]["data_offsets"] = [0, 4]
    elif case == "offsets past the end":
        header["t"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    elif case == "begin after end":
        header["t"]["data_offsets"] = [8, 0]
    elif case == "unknown dtype":
        header["t"]["dtype"] = "C64"
    elif case == "header too long":
        length = 10 ** 6
    else:
        length = 1
    path = tmp_path / "x.safetensors"
    raw_safetensors(path, header, bytes(8), length)
    with pytest.raises(Exception):
        with safe_open(str(path), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match=f"cannot read {path}"):
        read_tensors([str(path)])


def test_save_component_shards_load_back_and_diffusers_reads_them(tmp_path):
    """save_component writes what load_weights and diffusers read: one file under the limit, numbered shards and an
    index over it (total_size = the bytes of all tensors, every key mapped to its shard)."""
    from diffusers import AutoencoderKLCogVideoX
    from checkpoint import read_json, read_tensors, save_component, weight_files
    net = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
                                 block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    config = {"_class_name": "AutoencoderKLCogVideoX", **net.config}
    total = sum(t.nbytes for t in sd.values())
    for limit, shards in ((float("inf"), 1), (total // 3, 4)):
        folder = str(tmp_path / f"vae-{shards}")
        save_component(sd, json.loads(json.dumps(config, default=list)), folder, max_shard_bytes=limit)
        files = weight_files(folder, "diffusion_pytorch_model")
        assert len(files) == shards
        if shards == 1:
            assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
        else:
            assert os.path.basename(files[0]) == f"diffusion_pytorch_model-00001-of-{shards:05d}.safetensors"
            index = read_json(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
            assert index["metadata"]["total_size"] == total and sorted(index["weight_map"]) == sorted(sd)
            assert all(os.path.getsize(f) < limit + 20000 for f in files)  # no shard far over the limit
        back = read_tensors(files)
        assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        theirs = AutoencoderKLCogVideoX.from_pretrained(folder).state_dict()
        assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_load_weights_casts_renames_and_freezes(tmp_path, state):
    """load_weights as the loaders call it: dtype casts every weight (the file is fp32), rename maps file keys to
    model keys, and the model comes back in eval mode with no parameter asking for gradients (inference loaders)."""
    from checkpoint import load_weights
    model, sd = state
    save_file({"prefix." + k: v for k, v in sd.items()}, tmp_path / "model.safetensors")
    with torch.device("meta"):
        net = T5Encoder(T5Config(**CONFIG)).train()
    load_weights(net, str(tmp_path), "model", dtype=torch.bfloat16, rename=lambda k: k.removeprefix("prefix."))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    got = net.state_dict()
    assert sorted(got) == sorted(sd) and all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], sd[k].bfloat16())
                                            for k in sd)
    with torch.device("meta"):
        net = T5Encoder(T5Config(**CONFIG))
    load_weights(net, str(tmp_path), "model", rename=lambda k: k.removeprefix("prefix."))  # defaults: fp32, CPU
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())


def test_messages_name_the_file_and_count_the_rest(tmp_path, state):
    sd = dict(state[1])
    for k in ("encoder.final_layer_norm.weight", "shared.weight"):
        del sd[k]
    write_checkpoint(tmp_path / "a", sd)
    assert load_error(tmp_path / "a").endswith(f"(and 1 more) missing from {tmp_path / 'a' / 'model.safetensors'}")
    write_checkpoint(tmp_path / "b", {**state[1], "extra.weight": torch.ones(1)}, shards=2)
    msg = load_error(tmp_path / "b")
    assert f"unexpected key 'extra.weight' in {tmp_path / 'b' / 'model.safetensors.index.json'}:" in msg
    assert "more" not in msg
    write_checkpoint(tmp_path / "b2", {**state[1], "extra.a": torch.ones(1), "extra.b": torch.ones(1)})
    assert "unexpected key 'extra.a' (and 1 more) in" in load_error(tmp_path / "b2")
    sd = dict(state[1])
    del sd["shared.weight"]
    write_checkpoint(tmp_path / "a1", sd)
    assert load_error(tmp_path / "a1") == f"key 'shared.weight' missing from {tmp_path / 'a1' / 'model.safetensors'}"
    write_checkpoint(tmp_path / "c", state[1])
    (tmp_path / "c" / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in load_error(tmp_path / "c")
    write_checkpoint(tmp_path / "d", state[1], shards=2)
    (tmp_path / "d" / "model.safetensors.index.json").write_text("{}")
    assert "model.safetensors.index.json has no 'weight_map'" in load_error(tmp_path / "d")
    from checkpoint import weight_files
    with pytest.raises(CheckpointError, match="checkpoint folder not found: .*nowhere"):
        weight_files(str(tmp_path / "nowhere"), "model")


def test_config_lists_become_tuples():
    """JSON has no tuples: config.json lists become the tuples the dataclass defaults are, so a loaded config
    compares equal to a preset (here diffusers' own VAE config file as written by save_pretrained)."""
    import dataclasses
    from checkpoint import config_from_dict
    from vae import VAEConfig
    d = json.loads(json.dumps(dataclasses.asdict(VAEConfig()), default=list))
    assert isinstance(d["block_out_channels"], list)
    cfg = config_from_dict(VAEConfig, {**d, "_class_name": "AutoencoderKLCogVideoX", "unknown_key": 1})
    assert cfg == VAEConfig() and isinstance(cfg.block_out_channels, tuple)
