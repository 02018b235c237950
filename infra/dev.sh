#!/usr/bin/env bash
# Developer entry point on a fresh machine (Python 3.10+ with venv):
#   bash infra/dev.sh setup   create .venv and install semvec with its test tools
#   bash infra/dev.sh demo    setup, then run the backfill job on the embedded defaults
#   bash infra/dev.sh test    setup, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {
  local stamp="$VENV/.semvec-installed" want
  want=$(cat pyproject.toml infra/dev.sh | sha256sum | cut -c1-16)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return; fi
  [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned: the CPU build here; an unpinned torch would pull a multi-GB CUDA build.
  # On a GPU machine install the torch you want first; the range in pyproject.toml accepts it.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==${SEMVEC_TORCH:-2.13.0}"
  "$VENV/bin/pip" install -q -e ".[test,tracking]"
  echo "$want" > "$stamp"
}

case "${1:-}" in
  setup) setup ;;
  demo)
    setup
    "$VENV/bin/python" -m pipelines.backfill --config pipelines/configs/backfill.yaml --overwrite
    ;;
  test)
    setup
    shift
    "$VENV/bin/ruff" check semvec pipelines tests benchmarks infra
    # Two workers, a test file each at a time: most of a test is waiting on processes it started
    # (Ray, S3, MLflow), so two run in about 80% of the time of one after the other.
    "$VENV/bin/python" -m pytest -n "${SEMVEC_TEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"
    ;;
  *) echo "usage: bash infra/dev.sh setup|demo|test [pytest args]" >&2; exit 2 ;;
esac
