#!/usr/bin/env bash
# One batched run on a lent CUDA machine: install hf_flash (offline, into /tmp/site), run the test suite on the GPU,
# then the given steps. Logs go to $OUT (or ./device_out). Steps: tests, memcheck, perplexity, tune, tune-prefill,
# bench, generate.
#   bash scripts/device_check.sh tests memcheck perplexity bench
# TESTS picks the test files of the tests step (default: all of tests/); BENCH_ARGS and GENERATE_ARGS add options to
# the bench and generate steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# --upgrade: without it pip --target keeps what an earlier step or call on the same (warm) machine installed there.
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
[ -d .whl ] && python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl >>"$out/install.log" 2>&1
# What runs must be this tree: every source file of the package, byte for byte, in the install.
python3 - <<'PY' || exit 1
import pathlib, sys
folders = {"hf_flash": "hf_flash", "kernels": "hf_flash/kernels", "patches": "hf_flash/patches"}
stale = [f"{dst}/{f.name}" for src, dst in folders.items() for f in pathlib.Path(src).glob("*.py")
         if not (pathlib.Path("/tmp/site", dst, f.name).is_file()
                 and pathlib.Path("/tmp/site", dst, f.name).read_bytes() == f.read_bytes())]
if stale:
    sys.exit(f"/tmp/site does not hold this tree's {', '.join(stale)}: not running stale code")
PY
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
gguf=/root/keep/SmolLM2-135M-Instruct.Q4_1.gguf
# The suite is mostly Triton and inductor compiles (CPU-bound): spread it over TEST_WORKERS processes sharing the GPU
# where pytest-xdist is installed (no test takes the whole GPU: the out-of-memory faults are injected).
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-6}")
summary=()
for step in "$@"; do
  start=$(date +%s)
  case $step in
    # One line per test in the log, and SIGABRT after TESTS_TIMEOUT s (pytest's faulthandler then prints every
    # thread's stack): a run on 2026-12-02 printed all 538 tests and then hung before its summary.
    tests) (cd /tmp && timeout -s ABRT "${TESTS_TIMEOUT:-540}" python3 -m pytest -v -p no:cacheprovider "${workers[@]}" \
             --rootdir "$OLDPWD" $(printf "$OLDPWD/%s " ${TESTS:-tests}) -k "not slow" 2>&1) >"$out/tests.log"
           rc=$?; grep -E "FAILED|ERROR|Fatal Python|Thread 0x|^  File" "$out/tests.log" | head -60
           tail -3 "$out/tests.log"; (exit $rc) ;;
    # Every kernel launch of the guard tests and the paged op tests under compute-sanitizer (it refuses the GPU on
    # some machines: the log says so, and the guard tests of the tests step still check the pools' bounds).
    memcheck) (cd /tmp && compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
                --rootdir "$OLDPWD" "$OLDPWD/tests/test_bounds.py" "$OLDPWD/tests/test_ops.py" \
                -k "bounds or paged or kvcache or write or invalid" 2>&1) | tee "$out/memcheck.log" | tail -25 ;;
    perplexity) python3 scripts/perplexity.py --model "$(dirname $gguf)" --gguf-file "$(basename $gguf)" \
                  --dtypes fp32,bf16 --max-windows 16 --window 2048 2>&1 | tee "$out/perplexity.log" | tail -12 ;;
    tune) { python3 scripts/tune_prefill.py; python3 scripts/tune_decode.py; } 2>&1 | tee "$out/tune.log" | tail -60 ;;
    tune-prefill) python3 scripts/tune_prefill.py --gqa ${GQA:-1} 2>&1 | tee "$out/tune_prefill.log" | tail -60 ;;
    # BENCH_ARGS / GENERATE_ARGS pass options through (--section, --backends; --models, --rows, --skip, ...): a
    # whole default run of either may not fit one device call.
    bench) python3 scripts/bench_kernels.py ${BENCH_ARGS:-} --out "$out/bench_kernels.json" 2>&1 \
             | tee "$out/bench_kernels.log" ;;
    generate) python3 scripts/bench_generate.py ${GENERATE_ARGS:-} --out "$out/bench_generate.json" 2>&1 \
                | tee "$out/bench_generate.log" ;;
    *) echo "unknown step $step"; continue ;;
  esac
  rc=$?  # with pipefail: the step's own exit status
  summary+=("$step: exit $rc in $(( $(date +%s) - start )) s")
done
printf '%s\n' "${summary[@]}"
