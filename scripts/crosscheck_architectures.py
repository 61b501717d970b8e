#!/usr/bin/env python
"""Cross-check `evomerge merge` against mergekit 0.1.5 on every registered architecture.

For each architecture, tiny random transformers models (4 layers; a base and three noisy
fine-tunes, `tests/io/tiny_archs.py`) go through the deterministic recipes of
configs/mergekit/ in both tools (mergekit-yaml from .venv-mergekit, made by
scripts/setup_mergekit_venv.sh; evomerge in this process), and the outputs are compared
tensor by tensor with scripts/crosscheck_mergekit.py's rules (1e-5 absolute in float32, 2
ulps in float16 / bfloat16), plus the layer count under each architecture's own key. The
random methods (DARE, DELLA) are checked on Llama by crosscheck_mergekit.py; they do not
depend on the architecture.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/crosscheck_architectures.py [--archs llama,gpt2] [--json out.json] [--doc]

--doc writes the table between the crosscheck markers of docs/architectures.md.
Exit status 1 if a recipe differs on a dense architecture beyond the tolerance (and is not
a documented difference).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "architectures.md"
BEGIN, END = "<!-- crosscheck:begin -->", "<!-- crosscheck:end -->"

_spec = importlib.util.spec_from_file_location("crosscheck_mergekit", ROOT / "scripts" / "crosscheck_mergekit.py")
CK = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CK)

DENSE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def build(work: Path, archs: list[str]) -> dict[str, dict[str, Path]]:
    from tests.io.tiny_archs import build_family

    families = {}
    for arch in archs:
        root = work / "models" / arch
        names = CK.PLACEHOLDERS
        if not all((root / n / "config.json").exists() for n in names):
            build_family(arch, root, noise=0.01, names=names, num_layers=4)
        families[arch] = {n: root / n for n in names}
    return families


def recipes(work: Path, families: dict, only: set[str] | None) -> dict[tuple[str, str], tuple[dict, Path]]:
    out = {}
    for path in sorted(CK.CONFIG_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw["merge_method"] in CK.RANDOM_METHODS or (only and path.stem not in only):
            continue
        for arch, models in families.items():
            recipe = CK.substitute(raw, models)
            cfg = work / "configs" / arch / path.name
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
            out[(arch, path.stem)] = (recipe, cfg)
    return out


from evomerge.io.architectures import ARCHITECTURES  # noqa: E402 - after sys.path


def run_evomerge(cfg: Path, out: Path) -> dict:
    from evomerge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["merge", str(cfg), str(out), "--overwrite"])
    if code != 0:
        return {"ok": False, "error": (err.getvalue().strip().splitlines() or ["?"])[-1]}
    return {"ok": True}


def layer_count(path: Path) -> int | None:
    from evomerge.io.architectures import architecture_of

    config = json.loads((path / "config.json").read_text())
    arch = architecture_of(config)
    return arch.config_section(config).get(arch.layer_count_key)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(DENSE + MOE), help="comma-separated model types")
    ap.add_argument("--only", default=None, help="comma-separated recipe names")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--doc", action="store_true", help="write the table into docs/architectures.md")
    args = ap.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="evomerge-crosscheck-archs-"))).resolve()
    archs = args.archs.split(",")
    families = build(work, archs)
    jobs = recipes(work, families, set(args.only.split(",")) if args.only else None)

    def out_dir(tool: str, arch: str, name: str) -> Path:
        d = work / "out" / tool / arch / name
        d.parent.mkdir(parents=True, exist_ok=True)
        return d

    import shutil
    for key in jobs:
        shutil.rmtree(out_dir("mergekit", *key), ignore_errors=True)
    mk = CK.run_mergekit([(f"{a}/{n}", str(cfg), str(out_dir("mergekit", a, n))) for (a, n), (_, cfg) in jobs.items()])
    rows = []
    for (arch, name), (recipe, cfg) in jobs.items():
        row = {"arch": arch, "config": name, "method": recipe["merge_method"], "dtype": recipe.get("dtype")}
        evo_dir, mk_dir = out_dir("evomerge", arch, name), out_dir("mergekit", arch, name)
        evo_r, mk_r = run_evomerge(cfg, evo_dir), mk.get(f"{arch}/{name}", {"ok": False, "error": "not run"})
        if not evo_r["ok"] or not mk_r["ok"]:
            row.update(passed=False, problems=[p for p in (
                "" if mk_r["ok"] else f"mergekit: {mk_r['error']}", "" if evo_r["ok"] else f"evomerge: {evo_r['error']}") if p])
            rows.append(row)
            continue
        evo, theirs = CK.load_dir(evo_dir), CK.load_dir(mk_dir)
        registry = ARCHITECTURES[arch]
        if registry.expert_fusions and any(n.endswith(f.runtime) for n in theirs for f in registry.expert_fusions):
            # mergekit 0.1.5 writes MoE experts fused (transformers 5's runtime layout); evomerge
            # keeps the checkpoint's per-expert layout. Compare in mergekit's layout.
            evo = registry.to_runtime(evo)
            row["layout"] = "compared fused (mergekit writes experts fused)"
        row.update(CK.compare_exact(evo, theirs))
        if not row["passed"] and row.get("layout"):
            # Methods that read whole-tensor statistics (TIES / breadcrumbs cuts, SLERP's angle,
            # model_stock's cosines) see one fused tensor of all experts in mergekit and one
            # tensor per expert here (deliberate, docs/architectures.md). Everything else must agree.
            fused = {f.runtime for f in registry.expert_fusions}
            rest = CK.compare_exact({n: t for n, t in evo.items() if not n.endswith(tuple(fused))},
                                    {n: t for n, t in theirs.items() if not n.endswith(tuple(fused))})
            row["outside_experts"] = rest
            if rest["passed"]:
                row["per_expert_difference"] = True
        n_evo, n_mk = layer_count(evo_dir), layer_count(mk_dir)
        row["layers"] = [n_evo, n_mk]
        if n_evo != n_mk:
            row["passed"] = False
            row["problems"].append(f"layer count {n_evo} vs mergekit {n_mk}")
        rows.append(row)

    documented = CK.DOCUMENTED_DIFFERENCES
    print(f"\nmergekit 0.1.5 vs evomerge, {len(jobs)} (architecture, recipe) pairs\n")
    for r in rows:
        diff = f"{r['max_abs']:.1e}" if "max_abs" in r else "-"
        ulps = "" if not isinstance(r.get("max_ulps"), float) or math.isnan(r["max_ulps"]) else f" ({r['max_ulps']:.1f} ulp)"
        status = "PASS" if r["passed"] else ("documented" if r["config"] in documented else
                                             "per-expert statistics (documented)" if r.get("per_expert_difference")
                                             else "FAIL")
        print(f"{r['arch']:<12} {r['config']:<26} {diff:>8}{ulps:<12} {status}")
        for p in r.get("problems", []):
            print(f"    - {p}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    if args.doc:
        write_doc(rows, archs)
    # Failing means evomerge is at fault: not a documented difference, not mergekit failing or
    # leaving tensors out (its problems, shown in the table), not per-expert statistics.
    failed = [r for r in rows if not r["passed"] and r["config"] not in documented
              and not r.get("per_expert_difference")
              and not all(p.startswith(("mergekit: ", "extra in evomerge: ", "layer count"))
                          for p in r.get("problems", []))]
    print(f"\n{len(failed)} unexplained difference(s)")
    return 1 if failed else 0


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["passed"]:
        if row.get("dtype") in ("float16", "bfloat16") and isinstance(row.get("max_ulps"), float):
            return f"= ({row['max_ulps']:.0f} ulp)"
        return f"= ({row['max_abs']:.0e})" if row.get("max_abs") else "= (0)"
    if row["config"] in CK.DOCUMENTED_DIFFERENCES:
        return "documented"
    if row.get("per_expert_difference"):
        return f"per expert ({row['max_abs']:.0e} in experts; rest =)"
    problem = (row.get("problems") or ["differs"])[0].replace("|", "/")
    if problem.startswith("mergekit: "):
        last = problem.strip().splitlines()[-1].strip().replace("`", "")  # the innermost error
        if "layer_types" in last:
            nums = re.findall(r"\((\d+)\)", last)
            return "mergekit fails: layer_types not restacked" + (f" ({nums[0]} layers, {nums[1]} types)"
                                                                  if len(nums) == 2 else "")
        return "mergekit fails: " + last[:100]
    if problem.startswith("extra in evomerge: "):  # tensors mergekit's output does not have
        first = problem.removeprefix("extra in evomerge: ").strip("[]'.").split("'")[0]
        what = "the routed experts" if ".experts." in first else first
        return f"mergekit omits {what}" + ("; layers not restacked" if any(
            p.startswith("layer count") for p in row["problems"]) else "")
    return "differs: " + problem[:90]


def write_doc(rows: list[dict], archs: list[str]) -> None:
    configs = sorted({r["config"] for r in rows})
    by = {(r["arch"], r["config"]): r for r in rows}
    lines = ["| recipe | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for c in configs:
        lines.append(f"| {c} | " + " | ".join(_cell(by.get((a, c))) for a in archs) + " |")
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + "\n".join(lines) + "\n" + doc[end:])
    print(f"wrote the crosscheck table into {DOC}")


if __name__ == "__main__":
    sys.exit(main())
