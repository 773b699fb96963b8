#!/usr/bin/env bash
# `make gpu-check`: the GPU check on the GPU machine (system python3, no network), in three
# stages that each end with their results written to benchmarks/results/ and copied to "$OUT"
# (when set), so a timeout in a later stage keeps the earlier stages' results:
#   0. install the pure-Python package (seconds); install the carried AOT cache pack of Triton
#      kernels when there is one (build/aot-pack: tests/_aot.py --pack, benchmarks/NOTES.md);
#      start building fastpeft._C for sm_90 in the background (nvcc, about a minute)
#   1. (<= STAGE1_S = 180 s from the start, compilation included) one correctness test per kernel
#      family, dtype (bf16 first) and backend, in parallel shards: the Triton ones while nvcc
#      builds, then the CUDA C++ ones once fastpeft._C is in place -> <stamp>-stage1.md
#   2. the whole suite (FASTPEFT_AUTOTUNE=0, TEST_SHARDS parallel shards), while tests/_aot.py
#      --warm compiles the benchmark's launches into triton's cache beside it -> <stamp>-tests.txt
#   3. every benchmark (benchmarks/run.py with a time budget) -> <stamp>.{json,md,png}, <stamp>-bench.txt
# then the summary (stage 1's table, the benchmark's summary table, the pytest line) last.
# Files: benchmarks/results/<date>-<gpu>{-build.txt,-stage1.md,-tests.txt,-bench.txt,.json,.md,.png}.
# Knobs: PYTHON (python3), GPU_CHECK_TOTAL_S (465: under the 480 s budget), STAGE1_S (180),
# BENCH_RESERVE_S (160), TEST_SHARDS (8), STAGE1_SHARDS (8), BENCH_AUTOTUNE (1).
# `bash scripts/gpu_check.sh --stage1-plugin DIR` only writes stage 1's pytest plugin into DIR
# (to try the selection anywhere: pytest -p stage1_select --stage1=triton --collect-only).
set -uo pipefail
cd "$(dirname "$0")/.."

write_stage1_plugin() {  # $1: directory; the plugin that picks stage 1's tests and records them
mkdir -p "$1"
cat > "$1/stage1_select.py" <<'EOF'
"""make gpu-check, stage 1: one test per kernel family, dtype and backend (bf16 first).

pytest -p stage1_select --stage1=triton|cuda: keeps, of the collected tests, the best-matching
(preferred parameter values) item of each (family, dtype, backend[, variant]) group named in SPEC (backend "triton" for tests
without a backend parameter; "torch" is never kept) for the chosen backends, ordered bf16, fp16,
fp32; with STAGE1_RESULTS set, appends "family dtype backend outcome seconds nodeid compiled
cache-hits" a test to it (Triton kernels compiled / read from triton's cache during the test).
Runs before the suite's --shard selection (tryfirst), which then splits the kept items."""
import os
import time

import pytest
import torch

# family, test file, test function, dtype of a test without a dtype parameter, backend of a
# test without a backend parameter, preferred parameter values (more matches first; else the
# first collected), the parameter that makes variants (each kept)
SPEC = [
    ("lora", "test_lora_op.py", "test_matches_reference", None, None, {"shape": (65, 96, 130), "r": 16}, None),
    ("int8", "test_int8.py", "test_int8_linear_matches_reference_and_grads", None, None, {"threshold": 6.0}, None),
    ("quant", "test_quant.py", "test_round_trip_guarantees", None, None,
     {"bits": 4, "scheme": "zeropoint", "group_size": 16}, None),
    ("qlinear", "test_qlinear.py", "test_kernel_forward", None, None, {"bits": 4, "scheme": "zeropoint", "K": 256}, None),
    ("qlinear", "test_qlinear.py", "test_kernel_bf16_gpu", torch.bfloat16, None, {"bits": 4, "M": 33}, None),
    ("qlinear-a8", "test_act_quant.py", "test_a8_kernel_matches_reference", None, None,
     {"activations": "dynamic", "bits": 4, "scheme": "zeropoint"}, None),
    ("fakequant", "test_fakequant.py", "test_half_precision", None, None, {}, None),
    ("fakequant", "test_fakequant.py", "test_forward_and_gradients", torch.float32, None,
     {"scheme": "zeropoint", "bits": 8}, None),
    ("bottleneck", "test_bottleneck.py", "test_matches_reference", None, None, {"act": "gelu"}, None),
    ("bottleneck", "test_bottleneck.py", "test_cuda_backend_is_wired", "any", "cuda", {}, None),
    ("multi_lora", "test_multi_lora_op.py", "test_matches_reference", None, None, {"pattern": "mixed"}, "regime"),
    ("nf4", "test_nf4_linear.py", "test_matches_reference", None, None, {}, None),
    ("nf4", "test_nf4.py", "test_kernels_match_reference", torch.float32, None, {"scheme": "nf4", "double_quant": True},
     None),
    ("distill", "test_distill.py", "test_matches_reference", None, None, {"divergence": "jsd"}, None),
    ("distill", "test_distill.py", "test_gpu_bf16_large_vocab", torch.bfloat16, None, {"divergence": "jsd"}, None),
]
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", "any": "any"}
ORDER = ["bf16", "fp16", "fp32", "any"]
FAMILIES = list(dict.fromkeys(s[0] for s in SPEC))
GROUP = {}  # nodeid -> (family, dtype, backend)


def pytest_addoption(parser):
    parser.addoption("--stage1", default="triton,cuda", help="backends to keep: triton, cuda or both")


def _group(item, spec):
    family, _, _, dtype, backend, _, variant = spec
    params = getattr(getattr(item, "callspec", None), "params", {})
    dt = next((v for v in params.values() if isinstance(v, torch.dtype)), dtype)
    if dt not in DTYPES:
        return None
    be = params.get("backend", backend or "triton")
    return family, DTYPES[dt], be, params.get(variant) if variant else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    backends = config.getoption("--stage1").split(",")
    best = {}
    for pos, item in enumerate(items):
        for spec in SPEC:
            if item.path.name != spec[1] or item.originalname != spec[2]:
                continue
            g = _group(item, spec)
            if g is None or g[2] not in backends:
                continue
            params = getattr(getattr(item, "callspec", None), "params", {})
            score = (sum(params.get(k, object()) == v for k, v in spec[5].items()), -pos)
            if g not in best or score > best[g][0]:
                best[g] = (score, item)
    keep = sorted(best.items(), key=lambda kv: (ORDER.index(kv[0][1]), FAMILIES.index(kv[0][0]), kv[0][2],
                                                str(kv[0][3])))
    kept = {id(item) for _, (_, item) in keep}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
    items[:] = [item for _, (_, item) in keep]
    GROUP.update({item.nodeid: g[:3] for g, (_, item) in keep})


COMPILES = {"compiled": 0, "cache hits": 0, "compile s": 0.0}  # triton.compile calls of this process


def _listen(*, src, metadata, metadata_group, times, cache_hit):
    COMPILES["cache hits" if cache_hit else "compiled"] += 1
    COMPILES["compile s"] += getattr(times, "total", 0.0) if not cache_hit else 0.0


def pytest_configure(config):
    try:  # triton's compilation listener: counts kernels compiled and found in triton's cache
        import triton
        triton.knobs.compilation.listener = _listen
    except (ImportError, AttributeError):
        pass


def pytest_runtest_setup(item):
    COMPILES.update({"compiled": 0, "cache hits": 0, "compile s": 0.0})


def pytest_runtest_logreport(report):
    path = os.environ.get("STAGE1_RESULTS")
    if not path or report.nodeid not in GROUP:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "error" if report.when == "setup" and report.failed else report.outcome
        family, dtype, backend = GROUP[report.nodeid]
        with open(path, "a") as f:
            f.write(f"{family}\t{dtype}\t{backend}\t{outcome}\t{report.duration:.1f}\t{report.nodeid}\t"
                    f"{COMPILES['compiled']}\t{COMPILES['cache hits']}\n")
EOF
}

if [ "${1:-}" = "--stage1-plugin" ]; then
    write_stage1_plugin "${2:?--stage1-plugin DIR}"
    exit 0
fi

START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-465}      # under the 480 s budget, with a margin
STAGE1_S=${STAGE1_S:-180}
BENCH_RESERVE=${BENCH_RESERVE_S:-160}
PY=${PYTHON:-python3}
RES=benchmarks/results
WORK=build/gpu-check                 # ignored scratch: the stage 1 plugin, its raw results, the extension build
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }
banner() { echo; echo "==== [$(elapsed)s] $*"; }
# this run's files, flat into $OUT (the device tool brings back at most 8 files)
copy_out() { if [ -n "${OUT:-}" ] && [ -n "${STAMP:-}" ]; then mkdir -p "$OUT" && cp "$RES/$STAMP"* "$OUT/" 2>/dev/null; fi; return 0; }
trap copy_out EXIT

mkdir -p "$RES" "$WORK"
SLUG=$($PY - <<'EOF' 2>/dev/null
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
) || SLUG=""
SLUG=${SLUG:-unknown-gpu}
STAMP="$(date -u +%F)-$SLUG"
# never overwrite an earlier run's results (as benchmarks/run.py does): <stamp>-2, -3, ...
N=1; BASE_STAMP=$STAMP
while compgen -G "$RES/$STAMP.*" >/dev/null || compgen -G "$RES/$STAMP-*.txt" >/dev/null || compgen -G "$RES/$STAMP-stage1.md" >/dev/null; do
    N=$((N + 1)); STAMP="$BASE_STAMP-$N"
done
BUILD_LOG="$RES/$STAMP-build.txt"
STAGE1_MD="$RES/$STAMP-stage1.md"
TEST_LOG="$RES/$STAMP-tests.txt"
BENCH_LOG="$RES/$STAMP-bench.txt"
[ "$SLUG" = "no-gpu" ] && echo "!!!! torch sees no CUDA GPU: the tests skip GPU cases and the bench runs in CPU mode !!!!"

# ---- 0. install, AOT pack, CUDA build in the background ----------------------------------
banner "install: FASTPEFT_BUILD_CUDA=0 pip install --no-build-isolation --no-deps -e .  (log: $BUILD_LOG)"
{ echo "# $(date -u) $PY $($PY --version 2>&1); nvcc: $(nvcc --version 2>&1 | tail -1)"; } > "$BUILD_LOG"
FASTPEFT_BUILD_CUDA=0 timeout -k 5 90 $PY -m pip install --no-build-isolation --no-deps -e . >> "$BUILD_LOG" 2>&1 \
    || echo "!!!! the pure-Python install FAILED (see $BUILD_LOG)"
if ! $PY -P -c "import fastpeft.kernels.lora" >/dev/null 2>&1; then
    # editable installs of the kernels/ -> fastpeft.kernels mapping need setuptools >= 70
    echo "!!!! fastpeft.kernels does not import after the editable install (setuptools $($PY -c 'import setuptools; print(setuptools.__version__)' 2>&1)); installing non-editable"
    echo "# ---- fallback: non-editable install" >> "$BUILD_LOG"
    FASTPEFT_BUILD_CUDA=0 timeout -k 5 90 $PY -m pip install --no-build-isolation --no-deps . >> "$BUILD_LOG" 2>&1 \
        || echo "!!!! the non-editable install FAILED too (see $BUILD_LOG)"
fi
PKG_DIR=$($PY -P -c "import fastpeft, os; print(os.path.dirname(fastpeft.__file__))" 2>/dev/null | tail -1)
echo "fastpeft from ${PKG_DIR:-NOWHERE} in $(elapsed)s"

# fastpeft._C in the background (stage 1's Triton tests run meanwhile): built apart, then moved
# into the installed package in one rename, so no test process loads a half-written module
T_BUILD=$(clamp $(( STAGE1_S - 20 - $(elapsed) )) 60 200)
rm -rf "$WORK/ext" "$WORK/ext-tmp"
( FASTPEFT_BUILD_CUDA=1 FASTPEFT_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} timeout -k 5 "$T_BUILD" \
      $PY setup.py build_ext --build-lib "$WORK/ext" --build-temp "$WORK/ext-tmp" > "$WORK/build-ext.log" 2>&1 ) &
BUILD_PID=$!

# the carried AOT cache pack (tests/_aot.py --pack on a machine without a GPU; carry build/aot-pack)
if [ -f build/aot-pack/manifest.json ]; then
    banner "install the AOT cache pack: tests/_aot.py --install-pack build/aot-pack"
    timeout -k 5 60 $PY -P tests/_aot.py --install-pack build/aot-pack 2>&1 | tail -4 | tee -a "$BUILD_LOG"
fi

# ---- carried wheels (e.g. bitsandbytes, the int8 peer, which the GPU machine lacks): the
# device tool copies .whl/ when a call names it in `carry` (see benchmarks/README.md)
if ls .whl/*.whl >/dev/null 2>&1; then
    banner "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "!!!! installing the carried wheels FAILED: their peers are recorded as not installed"
fi

banner "device"
nvidia-smi -L 2>&1 || echo "(nvidia-smi failed)"

# ---- 1. stage 1: one test per kernel family, dtype and backend ---------------------------
write_stage1_plugin "$WORK"
STAGE1_RAW="$WORK/stage1.tsv"
: > "$STAGE1_RAW"
STAGE1_FILES="tests/test_lora_op.py tests/test_int8.py tests/test_quant.py tests/test_qlinear.py tests/test_act_quant.py
              tests/test_fakequant.py tests/test_bottleneck.py tests/test_multi_lora_op.py tests/test_distill.py
              tests/test_nf4_linear.py tests/test_nf4.py"
stage1() {  # $1: backends, $2: timeout (s), $3: shards
    local pids=() i rc=0
    for i in $(seq 0 $(( $3 - 1 ))); do
        FASTPEFT_AUTOTUNE=0 STAGE1_RESULTS="$STAGE1_RAW" PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" \
            timeout -k 5 "$2" $PY -P -m pytest -q -rfEs -p no:cacheprovider -p stage1_select --stage1="$1" \
            --shard "$i/$3" $STAGE1_FILES > "$WORK/stage1-$1.$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; local r=$?; [ $r -gt 1 ] && [ $r -ne 5 ] && rc=$r; done
    return $rc
}
T1=$(clamp $(( STAGE1_S - 25 - $(elapsed) )) 45 170)
banner "stage 1a: Triton, one test per family x dtype (bf16 first), ${STAGE1_SHARDS:-8} shards (timeout ${T1}s)"
stage1 triton "$T1" "${STAGE1_SHARDS:-8}"
S1A_RC=$?

banner "fastpeft._C: waiting for the background build (log: $BUILD_LOG)"
wait "$BUILD_PID"
BUILD_RC=$?
cat "$WORK/build-ext.log" >> "$BUILD_LOG"
SO=$(ls "$WORK"/ext/fastpeft/_C*.so 2>/dev/null | head -1)
if [ $BUILD_RC -eq 0 ] && [ -n "$SO" ] && [ -n "$PKG_DIR" ]; then
    cp "$SO" "$PKG_DIR/.$(basename "$SO").tmp" && mv -f "$PKG_DIR/.$(basename "$SO").tmp" "$PKG_DIR/$(basename "$SO")"
    BUILD_STATUS="OK in $(elapsed)s"
else
    BUILD_STATUS="FAILED (rc $BUILD_RC$([ $BUILD_RC -eq 124 ] && echo ', timed out'))"
    echo "!!!! CUDA BUILD $BUILD_STATUS; last lines of $BUILD_LOG:"
    grep -iE "error|fatal" "$WORK/build-ext.log" | tail -15
    tail -5 "$WORK/build-ext.log"
    echo "!!!! continuing without fastpeft._C: the cuda backend is NOT tested or measured"
fi
C_STATUS=$($PY -P -c "import fastpeft._C; print('fastpeft._C imports')" 2>&1 | tail -1)
case "$C_STATUS" in
    "fastpeft._C imports") ;;
    *) echo "!!!! fastpeft._C does not import ($C_STATUS): the cuda backend is NOT measured"
       BUILD_STATUS="$BUILD_STATUS; fastpeft._C NOT importable" ;;
esac
echo "build: $BUILD_STATUS; $C_STATUS"
echo "# result: $BUILD_STATUS; $C_STATUS; fastpeft from $PKG_DIR" >> "$BUILD_LOG"

T1B=$(clamp $(( STAGE1_S - $(elapsed) )) 30 90)
banner "stage 1b: CUDA C++, one test per family x dtype, 4 shards (timeout ${T1B}s)"
stage1 cuda "$T1B" 4
S1B_RC=$?
$PY - "$STAGE1_RAW" "$STAGE1_MD" "$STAMP" "$(elapsed)" "$S1A_RC" "$S1B_RC" "$BUILD_STATUS; $C_STATUS" <<'EOF'
import collections, sys
raw, md, stamp, secs, rca, rcb, build = sys.argv[1:]
rows = [line.rstrip("\n").split("\t") for line in open(raw) if line.strip()]
cell = collections.defaultdict(list)
for family, dtype, backend, outcome, dur, node, compiled, hits in rows:
    what = "pass" if outcome == "passed" else outcome.upper() + " " + node.split("::")[-1]
    cell[(family, backend), dtype].append(f"{what} {float(dur):.1f}s ({compiled}+{hits})")
keys = list(dict.fromkeys(k for k, _ in cell))
timeout = lambda rc: " (TIMED OUT: the missing cells did not run)" if rc in ("124", "137") else ""
out = [f"# Stage 1: one correctness test per kernel family, dtype and backend ({stamp})", "",
       f"Done {secs} s after the start. Triton shards rc {rca}{timeout(rca)}; CUDA C++ shards rc {rcb}{timeout(rcb)}.",
       f"fastpeft._C: {build}.", "",
       "Each cell: outcome, the test's time, (Triton kernels compiled + found in triton's cache, carried AOT pack included).",
       "", "| family | backend | bf16 | fp16 | fp32 | any |", "|---|---|---|---|---|---|"]
out += [f"| {f} | {b} | " + " | ".join("; ".join(cell.get(((f, b), d), ["-"])) for d in ("bf16", "fp16", "fp32", "any")) + " |"
        for f, b in keys]
failed = [r for r in rows if r[3] not in ("passed", "skipped")]
out += ["", f"{len(rows)} tests: {sum(r[3] == 'passed' for r in rows)} passed, {len(failed)} failed, "
        f"{sum(r[3] == 'skipped' for r in rows)} skipped; Triton kernels: {sum(int(r[6]) for r in rows)} compiled, "
        f"{sum(int(r[7]) for r in rows)} from the cache."] + [f"- FAILED {r[5]}" for r in failed]
open(md, "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
for f in "$WORK"/stage1-*.log; do echo "# ---- $f"; grep -E "^(FAILED|ERROR)|Error|passed|failed" "$f" | tail -20; done >> "$STAGE1_MD"
copy_out

# ---- 2. stage 2: the whole suite (and the benchmark's compiles beside it) ----------------
# tests/_aot.py --warm compiles the benchmark's launches (autotune configs included) into
# triton's cache in a few processes while the shards run (-P: the repo root must not shadow
# packages such as Hugging Face's `kernels` with our kernels/ folder)
T_TEST=$(clamp $(( $(left) - BENCH_RESERVE )) 60 240)
NSHARD=${TEST_SHARDS:-8}
banner "stage 2: FASTPEFT_AUTOTUNE=0 pytest in $NSHARD shards (timeout ${T_TEST}s; log: $TEST_LOG), tests/_aot.py --warm beside it"
( AOT_JOBS=${AOT_JOBS:-6} timeout -k 5 "$T_TEST" nice $PY -P tests/_aot.py --warm > "$WORK/warm.log" 2>&1 ) &
WARM_PID=$!
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
wait "$WARM_PID"
{ echo "# ---- tests/_aot.py --warm (beside the shards)"; tail -8 "$WORK/warm.log"; } >> "$TEST_LOG"
grep -E "^(FAILED|ERROR) " "$TEST_LOG" | head -30
echo "tests: rc $TEST_RC: ${TEST_LINE:-no summary line (see $TEST_LOG)}"
copy_out

# ---- 3. stage 3: benchmarks --------------------------------------------------------------
T_BENCH=$(clamp $(( $(left) - 10 )) 60 300)
BUDGET=$(( T_BENCH - 40 ))   # no new shape after this; leaves time to finish one and write
banner "stage 3: benchmarks/run.py --budget ${BUDGET} (timeout ${T_BENCH}s; FASTPEFT_AUTOTUNE=${BENCH_AUTOTUNE:-1})"
FASTPEFT_AUTOTUNE=${BENCH_AUTOTUNE:-1} timeout -k 10 "$T_BENCH" \
    $PY benchmarks/run.py --stamp "$STAMP" --out-dir "$RES" --budget "$BUDGET" 2>&1 | tee "$BENCH_LOG" \
    | grep --line-buffered -vE "^(op |---|lora_linear )"
BENCH_RC=${PIPESTATUS[0]}
copy_out

# ---- summary -----------------------------------------------------------------------------
banner "summary (total $(elapsed)s)"
echo "build:  $BUILD_STATUS; $C_STATUS"
echo "stage 1: $(tail -n +1 "$STAGE1_MD" | grep -E "^[0-9]+ tests:" | head -1) ($STAGE1_MD)"
echo "bench:  rc $BENCH_RC$( { [ "$BENCH_RC" = 124 ] || [ "$BENCH_RC" = 137 ]; } && echo ' (TIMED OUT)')$([ "$BENCH_RC" = 2 ] && echo ' (interrupted: partial)'); files:"
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
