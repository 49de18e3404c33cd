#!/usr/bin/env bash
# Create (idempotently) the separate virtualenv holding llm-compressor, the peer fp4roll is measured
# against. llm-compressor is NEVER a dependency of fp4roll: it lives only in this venv, outside the repo.
#
#   benchmarks/peer/setup_llmcompressor_venv.sh [VENV_DIR]
#
# VENV_DIR defaults to $FP4ROLL_HOME/venvs/llmcompressor ($FP4ROLL_HOME defaults to ~/.fp4roll).
# torch is installed FIRST at the CPU build that lies on disk (torch==2.13.0); the rest is checked with
# `pip install --dry-run --report` and refused if it would install or replace torch or any CUDA package.
# Pins: llmcompressor 0.14.0.1 requires transformers<=5.17 and compressed-tensors 0.19.x; those are also
# the versions whose own W4A4 evaluation keeps activation quantization on (newer ones silently drop it).
# A ready venv (marker file with the same pins) is left as is. The install time goes to
# VENV_DIR/fp4roll-peer-install.json.
set -euo pipefail

TORCH_SPEC="torch==2.13.0"
PEER_SPECS=("llmcompressor==0.14.0.1" "transformers==5.17.0" "compressed-tensors==0.19.0")
PYTHON="${PYTHON:-python3}"

home="${FP4ROLL_HOME:-$HOME/.fp4roll}"
venv="${1:-$home/venvs/llmcompressor}"
marker="$venv/fp4roll-peer-install.json"
pins="$TORCH_SPEC ${PEER_SPECS[*]}"

if [[ -f "$marker" ]] && grep -qF "\"pins\": \"$pins\"" "$marker" && "$venv/bin/python" -c \
    "import llmcompressor, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    echo "llm-compressor venv ready: $venv"
    exit 0
fi

started=$(date +%s)
mkdir -p "$(dirname "$venv")"
[[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# 1. torch first: the CPU wheel on disk.
"${pip[@]}" install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -W ignore -c "import torch; v = torch.__version__; assert v.startswith('2.13.0') and torch.version.cuda is None, v"

# 2. look before installing: nothing may replace torch or bring CUDA libraries.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
"${pip[@]}" install -q --dry-run --report "$report" "${PEER_SPECS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" - "$report" <<'PY'
import json, sys
names = [i["metadata"]["name"].lower() for i in json.load(open(sys.argv[1]))["install"]]
bad = [n for n in names if n in {"torch", "triton"} or n.startswith(("nvidia-cu", "nvidia-nccl", "nvidia-nvjit", "nvidia-cusparse", "nvidia-nvtx"))]
if bad:
    sys.exit(f"refusing: the peer install would pull {bad} (a CUDA torch); pin versions that accept torch 2.13")
print(f"dry run: {len(names)} packages to install, torch untouched")
PY

# 3. install.
"${pip[@]}" install -q "${PEER_SPECS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch; assert torch.version.cuda is None and torch.__version__.startswith('2.13.0')"

seconds=$(( $(date +%s) - started ))
"$venv/bin/python" - "$marker" "$seconds" "$pins" <<'PY'
import json, sys, importlib.metadata as md
versions = {p: md.version(p) for p in ("torch", "llmcompressor", "transformers", "compressed-tensors", "accelerate")}
out = {"pins": sys.argv[3], "install_seconds": int(sys.argv[2]), "versions": versions}
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as fh:
    json.dump(out, fh, indent=2)
    fh.write("\n")
import os; os.replace(tmp, sys.argv[1])
print(json.dumps(out))
PY
echo "llm-compressor venv ready: $venv (${seconds}s)"
