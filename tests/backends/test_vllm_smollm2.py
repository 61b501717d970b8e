"""SmolLM2-135M-Instruct (a real model nobody here made) on the vLLM backend with no engine
options set: ``evomerge eval --backend vllm`` and a search with ``evaluator.backend: vllm``
score every item as the HF backend does (both float32 on CPU).

Runs in the vLLM venv when ``EVOMERGE_SMOLLM2_DIR`` names the directory
scripts/smollm2_from_gguf.py wrote (nothing is downloaded here; skipped otherwise, so also in
CI); scripts/smollm2_vllm.py is the full measurement. Two engine starts of about a minute each
on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm not installed (scripts/setup_vllm_venv.sh)")

MODEL = os.environ.get("EVOMERGE_SMOLLM2_DIR")
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not MODEL or not (Path(MODEL) / "config.json").is_file(),
                                 reason="set EVOMERGE_SMOLLM2_DIR to the output of scripts/smollm2_from_gguf.py")]

_spec = importlib.util.spec_from_file_location(
    "smollm2_vllm", Path(__file__).resolve().parents[2] / "scripts" / "smollm2_vllm.py")
SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SCRIPT)


def test_eval_on_vllm_with_default_engine_options_scores_every_item_as_hf(tmp_path):
    tasks = SCRIPT.write_tasks(tmp_path)
    result = SCRIPT.eval_parity(Path(MODEL), tmp_path, tasks, scorings=("exact",))["exact"]
    assert result["items"] == 17 + 12
    assert result["score_equal"] == result["items"], result["differences"]
    assert result["output_equal"] == result["items"], result["differences"]
    assert 0 < result["mean_score"]["vllm"] < 1          # a real model: some right, some wrong


def test_search_on_vllm_with_default_engine_options_scores_candidates_as_hf(tmp_path):
    from evomerge.io.checkpoint import Checkpoint, write_checkpoint

    # a second source: SmolLM2 with its MLPs scaled (a different model, same architecture)
    ck = Checkpoint(MODEL)
    write_checkpoint(tmp_path / "scaled", ((n, ck.get(n) * (1.1 if "mlp" in n else 1.0)) for n in ck.tensor_names),
                     ck.config, tokenizer_from=MODEL)
    tasks = SCRIPT.write_tasks(tmp_path)
    result = SCRIPT.search_parity({"base": Path(MODEL), "scaled": tmp_path / "scaled"}, tmp_path, tasks, population=2)
    assert len(result["candidates"]) == 2 and result["restarts"] == 0
    assert result["equal"] == 2, result["candidates"]
    for name, source in result["sources"].items():
        assert source["items"] == 17 + 12 and source["item_equal"] == source["items"], name
