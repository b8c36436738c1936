"""Needs the TMA decode patch applied (git show cc5ba95:benchmarks/pending/decode_tma_20261207.patch | git am).
Pages of 64: pointer vs TMA at the same (BLOCK_N, warps, stages) and split counts, one process, graph replays."""
import sys
import torch
sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from hf_flash.kernels import clear_compiled, decode  # noqa: E402
tma = decode.tma_block_n
dev = torch.device("cuda")
for batch, seqlen in [(1, 4096), (1, 65536), (8, 16384), (32, 4096), (64, 8192), (128, 2048), (256, 1024)]:
    cudnn = td.cudnn_tbps(batch, seqlen)
    planned = td.planned_splits(batch, seqlen, dev)
    splits = sorted({max(1, planned // 2), planned})
    case = td.make_case(batch, seqlen, 64)
    row = []
    for cfg in ((32, 4, 3), (64, 4, 3)):
        for name, sel in (("ptr", lambda *a: 0), ("tma", tma)):
            decode.tma_block_n = sel
            decode.CONFIGS[(128, False, 9)] = (*cfg, 4)
            decode.TMA_CONFIGS[128] = cfg
            clear_compiled(decode._decode_kernel)
            for s in splits:
                r = td.kv_bytes(batch, seqlen) / (td.bench(td.run_fn(case, s)) * 1e-3) / 1e12
                row.append(f"{name}{cfg[0]}x{s} {r / cudnn:.3f}")
    print(f"B={batch} L={seqlen} p64 cuDNN {cudnn:.2f}: " + "  ".join(row), flush=True)
    del case
    torch.cuda.empty_cache()
