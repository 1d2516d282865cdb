#!/usr/bin/env bash
# The --device cuda path, checked in one go on a machine with a CUDA GPU and no network.
#
#   bash bench/gpu_check.sh wheels   # where PyPI answers: the packages such a machine may lack, into .whl/
#   bash bench/gpu_check.sh run      # on the GPU machine, from the repository root, with .whl/ beside it
#
# `run` installs the wheels into /tmp/site (the machine's own torch, with CUDA, stays), builds the C kernels (the
# CPU side compares with them; without a compiler the numpy paths run), runs the tests that need a GPU and the
# device-path tests, then bench.py with --device-compare cuda: the seed recipe (della_linear) on the Nemo-width family
# (built there first: minutes), then all 20 methods on the small family, each beside the CPU run, bytes compared.
# Results go to $OUT (default bench/work/gpu): machine.txt, build.log, tests.log, nemo.md, small.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/work/gpu}

wheels() {
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 cma==4.5.0
    ls .whl
}

run() {
    mkdir -p "$OUT"
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
            exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || echo "C kernels not built (see build.log)"
    "$PY" - <<'EOF' | tee "$OUT/machine.txt"
import os, torch
from mergesmith.methods import compiled
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, {os.cpu_count()} cores, "
      f"compiled kernels: {compiled.available()}")
EOF
    "$PY" -m pytest -q -p no:cacheprovider tests/test_run.py tests/test_device_paths.py -k "cuda or device_paths" 2>&1 |
        tee "$OUT/tests.log" | tail -5
    # the seed recipe first (the number the README wants), then every method on the small family
    "$PY" bench/bench.py --methods della_linear --no-mergekit --no-compare --device-compare cuda --out "$OUT/nemo.md" |
        grep -E "^\[|device run"
    "$PY" bench/bench.py --small --methods all --no-mergekit --no-compare --device-compare cuda --out "$OUT/small.md" |
        grep -E "^\[|device run" | tail -45
}

case "${1:-run}" in
wheels) wheels ;;
run) run ;;
*)
    echo "usage: bash bench/gpu_check.sh [wheels|run]" >&2
    exit 2
    ;;
esac
