#!/usr/bin/env bash
# One short check for a machine with one NVIDIA GPU (run from the repository root, venv installed with a
# CUDA torch: `make install TORCH_SPEC='torch>=2.4'`):
#   1. the test suite's GPU marks (`pytest -m gpu`),
#   2. one distillation step of a GPT-2 XL-shaped teacher into a GPT-2-shaped student (random weights,
#      bf16, sequence 512, batch 8): seconds/step, tokens/s, MFU, peak memory, dense vs chunked loss.
# Record the figures in benchmarks/RESULTS.md with the device named.
# On a CPU, `benchmarks/gpu_check.sh --tiny` checks that the script itself runs (tiny shapes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
PYEOF

# pytest exits 5 when every GPU test is deselected or skipped for lack of a device: not a failure here.
"$PY" -m pytest -q -m gpu tests || [ $? -eq 5 ]
"$PY" benchmarks/distill_step.py --steps 5 "$@"
