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

