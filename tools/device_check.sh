#!/usr/bin/env bash
# GPU device check: installs the carried wheels (.whl/: diffusers, polygraphy, onnx-graphsurgeon, importlib_metadata
# for Python 3.12; the GPU machines have no package registry), puts the project on PYTHONPATH, runs
# tools/device_check.py and writes $OUT/device_check.json. On a machine without CUDA it is a CPU smoke run.
#   Prepare the wheels here once:  bash tools/device_check.sh --fetch-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 polygraphy==0.53.6 onnx-graphsurgeon==0.6.1 importlib_metadata==8.7.0
  ls -la .whl; exit 0
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export OUT="${OUT:-$(mktemp -d)}"
python3 tools/device_check.py "${@}"
