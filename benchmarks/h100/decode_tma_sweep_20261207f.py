"""Needs the TMA decode patch applied (git show cc5ba95:benchmarks/pending/decode_tma_20261207.patch | git am).
Paged decode with TMA boxes against its pointer loads and cuDNN SDPA (contiguous cache), one process, every time a
CUDA-graph replay (bench_common.bench_graph_ms): bench_kernels.py's seven decode shapes (GQA 32/8, D128, bf16), pages
of 16 and 64; the pointer kernel with its shipped config and planned splits, the TMA kernel over (BLOCK_N, warps,
stages) candidates x split counts around the planned one. Run from the repository root on an sm90 GPU:
    python3 benchmarks/pending/decode_tma_sweep.py"""
import itertools
import sys

import torch

sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from hf_flash.kernels import clear_compiled, decode  # noqa: E402

SHAPES = [(1, 4096), (1, 65536), (8, 16384), (32, 4096), (64, 8192), (128, 2048), (256, 1024)]
CANDIDATES = list(itertools.product((16, 32, 64), (4,), (3, 4, 6)))  # (BLOCK_N, warps, stages); BLOCK_N <= page
tma_block_n = decode.tma_block_n


def rate(batch, seqlen, fn):
    return td.kv_bytes(batch, seqlen) / (td.bench(fn) * 1e-3) / 1e12


def main():
    dev = torch.device("cuda")
    shipped_tma = decode.TMA_CONFIGS[128]
    print(torch.cuda.get_device_name(dev), "shipped pointer", decode.CONFIGS[(128, False, 9)], "TMA", shipped_tma)
    for batch, seqlen in SHAPES:
        cudnn = td.cudnn_tbps(batch, seqlen)
        planned = td.planned_splits(batch, seqlen, dev)
        splits = sorted({1, max(1, planned // 2), planned, min(64, 2 * planned)})
        for page in (16, 64):
            case = td.make_case(batch, seqlen, page)
            decode.tma_block_n = lambda *args: 0
            pointer = rate(batch, seqlen, td.run_fn(case, planned))
            decode.tma_block_n = tma_block_n
            assert tma_block_n(case[0], case[1], case[2], -1), "this call does not take the TMA path"
            res = {}
            for cfg in CANDIDATES:
                if cfg[0] > page:
                    continue
                decode.TMA_CONFIGS[128] = cfg
                clear_compiled(decode._decode_kernel)
                for s in splits:
                    try:
                        res[cfg, s] = rate(batch, seqlen, td.run_fn(case, s))
                    except Exception as error:  # noqa: BLE001  (out of shared memory)
                        print("  skip", cfg, s, type(error).__name__)
                        break
            decode.TMA_CONFIGS[128] = shipped_tma
            clear_compiled(decode._decode_kernel)
            top = sorted(res, key=res.get, reverse=True)[:4]
            shipped = res.get(((min(shipped_tma[0], page), *shipped_tma[1:]), planned))
            print(f"B={batch} L={seqlen} p{page} x{planned}: cuDNN {cudnn:.2f}; pointer {pointer:.2f} "
                  f"({pointer / cudnn:.3f}); TMA shipped {shipped or float('nan'):.2f} "
                  f"({(shipped or float('nan')) / cudnn:.3f}); best " +
                  "  ".join(f"{c}x{s} {res[c, s]:.2f} ({res[c, s] / cudnn:.3f})" for c, s in top), flush=True)
            del case
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
