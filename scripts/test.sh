#!/usr/bin/env bash
# Set up ./.venv if needed, lint, then run the whole test suite on CPU (multi-rank tests use the real launcher).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check . && .venv/bin/ruff format --check .  # lint and format, config in pyproject.toml
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
