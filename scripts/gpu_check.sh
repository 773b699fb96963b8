#!/usr/bin/env bash
# `make gpu-check`: the whole GPU check in one run that fits in 8 minutes, on the GPU machine
# (system python3, no network). Steps, each bounded by a timeout so a hang cannot eat the rest:
#   1. build fastpeft._C for sm_90 (pip install --no-build-isolation --no-deps -e .); a failed
#      CUDA build is reported loudly and the pure-Python package is installed instead
#   2. nvidia-smi -L
#   3. the whole test suite on the GPU (FASTPEFT_AUTOTUNE=0: fixed kernel configs, no tuning)
#   4. every benchmark (benchmarks/run.py, with a time budget)
#   5. the summary table (from the markdown report) and the pytest summary line, last
# Writes benchmarks/results/<date>-<gpu>.{json,md,png} and <date>-<gpu>-{build,tests,bench}.txt,
# and copies benchmarks/results into "$OUT" when that is set.
# Knobs: PYTHON (python3), GPU_CHECK_TOTAL_S (465), BENCH_RESERVE_S (190), BENCH_AUTOTUNE (1).
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-465}      # under the 480 s budget, with a margin
BENCH_RESERVE=${BENCH_RESERVE_S:-190}
PY=${PYTHON:-python3}
RES=benchmarks/results
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }
banner() { echo; echo "==== [$(elapsed)s] $*"; }
copy_out() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$RES" "$OUT/" 2>/dev/null; fi; }
trap copy_out EXIT

mkdir -p "$RES"
SLUG=$($PY - <<'EOF' 2>/dev/null
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
) || SLUG=""
SLUG=${SLUG:-unknown-gpu}
STAMP="$(date -u +%F)-$SLUG"
BUILD_LOG="$RES/$STAMP-build.txt"
TEST_LOG="$RES/$STAMP-tests.txt"
BENCH_LOG="$RES/$STAMP-bench.txt"
[ "$SLUG" = "no-gpu" ] && echo "!!!! torch sees no CUDA GPU: the tests skip GPU cases and the bench runs in CPU mode !!!!"

# ---- 1. build ---------------------------------------------------------------------------
banner "build: FASTPEFT_BUILD_CUDA=1 FASTPEFT_CUDA_ARCHS=90 pip install --no-build-isolation --no-deps -e .  (log: $BUILD_LOG)"
BUILD_STATUS="OK"
T_BUILD=$(clamp $(( $(left) - BENCH_RESERVE - 90 )) 60 200)
{ echo "# $(date -u) $PY $($PY --version 2>&1); nvcc: $(nvcc --version 2>&1 | tail -1)"; } > "$BUILD_LOG"
FASTPEFT_BUILD_CUDA=1 FASTPEFT_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} \
    timeout -k 5 "$T_BUILD" $PY -m pip install --no-build-isolation --no-deps -v -e . >> "$BUILD_LOG" 2>&1
BUILD_RC=$?
if [ $BUILD_RC -ne 0 ]; then
    BUILD_STATUS="FAILED (rc $BUILD_RC$([ $BUILD_RC -eq 124 ] && echo ', timed out'))"
    echo "!!!! CUDA BUILD $BUILD_STATUS; last lines of $BUILD_LOG:"
    grep -iE "error|fatal" "$BUILD_LOG" | tail -15
    tail -5 "$BUILD_LOG"
    echo "!!!! continuing with the pure-Python package (FASTPEFT_BUILD_CUDA=0): the cuda backend is NOT measured"
    echo "# ---- fallback: FASTPEFT_BUILD_CUDA=0" >> "$BUILD_LOG"
    FASTPEFT_BUILD_CUDA=0 timeout -k 5 60 $PY -m pip install --no-build-isolation --no-deps -e . >> "$BUILD_LOG" 2>&1 \
        || echo "!!!! the pure-Python install FAILED too (see $BUILD_LOG)"
fi
if ! $PY -P -c "import fastpeft.kernels.lora" >/dev/null 2>&1; then
    # editable installs of the kernels/ -> fastpeft.kernels mapping need setuptools >= 70
    echo "!!!! fastpeft.kernels does not import after the editable install (setuptools $($PY -c 'import setuptools; print(setuptools.__version__)' 2>&1)); installing non-editable"
    echo "# ---- fallback: non-editable install" >> "$BUILD_LOG"
    FASTPEFT_BUILD_CUDA=1 FASTPEFT_CUDA_ARCHS=90 timeout -k 5 "$T_BUILD" \
        $PY -m pip install --no-build-isolation --no-deps . >> "$BUILD_LOG" 2>&1 \
        || echo "!!!! the non-editable install FAILED too (see $BUILD_LOG)"
fi
C_STATUS=$($PY -P -c "import fastpeft._C; print('fastpeft._C imports')" 2>&1 | tail -1)
case "$C_STATUS" in
    "fastpeft._C imports") ;;
    *) echo "!!!! fastpeft._C does not import ($C_STATUS): the cuda backend is NOT measured"
       BUILD_STATUS="$BUILD_STATUS; fastpeft._C NOT importable" ;;
esac
PKG=$($PY -P -c "import fastpeft, fastpeft.kernels.lora; print('fastpeft from', fastpeft.__file__)" 2>&1 | tail -1)
echo "build: $BUILD_STATUS in $(elapsed)s; $C_STATUS; $PKG"
echo "# result: $BUILD_STATUS; $C_STATUS; $PKG" >> "$BUILD_LOG"

# ---- carried wheels (e.g. bitsandbytes, the int8 peer, which the GPU machine lacks): the
# device tool copies .whl/ when a call names it in `carry` (see benchmarks/README.md)
if ls .whl/*.whl >/dev/null 2>&1; then
    banner "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "!!!! installing the carried wheels FAILED: their peers are recorded as not installed"
fi

# ---- 2. device ------------------------------------------------------------------------
banner "device"
nvidia-smi -L 2>&1 || echo "(nvidia-smi failed)"

# ---- 3. tests ---------------------------------------------------------------------------
# First compile the launches of the tests' fixed configs and of the benchmark's autotune
# configs in parallel into triton's on-disk cache (16 cores; one compile is single-threaded),
# then run the suite in TEST_SHARDS parallel pytest processes (-P: the repo root must not
# shadow packages such as Hugging Face's `kernels` with our kernels/ folder).
banner "warm triton's cache: tests/_aot.py --warm"
AOT_JOBS=${AOT_JOBS:-14} timeout -k 5 150 $PY -P tests/_aot.py --warm 2>&1 | tail -8
T_TEST=$(clamp $(( $(left) - BENCH_RESERVE )) 60 240)
NSHARD=${TEST_SHARDS:-8}
banner "tests: FASTPEFT_AUTOTUNE=0 pytest in $NSHARD shards (timeout ${T_TEST}s; log: $TEST_LOG)"
PIDS=()
for i in $(seq 0 $((NSHARD - 1))); do
    FASTPEFT_AUTOTUNE=0 timeout -k 5 "$T_TEST" $PY -P -m pytest -q -rfEs -p no:cacheprovider \
        --shard "$i/$NSHARD" tests > "$TEST_LOG.$i" 2>&1 &
    PIDS+=($!)
done
TEST_RC=0
for pid in "${PIDS[@]}"; do wait "$pid" || TEST_RC=$?; done
: > "$TEST_LOG"
for i in $(seq 0 $((NSHARD - 1))); do
    { echo "# ---- shard $i/$NSHARD"; cat "$TEST_LOG.$i"; } >> "$TEST_LOG"
    rm -f "$TEST_LOG.$i"
done
TEST_LINE=$(grep -E "^[=]* ?[0-9]+ (passed|failed|error|errors|skipped|deselected)" "$TEST_LOG" \
    | grep -oE "[0-9]+ (passed|failed|errors?|skipped)" \
    | awk '{n[$2]+=$1} END {printf "%d passed, %d failed, %d skipped, %d errors (all shards)", n["passed"], n["failed"], n["skipped"], n["error"]+n["errors"]}')
if [ $TEST_RC -eq 124 ] || [ $TEST_RC -eq 137 ]; then
    echo "# TIMED OUT after ${T_TEST}s" >> "$TEST_LOG"
    TEST_LINE="TIMED OUT after ${T_TEST}s; ${TEST_LINE}"
fi
grep -E "^(FAILED|ERROR) " "$TEST_LOG" | head -30
echo "tests: rc $TEST_RC: ${TEST_LINE:-no summary line (see $TEST_LOG)}"

# ---- 4. benchmarks --------------------------------------------------------------------
T_BENCH=$(clamp $(( $(left) - 10 )) 60 300)
BUDGET=$(( T_BENCH - 40 ))   # no new shape after this; leaves time to finish one and write
banner "bench: benchmarks/run.py --budget ${BUDGET} (timeout ${T_BENCH}s; FASTPEFT_AUTOTUNE=${BENCH_AUTOTUNE:-1})"
FASTPEFT_AUTOTUNE=${BENCH_AUTOTUNE:-1} timeout -k 10 "$T_BENCH" \
    $PY benchmarks/run.py --stamp "$STAMP" --out-dir "$RES" --budget "$BUDGET" 2>&1 | tee "$BENCH_LOG" \
    | grep --line-buffered -vE "^(op |---|lora_linear )"
BENCH_RC=${PIPESTATUS[0]}

# ---- 5. summary -----------------------------------------------------------------------
banner "summary (total $(elapsed)s)"
echo "build:  $BUILD_STATUS; $C_STATUS"
echo "bench:  rc $BENCH_RC$([ "$BENCH_RC" = 124 ] && echo ' (TIMED OUT)')$([ "$BENCH_RC" = 2 ] && echo ' (interrupted: partial)'); files:"
ls -1 "$RES" | grep -F "$STAMP" | sed 's/^/  /'
MD="$RES/$STAMP.md"
if [ -f "$MD" ]; then
    echo
    awk '/^## Summary/{p=1; next} /^## /{p=0} p' "$MD"
else
    echo "!!!! no $MD: the benchmark wrote nothing"
fi
echo
echo "pytest: ${TEST_LINE:-no summary line (see $TEST_LOG)}"
copy_out
