#!/usr/bin/env bash
# The two pending decode measurements in one device call (about four minutes), each under its own time limit, logs in
# $OUT (or ./device_out): the page order (decode_page_order.py) and the L2 hint (decode_load_hints.sh). Run from the
# repository root on a GPU:
#     OUT=$OUT bash benchmarks/pending/decode_probes.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-device_out}
mkdir -p "$out"
bash scripts/device_check.sh || exit 1  # installs this tree into /tmp/site and checks it
export PYTHONPATH=/tmp/site
timeout 150 python3 benchmarks/pending/decode_page_order.py 2>&1 | tee "$out/decode_page_order.log"
timeout 240 bash benchmarks/pending/decode_load_hints.sh 2>&1 | tee "$out/decode_load_hints.log"
