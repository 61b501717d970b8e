#!/usr/bin/env bash
# Create .venv-mergekit: mergekit 0.1.5 in its own venv, used only by the
# cross-check (scripts/crosscheck_mergekit.py) and the benchmark (scripts/bench_merge.py).
#
# torch is installed FIRST and pinned to the CPU release 2.13.0: mergekit depends on an
# unpinned torch, which would otherwise pull a multi-GB CUDA build.
# Idempotent: a second run with everything in place only checks the versions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERGEKIT_VENV:-$ROOT/.venv-mergekit}"
PY="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
MERGEKIT_SPEC="mergekit==0.1.5"

if [ -x "$VENV/bin/mergekit-yaml" ] && "$VENV/bin/python" - <<'PYCHECK' 2>/dev/null
import importlib.metadata as md, sys
ok = md.version("mergekit") == "0.1.5" and md.version("torch").startswith("2.13.0")
sys.exit(0 if ok else 1)
PYCHECK
then
    echo "mergekit venv ready: $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=(pip_quiet)
# pip warns once per package about the machine's local index folders; those lines are noise.
pip_quiet() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# Pin torch to the CPU wheel before anything can ask for a CUDA one.
"${PIP[@]}" "$TORCH_SPEC"
# Keep that torch while mergekit resolves its own dependencies.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$CONSTRAINTS"
# numpy only silences torch's "Failed to initialize NumPy" warning.
"${PIP[@]}" -c "$CONSTRAINTS" "$MERGEKIT_SPEC" numpy

"$VENV/bin/python" -c 'import importlib.metadata as md, torch; print("mergekit", md.version("mergekit"), "torch", torch.__version__, "cuda", torch.version.cuda)'
echo "mergekit venv ready: $VENV"
