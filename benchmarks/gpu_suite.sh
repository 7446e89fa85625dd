#!/usr/bin/env bash
# The one-call GPU suite: environment, CUDA correctness tests, training/forward/sampling/latent speed,
# and the cost of representation alignment (the repa step: bench_repa.py; it needs timm, which .whl/
# carries at the tested version, and the machine's own torchvision, and is skipped with the reason where
# either cannot be imported).
#
#   bash benchmarks/gpu_suite.sh                  # on a CUDA machine, from the repository root
#   bash benchmarks/gpu_suite.sh --budget-s 300   # skip the remaining steps after ~300 s
#   bash benchmarks/gpu_suite.sh --dry-run        # CPU, tiny sizes: the same scripts (CI runs this)
#
# Results go to $OUT/gpu_results.jsonl (one JSON record per step, appended as each step ends) and
# $OUT/gpu_log.txt (everything printed), or to ./gpu_out when OUT is unset. Every flag is passed on
# to benchmarks/gpu_suite.py (`bash benchmarks/gpu_suite.sh --help` lists them).
#
# Before anything else: when diffusers, zarr, numcodecs or timm cannot be imported and wheels are in .whl/
# (written by `make gpu-wheels`, listed in benchmarks/gpu_wheels.txt), they are installed with
# `pip install --no-index --no-deps --target` into a scratch folder that is put on PYTHONPATH; the
# repository root is on PYTHONPATH too (no `pip install -e` needed).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-$REPO/gpu_out}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WHEELS_NOTE="not needed"
if ! "$PYTHON" -c "import diffusers, zarr, numcodecs, timm" >/dev/null 2>&1; then
    SITE="${FCDM_GPU_SITE:-${TMPDIR:-/tmp}/fcdm_gpu_site}"
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        echo "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE" | tee -a "$OUT_DIR/gpu_log.txt"
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$REPO"/.whl/*.whl 2>&1 | tee -a "$OUT_DIR/gpu_log.txt"; then
            export PYTHONPATH="$PYTHONPATH:$SITE"
            WHEELS_NOTE="installed into $SITE: $(cd "$REPO/.whl" && ls *.whl | tr '\n' ' ')"
        else
            WHEELS_NOTE="pip install from .whl/ failed"
        fi
    else
        WHEELS_NOTE="missing and no .whl/ folder: run 'make gpu-wheels' where PyPI is reachable and carry .whl"
    fi
    echo "wheels: $WHEELS_NOTE" | tee -a "$OUT_DIR/gpu_log.txt"
fi
export FCDM_GPU_WHEELS="$WHEELS_NOTE"
exec "$PYTHON" "$REPO/benchmarks/gpu_suite.py" --out "$OUT_DIR" "$@"
