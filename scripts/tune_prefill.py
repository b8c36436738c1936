"""Time the Triton prefill kernel's candidate tile configs against SDPA (flash, and cuDNN where available) on a CUDA
GPU; prints TFLOP/s per shape and the best config per shape, then the CONFIGS rows to paste into
kernels/prefill.py. About 2 minutes on an H100.

    python scripts/tune_prefill.py [--dims 64 128] [--seqlens 1024 4096 16384] [--heads 16]
"""
import argparse
import functools
import importlib

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.runtime.errors import OutOfResources

prefill_module = importlib.import_module("hf_flash.kernels.prefill")

TOKENS = 16384  # batch * seqlen, constant across shapes
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; pre-filtered for register spills on sm90 / sm80.
CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")  # ms


def tflops(batch, heads, seqlen, head_dim, causal, ms):
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)  # QK^T and PV, 2 flop/MAC
    return flops / ms * 1e-9


def run_prefill(q, k, v, out, lse, causal, block_table=None, k_len=None):
    batch, seqlen = q.shape[:2]
    zeros = torch.zeros(batch, dtype=torch.int32, device=q.device)
    q_len = torch.full_like(zeros, seqlen)
    k_len = q_len if k_len is None else k_len
    return lambda: prefill_module.prefill(
        q, k, v, out, lse, zeros, q_len, zeros, k_len, seqlen, softmax_scale=q.shape[-1] ** -0.5, causal=causal,
        window_left=-1, window_right=-1, softcap=0.0, block_table=block_table)


def sdpa(q, k, v, causal, backend):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def fn():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return fn


def paged_copy(k, v, page_size):
    """k/v [B, S, H, D] scattered over shuffled pages -> (k_pool, v_pool, block_table)."""
    batch, seqlen, heads, head_dim = k.shape
    per_seq = seqlen // page_size
    order = torch.randperm(batch * per_seq, device=k.device)
    table = order.view(batch, per_seq).to(torch.int32)
    k_pool = torch.empty(batch * per_seq, page_size, heads, head_dim, dtype=k.dtype, device=k.device)
    v_pool = torch.empty_like(k_pool)
    k_pool[order] = k.reshape(batch * per_seq, page_size, heads, head_dim)
    v_pool[order] = v.reshape(batch * per_seq, page_size, heads, head_dim)
    return k_pool, v_pool, table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    major = torch.cuda.get_device_capability(dev)[0]
    print(f"{torch.cuda.get_device_name(dev)}  torch {torch.__version__}  triton {triton.__version__}")
    dtype, heads = torch.bfloat16, args.heads
    best = {}
    for head_dim in args.dims:
        key = (max(64, triton.next_power_of_2(head_dim)), False, major)
        default = prefill_module.CONFIGS.get(key)
        for causal in (False, True):
            for seqlen in args.seqlens:
                batch = max(1, TOKENS // seqlen)
                q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype) for _ in range(3))
                out = torch.empty_like(q)
                lse = torch.empty(batch, heads, seqlen, device=dev, dtype=torch.float32)
                rate = functools.partial(tflops, batch, heads, seqlen, head_dim, causal)
                ref = sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION)()
                line = [f"D={head_dim:3d} {'causal' if causal else 'full  '} S={seqlen:5d} B={batch:2d}"]
                line.append(f"sdpa-flash {rate(bench(sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION))):6.1f}")
                try:
                    line.append(f"cudnn {rate(bench(sdpa(q, k, v, causal, SDPBackend.CUDNN_ATTENTION))):6.1f}")
                except RuntimeError:
                    line.append("cudnn    n/a")
                results = []
                for cfg in CANDIDATES[key[0]]:
                    prefill_module.CONFIGS[key] = cfg
                    fn = run_prefill(q, k, v, out, lse, causal)
                    try:
                        fn()
                    except (OutOfResources, RuntimeError) as exc:  # too much shared memory for this GPU: skip the config
                        print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    err = (out.float() - ref.transpose(1, 2).float()).abs().max().item()
                    if err > 3e-2:
                        print(f"  {cfg}: WRONG, max abs diff {err:.3g} vs SDPA")
                        continue
                    results.append((rate(bench(fn)), cfg))
                prefill_module.CONFIGS[key] = default
                print("  ".join(line + [f"{cfg}:{r:6.1f}" for r, cfg in results]), flush=True)
                if results:
                    top = max(results)
                    print(f"    best {top[1]} {top[0]:.1f} TFLOP/s", flush=True)
                    for r, cfg in results:
                        best.setdefault((head_dim, causal), {}).setdefault(cfg, []).append(r)
        # Paged K/V at S=4k, causal, with the default config: the cost of gathering through the block table.
        seqlen = 4096 if 4096 in args.seqlens else args.seqlens[0]
        batch = max(1, TOKENS // seqlen)
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype) for _ in range(3))
        out, lse = torch.empty_like(q), torch.empty(batch, heads, seqlen, device=dev, dtype=torch.float32)
        dense = tflops(batch, heads, seqlen, head_dim, True, bench(run_prefill(q, k, v, out, lse, True)))
        line = [f"D={head_dim:3d} causal S={seqlen} paged, config {default}: dense {dense:6.1f}"]
        k_len = torch.full((batch,), seqlen, dtype=torch.int32, device=dev)
        for page_size in (16, 64, 256):
            k_pool, v_pool, table = paged_copy(k, v, page_size)
            fn = run_prefill(q, k_pool, v_pool, out, lse, True, block_table=table, k_len=k_len)
            line.append(f"page {page_size}: {tflops(batch, heads, seqlen, head_dim, True, bench(fn)):6.1f}")
        print("  ".join(line), flush=True)
    print("\nmean TFLOP/s over sequence lengths per config (pick per head dim; causal matters most):")
    for (head_dim, causal), per_cfg in best.items():
        ranked = sorted(((sum(r) / len(r), cfg) for cfg, r in per_cfg.items()), reverse=True)
        print(f"  D={head_dim} {'causal' if causal else 'full'}: " + "  ".join(f"{c}:{r:.1f}" for r, c in ranked))
    print("\nsuggested rows (best mean over causal and full):")
    for head_dim in args.dims:
        merged = {}
        for causal in (False, True):
            for cfg, r in best.get((head_dim, causal), {}).items():
                merged.setdefault(cfg, []).extend(r)
        if merged:
            cfg = max(merged, key=lambda c: sum(merged[c]) / len(merged[c]))
            print(f"    ({max(64, triton.next_power_of_2(head_dim))}, False, {major}): {cfg},")


if __name__ == "__main__":
    main()
