#!/usr/bin/env bash
# Create .venv-mergenetic: Mergenetic 0.1.1 (+ mergekit 0.0.6, transformers 4.45.2) on a CPU
# torch, used only by experiments/search_quality.py through experiments/mergenetic_adapter.py.
#
# Mergenetic and mergekit 0.0.6 are installed with --no-deps: their pinned dependencies include
# vllm / lm-eval[vllm] / bitsandbytes / gradio, which would pull a multi-GB CUDA torch. What
# they need on CPU is installed explicitly below. What stays missing (lm-eval, vllm, fastText)
# is only imported by Mergenetic's predefined problems; the adapter shims those imports.
# Pins beyond the obvious: pydantic~=2.10.6 (mergekit 0.0.6 fails to import with pydantic
# 2.11+: "Unable to generate pydantic-core schema for torch.Tensor"), pandas 2.2.2 (Mergenetic's pin).
# Idempotent: a second run with everything in place only checks the versions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERGENETIC_VENV:-$ROOT/.venv-mergenetic}"
PY="${PYTHON:-python3}"

check() {
    "$VENV/bin/python" - <<'PYCHECK' 2>/dev/null
import importlib.metadata as md, sys
want = {"mergenetic": "0.1.1", "mergekit": "0.0.6", "transformers": "4.45.2", "pymoo": "0.6.1.3"}
ok = all(md.version(k) == v for k, v in want.items()) and md.version("torch").startswith("2.13.0")
ok = ok and md.version("pydantic").startswith("2.10.")
sys.exit(0 if ok else 1)
PYCHECK
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "mergenetic venv ready: $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip warns once per package about the machine's local index folders; those lines are noise.
pip_quiet() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# The CPU torch first, so nothing below can ask for a CUDA one.
pip_quiet "torch==2.13.0"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$CONSTRAINTS"

pip_quiet --no-deps "mergenetic==0.1.1" "mergekit==0.0.6"
pip_quiet -c "$CONSTRAINTS" "transformers==4.45.2" "pymoo==0.6.1.3" "accelerate==1.3.0" "pandas==2.2.2" \
    scikit-learn psutil pyyaml einops "pydantic~=2.10.6" safetensors "numpy<2.3" tqdm click immutables \
    huggingface_hub sentencepiece protobuf peft gitpython matplotlib

"$VENV/bin/python" -c 'import importlib.metadata as md, torch; print("mergenetic", md.version("mergenetic"), "mergekit", md.version("mergekit"), "transformers", md.version("transformers"), "torch", torch.__version__, "cuda", torch.version.cuda)'
check || { echo "mergenetic venv: versions are not the expected ones" >&2; exit 1; }
echo "mergenetic venv ready: $VENV"
