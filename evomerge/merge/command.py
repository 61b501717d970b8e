"""``evomerge merge CONFIG.yaml OUT_DIR``: run a mergekit-style recipe.

Model references in the YAML are directory paths (relative ones are taken
from the current directory, as mergekit does). Sources are read lazily from
their memory-mapped files, so the merge needs about one tensor per source
in memory; the output appears at OUT_DIR only once it is complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="mergekit-style merge YAML")
    parser.add_argument("out_dir", type=Path, help="directory to write the merged model to")
    parser.add_argument("--allow-bin", action="store_true",
                        help="also load pickled .bin weights (can run code; only for trusted models)")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:1 ...")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--max-shard-size", type=int, default=2**30, help="bytes per safetensors shard")
    parser.add_argument("--seed", type=int, default=None, help="seed for DARE / DELLA drops (random_seed)")


def run(args: argparse.Namespace) -> int:
    import torch

    from evomerge.merge.engine import SourceSet, merge_to_disk
    from evomerge.merge.plan import MergePlan

    plan = MergePlan.from_yaml(args.config)
    if args.seed is not None:
        plan = plan.model_copy(update={"random_seed": args.seed})
    if args.out_dir.exists() and not args.overwrite:
        raise ConfigError(f"output directory {args.out_dir} already exists (pass --overwrite to replace it)")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    start = time.perf_counter()
    sources = SourceSet.load({m: m for m in plan.referenced_models()}, device=device, resident=False,
                             allow_bin=args.allow_bin)
    out = merge_to_disk(plan, sources, args.out_dir, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({plan.merge_method}, {len(sources.names)} source models) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
