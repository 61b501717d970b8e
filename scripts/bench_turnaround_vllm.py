"""Candidate turnaround with the vLLM backend: weights swapped into one running engine vs a
fresh engine started from disk for every candidate.

    .venv-vllm/bin/python scripts/bench_turnaround_vllm.py [--candidates 3] [--items 100]
        [--hidden 64 --layers 4 --heads 2] [--model-dir DIR] [--device cpu|cuda] [--task zoo/arith]

Per candidate, the in-place path is ``load_weights`` (reload into the running engine) +
``score`` on the items; the restart path is writing the candidate to disk + starting an engine
on it + ``score``. Both must give the same per-item outputs (checked). Prints the timings and
the ratio. ``turnaround_vllm(...)`` returns the same numbers for the project's turnaround
benchmark. Without --model-dir a random Llama with the zoo tokenizer is made (head_dim 32:
the smallest vLLM's CPU attention supports).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_model(path: Path, hidden: int, layers: int, heads: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=build_tokenizer().get_vocab_size(), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=128, tie_word_embeddings=True,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return path


def candidates(model_dir: Path, n: int) -> list[dict[str, torch.Tensor]]:
    """n perturbed copies of the model's weights (stand-ins for merged candidates)."""
    from evomerge.io.checkpoint import Checkpoint

    ck = Checkpoint(model_dir)
    out = []
    for k in range(n):
        gen = torch.Generator().manual_seed(100 + k)
        out.append({name: ck.get(name) + 0.05 * torch.randn(ck.shape(name), generator=gen)
                    for name in ck.tensor_names})
    return out


def turnaround_vllm(model_dir: str | Path, n_candidates: int = 3, n_items: int = 100, task_name: str = "zoo/arith",
                    device: str = "cpu", **engine_kw) -> dict:
    from evomerge.backends.vllm_backend import VLLMBackend
    from evomerge.io.checkpoint import write_checkpoint
    from evomerge.tasks.task import load_task

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    task = load_task(task_name)
    indices = list(range(min(n_items, len(task.items))))
    cands = candidates(model_dir, n_candidates)

    t = time.perf_counter()
    import vllm  # noqa: F401  (timed apart: a worker pays it once per process)

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    backend = VLLMBackend(model_dir, device=device, **engine_kw)
    start_s = time.perf_counter() - t
    backend.score(task, indices[:4])          # first request pays one-off warm-up
    swap_s, score_s, swapped = [], [], []
    for weights in cands:
        t = time.perf_counter()
        backend.load_weights(weights, config)
        swap_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        swapped.append([r.output for r in backend.score(task, indices)])
        score_s.append(time.perf_counter() - t)
    backend.close()

    restart_s, restart_start_s, mismatches = [], [], 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    try:
        for k, weights in enumerate(cands):
            t = time.perf_counter()
            path = write_checkpoint(tmp / f"c{k}", weights.items(), config, tokenizer_from=model_dir)
            t_start = time.perf_counter()
            fresh = VLLMBackend(path, device=device, **engine_kw)
            restart_start_s.append(time.perf_counter() - t_start)
            outputs = [r.output for r in fresh.score(task, indices)]
            restart_s.append(time.perf_counter() - t)
            fresh.close()
            mismatches += sum(a != b for a, b in zip(outputs, swapped[k]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    inplace = [a + b for a, b in zip(swap_s, score_s)]
    return {
        "device": device, "items": len(indices), "candidates": n_candidates, "task": task_name,
        "import_vllm_s": import_s, "engine_start_s": start_s, "swap_s": statistics.median(swap_s), "score_s": statistics.median(score_s),
        "inplace_turnaround_s": statistics.median(inplace),
        "restart_engine_start_s": statistics.median(restart_start_s),
        "restart_turnaround_s": statistics.median(restart_s),
        "speedup": statistics.median(restart_s) / statistics.median(inplace),
        "output_mismatches": mismatches,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--task", default="zoo/arith")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_model(Path(tmp) / "model", args.hidden, args.layers, args.heads)
        r = turnaround_vllm(model_dir, args.candidates, args.items, args.task, args.device)
    print(f"vLLM turnaround on {r['device']}, {r['items']} items of {r['task']}, "
          f"median of {r['candidates']} candidates")
    print(f"  import vllm (once):           {r['import_vllm_s']:7.2f} s")
    print(f"  engine start (once):          {r['engine_start_s']:7.2f} s")
    print(f"  in place: swap {r['swap_s']:.3f} s + score {r['score_s']:.2f} s = {r['inplace_turnaround_s']:.2f} s")
    print(f"  restart:  write + start {r['restart_engine_start_s']:.2f} s + score = {r['restart_turnaround_s']:.2f} s")
    print(f"  restart / in place = {r['speedup']:.1f}x   output mismatches: {r['output_mismatches']}")
    if r["output_mismatches"]:
        raise SystemExit("in-place swap and fresh engine disagree")


if __name__ == "__main__":
    main()
