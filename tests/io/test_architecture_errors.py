"""Architectures the registry does not know, configs without a layer count, mixed sources: one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main as cli_main
from evomerge.errors import CheckpointError
from evomerge.io.architectures import architecture_of
from evomerge.io.checkpoint import Checkpoint
from tests.io.tiny_archs import build_family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-errors")
    return {arch: build_family(arch, root / arch) for arch in ("llama", "gemma2", "mistral")}


def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of a model directory with its config.json edited."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _merge(tmp_path: Path, a: Path, b: Path, capsys) -> tuple[int, str]:
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                   {"model": str(b), "parameters": {"weight": 0.5}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = cli_main(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "out")])
    return code, capsys.readouterr().err


def _rename(model_type: str, cls: str):
    def edit(config):
        config["model_type"], config["architectures"] = model_type, [cls]
    return edit


def test_an_unknown_architecture_with_gemma_style_norms_is_refused_naming_the_tensor(models, tmp_path, capsys):
    # Gemma's sandwich norms under an unknown name: merging it as a Llama would fold data-flow
    # scales into projections whose output a norm then rescales -- so it is refused.
    mystery = _variant(models["gemma2"]["base"], tmp_path / "m1", _rename("mystery", "MysteryForCausalLM"))
    other = _variant(models["gemma2"]["a"], tmp_path / "m2", _rename("mystery", "MysteryForCausalLM"))
    code, err = _merge(tmp_path, mystery, other, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "architecture mystery is not in evomerge's registry and cannot be inferred as Llama-like" in lines[0]
    assert "layer 0 has tensor post_feedforward_layernorm.weight, which a Llama block does not have" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_unknown_architecture_with_llama_tensors_is_merged_as_a_llama_with_a_note(models, tmp_path, capsys):
    a = _variant(models["llama"]["a"], tmp_path / "m1", _rename("my_llama", "MyLlamaForCausalLM"))
    b = _variant(models["llama"]["b"], tmp_path / "m2", _rename("my_llama", "MyLlamaForCausalLM"))
    code, err = _merge(tmp_path, a, b, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "my_llama" in line]
    assert notes and all(n.startswith("note: ") and "merged as a Llama" in n for n in notes)
    assert Checkpoint(tmp_path / "out").architecture.inferred
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_config_without_a_layer_count_is_a_one_line_error_naming_the_key(models, tmp_path, capsys):
    a = _variant(models["llama"]["a"], tmp_path / "m1", lambda c: c.pop("num_hidden_layers"))
    code, err = _merge(tmp_path, a, models["llama"]["b"], capsys)
    assert code == 2
    assert err.strip() == f"error: {a / 'config.json'} has no num_hidden_layers (the layer count of a llama model)"
    assert not (tmp_path / "out").exists()
    gpt2_like = {"model_type": "gpt2"}
    with pytest.raises(CheckpointError, match=r"^cfg has no n_layer \(the layer count of a gpt2 model\)$"):
        architecture_of(gpt2_like).num_layers(gpt2_like, "cfg")


def test_mixed_architectures_among_the_sources_are_a_one_line_error(models, tmp_path, capsys):
    code, err = _merge(tmp_path, models["llama"]["a"], models["mistral"]["a"], capsys)
    assert code == 2
    assert err.strip() == (f"error: architecture mismatch: {models['llama']['a']} is llama, "
                           f"{models['mistral']['a']} is mistral")
    assert not (tmp_path / "out").exists()

    # The search says the same before it builds a genome space.
    from evomerge.errors import ConfigError
    from evomerge.search.config import build_genome_space, parse_config

    cfg = parse_config({"sources": {"base": str(models["llama"]["base"]), "other": str(models["mistral"]["a"])},
                        "base": "base", "genome": {"kind": "parameter", "method": "ties"},
                        "objectives": [{"name": "x", "task": "zoo/arith"}]}, "search.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"^sources: architecture mismatch: base is llama, other is mistral$"):
        build_genome_space(cfg)


def test_an_unregistered_architecture_without_tensor_names_is_refused():
    with pytest.raises(CheckpointError, match=r"^m: architecture falcon is not in evomerge's registry \(known: llama"):
        architecture_of({"model_type": "falcon"}, where="m")
