"""Checkpoint I/O: lazy reading, sharded streaming writes, safety refusals."""

import json

import pytest
import torch

from evomerge.errors import CheckpointError
from evomerge.io.checkpoint import Checkpoint, write_checkpoint
from evomerge.io.synthetic import llama_tensor_shapes, make_tiny_llama


def random_tensors(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {f"model.layers.{i}.w": torch.randn(16, 8 + i, generator=g) for i in range(n)}
    out["model.layers.0.h"] = torch.randn(5, generator=g).to(torch.bfloat16)
    return out


def test_sharded_write_then_read_gives_identical_tensors(tmp_path):
    tensors = random_tensors()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"x": 1}')
    out = write_checkpoint(tmp_path / "m", tensors.items(), {"num_hidden_layers": 12, "architectures": ["LlamaForCausalLM"]},
                           tokenizer_from=tok, max_shard_size=2000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 3
    assert all((out / f).is_file() for f in shard_files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (out / "tokenizer_config.json").read_text() == '{"x": 1}'
    ck = Checkpoint(out)
    assert sorted(ck.tensor_names) == sorted(tensors)
    assert ck.num_layers == 12
    for name, t in tensors.items():
        assert ck.shape(name) == tuple(t.shape) and ck.dtype(name) == t.dtype
        assert torch.equal(ck.get(name), t)


def test_single_shard_has_no_index_and_tied_storage_is_written(tmp_path):
    w = torch.randn(4, 4)
    out = write_checkpoint(tmp_path / "m", [("a", w), ("b", w), ("c", w[:, :2])], {"num_hidden_layers": 1})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ck = Checkpoint(out)
    assert torch.equal(ck.get("b"), w) and torch.equal(ck.get("c"), w[:, :2])


def test_failed_write_leaves_no_directory(tmp_path):
    def broken():
        yield "a", torch.zeros(3)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "m", broken(), {})
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_llama_loads_in_transformers_and_fine_tune_shares_base(tmp_path):
    base = make_tiny_llama(tmp_path / "base", num_layers=2, shards=3, seed=3)
    ft = make_tiny_llama(tmp_path / "ft", base=base, noise=0.01, seed=4)
    b, f = Checkpoint(base), Checkpoint(ft)
    assert (base / "model.safetensors.index.json").is_file()
    expected = dict(llama_tensor_shapes(2, 32, 64, 4, 2, 64, False))
    assert {n: b.shape(n) for n in b.tensor_names} == expected
    delta = f.get("model.layers.1.mlp.up_proj.weight") - b.get("model.layers.1.mlp.up_proj.weight")
    assert 0.008 < delta.std().item() < 0.012
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ft)
    state = model.state_dict()
    assert all(torch.equal(state[n], f.get(n)) for n in f.tensor_names)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_missing_and_non_hf_directories_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        Checkpoint(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"plain is not a Hugging Face model directory"):
        Checkpoint(tmp_path / "plain")


def test_bin_only_model_is_refused_unless_allowed(tmp_path):
    d = tmp_path / "binmodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    torch.save({"w": torch.arange(4.0)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-bin") as err:
        Checkpoint(d)
    assert "\n" not in str(err.value) and "binmodel" in str(err.value)
    ck = Checkpoint(d, allow_bin=True)
    assert torch.equal(ck.get("w"), torch.arange(4.0))


def test_unknown_tensor_is_an_error_naming_model_and_tensor(tmp_path):
    ck = Checkpoint(make_tiny_llama(tmp_path / "m", num_layers=1))
    with pytest.raises(CheckpointError, match=r"has no tensor model.layers.7"):
        ck.get("model.layers.7.mlp.up_proj.weight")


def test_mapped_reads_equal_copied_reads(tmp_path):
    from evomerge.io.synthetic import make_tiny_llama

    path = make_tiny_llama(tmp_path / "m", shards=3, seed=4)
    ck = Checkpoint(path)
    for name in ck.tensor_names:
        mapped = ck.get(name, mapped=True)
        assert mapped.shape == ck.get(name).shape and torch.equal(mapped, ck.get(name))
