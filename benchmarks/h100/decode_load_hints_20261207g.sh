#!/usr/bin/env bash
# Does an L2 eviction hint on the K/V tile loads move paged decode? kv_tile's three loads (kernels/paged_kv.py) as
# shipped and with eviction_policy="evict_first" (each key is read once per step: leave L2 to the block table, q and
# the partials), installed apart in a copy of /tmp/site and run alternately, three times each, on
# bench_kernels.py's seven decode shapes (bf16, GQA 32/8, D128, pages of 16 and 64, planned splits; CUDA-graph
# replays) over cuDNN on a contiguous cache. Run from the repository root on a GPU, after scripts/device_check.sh:
#     bash benchmarks/h100/decode_load_hints_20261207g.sh
# (Compiled offline for sm90 the copies are already cp.async.cg, L1 skipped; the hint adds L2::cache_hint to them.)
set -euo pipefail
rm -rf /tmp/site_evict && cp -r /tmp/site /tmp/site_evict
sed -i 's/return tl.load(ptrs\(.*\))$/return tl.load(ptrs\1, eviction_policy="evict_first")/' \
  /tmp/site_evict/hf_flash/kernels/paged_kv.py
grep -c 'eviction_policy="evict_first"' /tmp/site_evict/hf_flash/kernels/paged_kv.py | grep -qx 3  # all three, or stop
run() {
  # From /tmp: run in the repository root, python3 - would import its hf_flash/ folder, not the installed copy.
  (cd /tmp && PYTHONPATH="/tmp/site$1" python3 - "$2" "$OLDPWD/scripts") <<'PY'
import sys
import torch
sys.path.insert(0, sys.argv[2])
import tune_decode as td
from bench_kernels import DECODE
dev = torch.device("cuda")
cells = []
for batch, seqlen in DECODE["full"][3]:
    cudnn = td.cudnn_tbps(batch, seqlen)
    splits = td.planned_splits(batch, seqlen, dev)
    for page in (16, 64):
        case = td.make_case(batch, seqlen, page)
        cells.append(f"{td.tbps(batch, seqlen, td.bench(td.run_fn(case, splits))) / cudnn:.3f}")
        del case
    torch.cuda.empty_cache()
print(f"{sys.argv[1]:>12}  " + "  ".join(cells), flush=True)
PY
}
echo "ratio to cuDNN, (B, L) x pages 16 / 64: (1,4k) (1,64k) (8,16k) (32,4k) (64,8k) (128,2k) (256,1k)"
for round in 1 2 3; do
  run "" shipped
  run _evict evict_first
done
