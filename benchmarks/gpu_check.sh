#!/usr/bin/env bash
# The GPU check (benchmarks/README.md, "GPU check"), ready for the lent GPU machine as it is: its own
# python3 (torch with CUDA, transformers, accelerate, peft, ... already there), the project from src/ on
# PYTHONPATH (no install step, nothing fetched), and the packages that machine lacks (rouge-score, nltk,
# defusedxml, liger-kernel) installed from the carried wheels folder (`make gpu-wheels` downloads it here).
#
#   benchmarks/gpu_check.sh [--tiny] [--out DIR]    # report: DIR/gpu_check.md (default $OUT, else runs/gpu_check)
#
# On the device tool: carry [".whl"] and run `COMMIT=<short hash> bash benchmarks/gpu_check.sh` with
# timeout_s 540 (it ends in under 8 minutes: each section has its own time limit and a failing one is
# recorded, not fatal; COMMIT names the commit in the report, as the copy there may have no .git).
# `--tiny` runs every section at tiny shapes on any machine (a CPU too): it checks the script, not the GPU.
#
# Variables: PY (default python3), WHEELS (default .whl), SITE (where the wheels go, default
# /tmp/distillm-gpu-site). The carried wheels are all pure Python (py3-none-any), so the same folder
# also installs on the Python 3.11 of the development machines for the local --tiny verification.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/distillm-gpu-site}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # --target: the machine's python3 is a virtual environment (no user site); --no-deps --no-index: its
    # needs are on the machine already and nothing can be fetched there.
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl; then
        echo "gpu_check: installing $WHEELS/*.whl failed; sections that need them will say so" >&2
    fi
else
    echo "gpu_check: no wheels in $WHEELS (run make gpu-wheels here and carry it); ROUGE-L and Liger will be missing" >&2
fi
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
