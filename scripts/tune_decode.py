"""Times hf_flash's paged decode kernel over its candidate tile configs on the GPU (bf16, GQA 32/8, head dim 128, or
64 with ``--head-dim 64``: Llama-3.2-1B's).

For each (batch, context length) and page size (16, 64) every candidate (BLOCK_N, num_warps, num_stages) runs with
the split count that ``choose_num_splits`` plans for it (the program slots depend on the config); the rate is the
K+V bytes the sequence lengths cover (what must be read) over the median time (triton.testing.do_bench), beside the
device's copy bandwidth (read + write of 1 GiB, ``bench_common.copy_bandwidth``).
Then split counts are swept with the best config (and with every config where the batch leaves SMs idle), and at
(1, 4k) torch SDPA's default backend on a contiguous cache is timed beside the kernel. Every time is a CUDA-graph
replay (``bench_common.bench_graph_ms``), as in ``bench_kernels.py``: microsecond kernels, not launch overhead.
Prints the best config to put into ``hf_flash/kernels/decode.py``'s CONFIGS. About 3 minutes on an H100.
    python scripts/tune_decode.py
    python scripts/tune_decode.py --shapes 1x4096,1x65536
    python scripts/tune_decode.py --head-dim 64 --shapes 1x576,8x8256,64x1088,128x576
"""
import argparse
import itertools
import math

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from bench_common import bench_graph_ms, copy_bandwidth
from hf_flash import kernels
from hf_flash.kernels import decode

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
SHAPES = [(1, 4096), (1, 65536), (8, 16384), (32, 4096), (64, 8192), (128, 2048)]  # (batch, context length)
PAGE_SIZES = (16, 64)
CANDIDATES = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))  # (BLOCK_N, num_warps, num_stages)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def bench(fn):
    """Median milliseconds of a CUDA-graph replay of ``fn``."""
    return bench_graph_ms(fn, torch.device("cuda"))


def make_case(batch, seqlen, page_size):
    """Pools holding exactly the batch's pages in shuffled order, a full block table, a query per sequence."""
    pages_per_seq = math.ceil(seqlen / page_size)
    num_pages = batch * pages_per_seq
    k_pool = torch.randn(num_pages, page_size, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_pool = torch.randn_like(k_pool)
    table = torch.randperm(num_pages, device="cuda").to(torch.int32).view(batch, pages_per_seq)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    lse = torch.empty(batch, HEADS, device="cuda")
    return q, k_pool, v_pool, table, seqlens, out, lse


def run_fn(case, num_splits):
    q, k_pool, v_pool, table, seqlens, out, lse = case
    return lambda: decode.paged_decode(q, k_pool, v_pool, table, seqlens, out, lse,
                                       softmax_scale=HEAD_DIM ** -0.5, window_left=-1, softcap=0.0,
                                       num_splits=num_splits)


def use_config(key, cfg, case):
    """Puts ``cfg`` (BLOCK_N, num_warps, num_stages) into CONFIGS with the programs per SM that its compiled kernels
    (unsplit and split) allow, measured by ``decode.resident_programs``."""
    decode.CONFIGS[key] = (*cfg, 1)
    kernels.clear_compiled(decode._decode_kernel)
    for splits in (1, 2):
        run_fn(case, splits)()
    decode.CONFIGS[key] = (*cfg, decode.resident_programs(torch.device("cuda")))
    return decode.CONFIGS[key]


def planned_splits(batch, seqlen, device):
    """What ``num_splits=0`` picks with the config now in CONFIGS (its program slots depend on it)."""
    slots = decode.program_slots(HEAD_DIM, DTYPE, device)
    return decode.choose_num_splits(batch, KV_HEADS, seqlen, slots, HEAD_DIM)


def kv_bytes(batch, seqlen):
    return 2 * batch * seqlen * KV_HEADS * HEAD_DIM * torch.finfo(DTYPE).bits // 8


def tbps(batch, seqlen, ms):
    """TB/s of the K+V of ``batch`` sequences of ``seqlen`` keys read in ``ms`` milliseconds."""
    return kv_bytes(batch, seqlen) / (ms * 1e-3) / 1e12


def cudnn_tbps(batch, seqlen):
    """TB/s of K+V that SDPA's cuDNN backend reads for one query per sequence over a contiguous cache (the anchor)."""
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, seqlen, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return tbps(batch, seqlen, ms)


def main():
    global HEAD_DIM  # the head dim of every case of this run
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help="comma-separated BATCHxLENGTH (default: the benchmark's six)")
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    args = parser.parse_args()
    HEAD_DIM = args.head_dim
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    device = torch.device("cuda")
    major = torch.cuda.get_device_capability(device)[0]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    key = (HEAD_DIM, False, major)
    original = dict(decode.CONFIGS)
    default = decode.CONFIGS.get(key, decode.CONFIGS[(HEAD_DIM, False, 8)])[:3]  # without the programs per SM
    # As bench_kernels measures it (eager): the same copy replayed from a CUDA graph read 2.76 TB/s on the H200, the
    # eager one 4.25.
    copy_tbps = copy_bandwidth(device, 1 << 30)
    print(f"{torch.cuda.get_device_name(device)}, {sms} SMs; copy bandwidth {copy_tbps:.2f} TB/s; "
          f"default config {default}")

    rates = {}  # (batch, seqlen, page_size) -> {config: TB/s}
    rows = {}  # config -> its CONFIGS row (the config and its programs per SM)
    for batch, seqlen in shapes:
        for page_size in PAGE_SIZES:
            case = make_case(batch, seqlen, page_size)
            row = {}
            for cfg in CANDIDATES:
                try:
                    rows[cfg] = use_config(key, cfg, case)
                    ms = bench(run_fn(case, planned_splits(batch, seqlen, device)))
                except triton.runtime.errors.OutOfResources:
                    continue  # too much shared memory for this GPU
                row[cfg] = tbps(batch, seqlen, ms)
            rates[(batch, seqlen, page_size)] = row
            best = max(row, key=row.get)
            print(f"B={batch:<4} L={seqlen:<6} page={page_size:<3} "
                  f"best {best}: {row[best]:.2f} TB/s ({100 * row[best] / copy_tbps:.0f}% of copy)  "
                  f"default {default}: {row.get(default, float('nan')):.2f} TB/s")
            del case

    # The config with the best geometric mean over all cases (among those that ran everywhere).
    everywhere = [c for c in CANDIDATES if all(c in row for row in rates.values())]
    score = {c: math.exp(sum(math.log(row[c]) for row in rates.values()) / len(rates)) for c in everywhere}
    best = max(score, key=score.get)
    print("\nTB/s per config (columns: B/L/page)")
    cases = list(rates)
    print(f"{'config':<16}" + "".join(f"{f'{b}/{s // 1024}k/{p}':>12}" for b, s, p in cases) + f"{'geomean':>10}")
    for c in everywhere:
        print(f"{c!s:<16}" + "".join(f"{rates[k][c]:>12.2f}" for k in cases) + f"{score[c]:>10.2f}")

    decode.CONFIGS[key] = rows[best]
    print(f"\nsplit sweep with {rows[best]}, page 16 (TB/s; * = choose_num_splits)")
    for batch, seqlen in shapes:
        case = make_case(batch, seqlen, 16)
        planned = planned_splits(batch, seqlen, device)
        cells = []
        for splits in sorted(set(SPLITS) | {planned}):
            rate = tbps(batch, seqlen, bench(run_fn(case, splits)))
            cells.append(f"{splits}{'*' if splits == planned else ''}:{rate:.2f}")
        print(f"B={batch:<4} L={seqlen:<6} " + "  ".join(cells))
        if batch * KV_HEADS < sms:  # SMs left idle without splits: the tile config and the split count go together
            grid = {}
            for cfg, splits in itertools.product(CANDIDATES, SPLITS):
                if cfg not in rows:
                    continue  # out of resources on this GPU
                decode.CONFIGS[key] = rows[cfg]
                try:
                    grid[cfg, splits] = tbps(batch, seqlen, bench(run_fn(case, splits)))
                except triton.runtime.errors.OutOfResources:
                    continue
            decode.CONFIGS[key] = rows[best]
            top = sorted(grid, key=grid.get, reverse=True)[:6]
            print("    best (config, splits): " + "  ".join(f"{c} x{n}: {grid[c, n]:.2f}" for c, n in top))
        del case

    # SDPA's default backend on a contiguous [B, H, L, D] cache, and the kernel on the same cache seen as one page
    # per sequence (what hf_flash.ops does with a contiguous cache) and paged.
    batch, seqlen = 1, 4096
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, seqlen, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    splits = planned_splits(batch, seqlen, device)
    contiguous = (q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), torch.zeros(1, 1, dtype=torch.int32, device="cuda"),
                  torch.full((1,), seqlen, dtype=torch.int32, device="cuda"), torch.empty_like(q[:, :, 0]),
                  torch.empty(batch, HEADS, device="cuda"))
    ours_ms = bench(run_fn(contiguous, splits))
    paged_ms = bench(run_fn(make_case(batch, seqlen, 16), splits))
    print(f"\n(1, 4k) SDPA default: {1e3 * sdpa_ms:.1f} us ({tbps(batch, seqlen, sdpa_ms):.2f} TB/s); "
          f"hf_flash contiguous, {splits} splits: {1e3 * ours_ms:.1f} us ({tbps(batch, seqlen, ours_ms):.2f} TB/s); "
          f"paged 16: {1e3 * paged_ms:.1f} us")
    decode.CONFIGS.clear()
    decode.CONFIGS.update(original)
    print(f"\nbest overall: {best} (geomean {score[best]:.2f} TB/s, {100 * score[best] / copy_tbps:.0f}% of copy); "
          f"put CONFIGS[{key}] = {rows[best]} into hf_flash/kernels/decode.py")


if __name__ == "__main__":
    main()
