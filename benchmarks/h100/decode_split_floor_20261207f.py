"""Split floors on this GPU: pointer kernel, bf16, GQA 32/8, pages of 16, split counts around the planned one."""
import sys

import torch

sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from hf_flash.kernels import decode  # noqa: E402

decode.tma_block_n = lambda *args: 0  # the pointer kernel where the TMA patch is applied (a no-op on main)
dev = torch.device("cuda")
p = torch.cuda.get_device_properties(dev)
print(p.name, p.multi_processor_count, "SMs; memory_clock_rate", getattr(p, "memory_clock_rate", None),
      "bus", getattr(p, "memory_bus_width", None), "L2", getattr(p, "L2_cache_size", None))
for head_dim, shapes in ((128, [(1, 2048), (1, 4096), (1, 8192), (2, 4096)]), (64, [(1, 576), (1, 2112), (1, 8256)])):
    td.HEAD_DIM = head_dim
    for batch, seqlen in shapes:
        case = td.make_case(batch, seqlen, 16)
        planned = td.planned_splits(batch, seqlen, dev)
        res = {}
        for s in (4, 8, 12, 16, 24, 32, 48, 64):
            if s <= seqlen // 16:
                res[s] = td.bench(td.run_fn(case, s)) * 1e3
        best = min(res, key=res.get)
        print(f"D{head_dim} {batch}x{seqlen} planned {planned}: " +
              " ".join(f"{s}:{us:.1f}us" for s, us in res.items()) + f"  best {best}", flush=True)
