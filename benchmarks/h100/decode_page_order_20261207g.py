"""Does scattering the pages cost paged decode its last few percent? The shipped kernel, unchanged, over the same pools
read through a shuffled block table (``td.make_case``: what bench_kernels.py and the issue measure) and through the
ordered one (sequence b's page i is page b * pages_per_sequence + i: each sequence's keys one contiguous run per
head, as cuDNN's contiguous cache lays them out but for the page's interleaved heads). bench_kernels.py's seven decode
shapes, pages of 16 and 64, planned splits, over cuDNN on a contiguous cache; CUDA-graph replays, the two orders
alternated twice. If the ordered table reads faster, what is left is the scatter (TLB reach, DRAM locality), not the
tile loop. Run from the repository root on a GPU, after scripts/device_check.sh:
    PYTHONPATH=/tmp/site python3 benchmarks/h100/decode_page_order_20261207g.py"""
import sys

import torch

sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from bench_kernels import DECODE  # noqa: E402


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), "| ratio to cuDNN: shuffled / ordered block table, twice", flush=True)
    for batch, seqlen in DECODE["full"][3]:
        cudnn = td.cudnn_tbps(batch, seqlen)
        splits = td.planned_splits(batch, seqlen, dev)
        cells = []
        for page in (16, 64):
            q, k_pool, v_pool, shuffled, *rest = td.make_case(batch, seqlen, page)
            ordered = torch.arange(shuffled.numel(), device=shuffled.device, dtype=shuffled.dtype).view_as(shuffled)
            ratios = []
            for _ in range(2):
                for table in (shuffled, ordered):
                    ms = td.bench(td.run_fn((q, k_pool, v_pool, table, *rest), splits))
                    ratios.append(f"{td.tbps(batch, seqlen, ms) / cudnn:.3f}")
            cells.append(f"p{page} " + " / ".join(ratios))
            del q, k_pool, v_pool, shuffled, ordered, rest
        print(f"B={batch} L={seqlen} x{splits} cuDNN {cudnn:.2f} TB/s: " + "   ".join(cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
