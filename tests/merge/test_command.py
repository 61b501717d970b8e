"""`evomerge merge CONFIG.yaml OUT_DIR` end to end, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.synthetic import make_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_tiny_llama(root / "base", num_layers=2)
    (base / "tokenizer_config.json").write_text("{}")
    ft = make_tiny_llama(root / "ft", base=base, noise=0.01, seed=1)
    wide = make_tiny_llama(root / "wide", num_layers=2, hidden_size=64, num_attention_heads=4)
    (root / "plain").mkdir()
    binonly = root / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text(json.dumps(Checkpoint(base).config))
    torch.save({"model.norm.weight": torch.ones(32)}, binonly / "pytorch_model.bin")
    return {"base": str(base), "ft": str(ft), "wide": str(wide), "plain": str(root / "plain"),
            "binonly": str(binonly), "missing": str(root / "missing")}


def recipe(models, tmp_path, *, method="task_arithmetic", other="ft", params=None):
    cfg = {"merge_method": method, "base_model": models["base"], "dtype": "float32",
           "models": [{"model": models[other], "parameters": {"weight": 0.5}}],
           "parameters": params or {}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_merges_a_mergekit_yaml(models, tmp_path):
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe(models, tmp_path)), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # The process skips the interpreter's teardown (cli.entry): its last line still got out.
    assert proc.stderr.strip().splitlines()[-1].startswith(f"wrote {out} (task_arithmetic")
    ck, base, ft = Checkpoint(out), Checkpoint(models["base"]), Checkpoint(models["ft"])
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(ck.get(name), base.get(name) + 0.5 * (ft.get(name) - base.get(name)))
    assert (out / "tokenizer_config.json").is_file() and (out / "mergekit_config.yml").is_file()


def test_cli_bad_case_is_one_line_exit_2_without_traceback(models, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge",
                           str(recipe(models, tmp_path, other="wide")), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "shape mismatch" in proc.stderr and not out.exists()


@pytest.mark.parametrize("case, kw, message", [
    ("missing dir", {"other": "missing"}, "missing does not exist"),
    ("non-HF folder", {"other": "plain"}, "plain is not a Hugging Face model directory"),
    ("mismatched shapes", {"other": "wide"}, "shape mismatch for tensor"),
    ("unknown method", {"method": "ties_plus"}, "unknown merge_method 'ties_plus'"),
    ("density 1.5", {"method": "ties", "params": {"density": 1.5}}, r"density: 1.5 is outside \[0, 1\]"),
    ("negative t", {"method": "slerp", "params": {"t": -0.5}}, r"t: -0.5 is outside \[0, 1\]"),
    (".bin-only", {"other": "binonly"}, "pass --allow-bin"),
])
def test_bad_inputs(models, tmp_path, capsys, case, kw, message):
    out = tmp_path / "merged"
    assert main(["merge", str(recipe(models, tmp_path, **kw)), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
