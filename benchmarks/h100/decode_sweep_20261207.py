"""Paged decode tile configs x split counts at four of bench_kernels.py's decode shapes (GQA 32/8, D128, bf16, pages
of 16 and 64), beside cuDNN SDPA on a contiguous cache, every time a CUDA-graph replay (bench_common.bench_graph_ms).
Run from the repository root on a GPU (H100, 2026-12-07: decode_sweep_20261207.log beside it):
    python3 benchmarks/h100/decode_sweep_20261207.py"""
import itertools
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from bench_common import copy_bandwidth  # noqa: E402
from hf_flash.kernels import clear_compiled, decode  # noqa: E402

SHAPES = [(32, 4096), (1, 65536), (8, 16384), (64, 8192)]
CONFIGS = [(32, 4, 3), (32, 4, 4), (64, 4, 3), (32, 8, 3), (64, 8, 3), (16, 4, 4)]
SPLITS = (1, 2, 3, 4, 8, 16, 32, 64)
dev = torch.device("cuda")
key = (128, False, torch.cuda.get_device_capability(dev)[0])
print(torch.cuda.get_device_name(dev), "copy", f"{copy_bandwidth(dev, 1 << 30):.2f}", "TB/s; shipped", decode.CONFIGS[key])
shipped = decode.CONFIGS[key]
for batch, seqlen in SHAPES:
    nbytes = td.kv_bytes(batch, seqlen)
    q = torch.randn(batch, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, 8, seqlen, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = nbytes / (td.bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)) * 1e-3) / 1e12
    del q, k, v
    for page in (16, 64):
        case = td.make_case(batch, seqlen, page)
        res = {}
        for cfg in CONFIGS:
            try:
                row = td.use_config(key, cfg, case)
            except Exception as e:  # noqa: BLE001
                print("skip", cfg, type(e).__name__)
                continue
            planned = td.planned_splits(batch, seqlen, dev)
            for s in sorted(set(SPLITS) | {planned}):
                if s > max(1, seqlen // 64):
                    continue
                res[cfg, s] = nbytes / (td.bench(td.run_fn(case, s)) * 1e-3) / 1e12
            print(f"  B={batch} L={seqlen} p{page} {row} planned {planned}: "
                  + " ".join(f"{s}:{res[cfg, s]:.2f}" for c, s in res if c == cfg), flush=True)
        decode.CONFIGS[key] = shipped
        clear_compiled(decode._decode_kernel)
        sh = td.planned_splits(batch, seqlen, dev)
        top = sorted(res, key=res.get, reverse=True)[:4]
        print(f"B={batch} L={seqlen} p{page}: cuDNN {cudnn:.2f}; shipped {shipped} x{sh} {res.get((shipped[:3], sh), float('nan')):.2f} "
              f"({res.get((shipped[:3], sh), float('nan')) / cudnn:.3f}); best "
              + "  ".join(f"{c}x{s} {res[c, s]:.2f} ({res[c, s] / cudnn:.3f})" for c, s in top), flush=True)
        del case
        torch.cuda.empty_cache()
