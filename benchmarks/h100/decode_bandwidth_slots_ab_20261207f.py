"""Needs the change of commit 2a8c496 (git show 2a8c496 -- kernels/decode.py | git apply).
Splits planned with every SM (before) and with the SMs the memory feeds (after), same process, graph replays."""
import sys
import torch
sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from hf_flash.kernels import decode  # noqa: E402
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
per_sm = decode._tile(128, torch.bfloat16, dev)[-1]
after_slots = decode.program_slots(128, torch.bfloat16, dev)
print(props.name, "bandwidth", decode.memory_bandwidth(dev), "slots before", props.multi_processor_count * per_sm,
      "after", after_slots, "d64 after", decode.program_slots(64, torch.bfloat16, dev), flush=True)
for batch, seqlen in [(1, 4096), (1, 65536), (8, 16384), (32, 4096), (64, 8192), (128, 2048), (256, 1024)]:
    before = decode.choose_num_splits(batch, 8, seqlen, props.multi_processor_count * per_sm, 128)
    after = decode.choose_num_splits(batch, 8, seqlen, after_slots, 128)
    if before == after:
        print(f"B={batch} L={seqlen}: {before} splits either way", flush=True)
        continue
    cudnn = td.cudnn_tbps(batch, seqlen)
    row = []
    for page in (16, 64):
        case = td.make_case(batch, seqlen, page)
        for _ in range(2):  # twice, alternating
            for s in (before, after):
                row.append(f"p{page} x{s} {td.kv_bytes(batch, seqlen) / (td.bench(td.run_fn(case, s)) * 1e-3) / 1e12 / cudnn:.3f}")
        del case
    print(f"B={batch} L={seqlen} cuDNN {cudnn:.2f}: " + "  ".join(row), flush=True)
