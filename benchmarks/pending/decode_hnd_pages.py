"""Does the pool's layout hold back paged decode? The shipped pointer kernel, unchanged, over pools laid out as
flash-attn's ``[num_pages, page_size, H_kv, D]`` (NHD: a head's rows of a page 2 KiB apart at GQA 32/8, D128, bf16)
and over pools allocated ``[num_pages, H_kv, page_size, D]`` (HND, FlashInfer's other layout: a head's page one
contiguous run) and passed as the transposed view (the kernel takes any strides; the interpreter gives the same bits
for both, 2026-12-07). bench_kernels.py's seven decode shapes, pages of 16 and 64, planned splits and one split,
over cuDNN on a contiguous cache; CUDA-graph replays. Run from the repository root on a GPU:
    python3 benchmarks/pending/decode_hnd_pages.py"""
import sys

import torch

sys.path.insert(0, "scripts")
import tune_decode as td  # noqa: E402
from bench_kernels import DECODE  # noqa: E402


def hnd_case(batch, seqlen, page_size):
    """``td.make_case`` with each pool stored head-major and handed over as the NHD view of it."""
    q, k_pool, v_pool, *rest = td.make_case(batch, seqlen, page_size)
    return (q, *(p.transpose(1, 2).contiguous().transpose(1, 2) for p in (k_pool, v_pool)), *rest)


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), flush=True)
    for batch, seqlen in DECODE["full"][3]:
        cudnn = td.cudnn_tbps(batch, seqlen)
        planned = td.planned_splits(batch, seqlen, dev)
        cells = []
        for page in (16, 64):
            for name, make in (("NHD", td.make_case), ("HND", hnd_case)):
                case = make(batch, seqlen, page)
                for splits in sorted({1, planned}):
                    tbps = td.tbps(batch, seqlen, td.bench(td.run_fn(case, splits)))
                    cells.append(f"p{page} {name} x{splits} {tbps / cudnn:.3f}")
                del case
        print(f"B={batch} L={seqlen} cuDNN {cudnn:.2f} TB/s: " + "  ".join(cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
