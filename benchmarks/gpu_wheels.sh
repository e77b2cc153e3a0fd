#!/usr/bin/env bash
# Download here the wheels that benchmarks/gpu_check.sh needs on the lent GPU machine and that its image lacks,
# for its Python 3.12 on x86-64 Linux, into WHEELS (default .whl/, ignored by git). Run as `make gpu-wheels`.
#
# What the check imports that the machine's image does not hold (KINDS.md of the device tool lists it):
#   rouge-score   `distillm evaluate` scores ROUGE-L with it (distillm.metrics); needs nltk (Porter stemmer)
#   nltk          rouge-score's stemmer; its needs click, joblib, regex, tqdm are on the machine
#   defusedxml    nltk's one need that the machine lacks
#   liger-kernel  the reference of benchmarks/liger_jsd.py; its needs (torch, triton) are on the machine
# Not carried: datasets (imported only to read a hub dataset by name; the check reads local files), deepspeed
# (not used by the check). Each is pinned: two versions of one package stop the whole install there.
#
# rouge-score has no wheel on PyPI (an sdist only, pure Python): it is built here into a py3-none-any wheel.
# PYVER=3.11 fetches the same set for a local Python 3.11 (the CPU verification of docs in benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PYVER=${PYVER:-3.12}
PY=${PY:-python3}
PACKAGES=("liger-kernel==0.8.5" "nltk==3.10.4" "defusedxml==0.7.1")
SDIST_PACKAGES=("rouge-score==0.1.2")
mkdir -p "$WHEELS"
rm -f "$WHEELS"/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" "${PACKAGES[@]}"
"$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" "${SDIST_PACKAGES[@]}"
for wheel in "$WHEELS"/*.whl; do
    case "$(basename "$wheel")" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp${PYVER/./}-*.whl | *-abi3-*.whl) ;;
        *) echo "gpu_wheels: $wheel does not install on CPython $PYVER" >&2; exit 1 ;;
    esac
done
ls -l "$WHEELS"
wheels=$(du -sb "$WHEELS" | cut -f1)
# What travels besides: tracked files and untracked files git does not ignore (.venv, runs/ are ignored).
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + tree))
printf 'wheels %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64 MiB a device call)\n' \
    "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "gpu_wheels: over the 64 MiB a device call carries" >&2
    exit 1
fi
