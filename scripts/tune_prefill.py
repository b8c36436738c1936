"""Time the Triton prefill kernel's candidate tile configs against SDPA (flash, and cuDNN where available) on a CUDA
GPU; prints TFLOP/s per shape and the best config per shape, then the rows to paste into kernels/prefill.py. On sm90
the head dims of its TMA path are tuned there (TMA_CONFIGS, warp specialization on and off), with the pointer
kernel's current config timed beside them; elsewhere, and for other head dims, the pointer kernel's CONFIGS. With
--gluon (sm90), the Gluon kernel's SM90_CONFIGS (kernels/prefill_sm90.py) instead, the Triton kernel timed beside
them. About 2 minutes on an H100 (more with --gqa).

    python scripts/tune_prefill.py [--dims 64 128] [--seqlens 1024 4096 8192 16384] [--heads 16] [--gqa 4] [--gluon]
"""
import argparse
import contextlib
import functools
import importlib
from unittest import mock

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.runtime.errors import OutOfResources

from hf_flash.kernels import head_dim_bucket

prefill_module = importlib.import_module("hf_flash.kernels.prefill")
prefill_sm90 = prefill_module.prefill_sm90

TOKENS = 16384  # batch * seqlen, constant across shapes
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; pre-filtered for register spills on sm90 / sm80.
CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
}
# The TMA path's (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) per head dim. Compiled for sm90 with
# Triton 3.6 offline: none spills, all fit the 227 KiB of shared memory. Triton 3.6 warp-specializes on sm90 at 4 warps
# only (a producer warp group beside the math ones); at 8 the hint changes nothing, so WS rows use 4.
TMA_CANDIDATES = {
    64: [(128, 128, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 8, 3, False), (64, 64, 4, 3, False),
         (128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 128, 4, 3, True)],
    128: [(128, 128, 8, 2, False), (128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 128, 8, 3, False),
          (128, 64, 4, 2, True), (128, 64, 4, 3, True), (128, 128, 4, 2, True)],
}

# The Gluon kernel's Sm90Configs (BLOCK_M, BLOCK_N, STAGES, num_warps, Q in registers[, warp-specialized]) per head
# dim (--gluon). Compiled for sm90 with Triton 3.6 offline: none spills (BLOCK_N 128 with Q in registers does, at
# D128); the 4-warp ones leave room for two programs per SM (three at D64), the 8-warp ones (two warpgroups sharing the
# K/V tiles) and the warp-specialized ones (two consumer warpgroups and a producer warp) for one.
SM90_CANDIDATES = {
    64: [(64, 64, 4, 4, False), (64, 64, 4, 4, True), (64, 64, 3, 4, True), (64, 128, 3, 4, True),
         (128, 64, 3, 8, True), (128, 128, 2, 8, True), (128, 128, 3, 8, True), (128, 128, 2, 4, False, True),
         (128, 128, 3, 4, False, True)],
    128: [(64, 64, 3, 4, False), (64, 64, 3, 4, True), (64, 64, 2, 4, True), (128, 64, 3, 8, True),
          (128, 64, 2, 8, True), (128, 128, 2, 8, False), (128, 128, 3, 8, False), (128, 128, 2, 4, False, True)],
    256: [(64, 32, 2, 4, False), (64, 64, 2, 4, False), (128, 64, 2, 4, False, True), (128, 32, 3, 4, False, True),
          (128, 32, 4, 4, False, True)],
}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")  # ms


def tflops(batch, heads, seqlen, head_dim, causal, ms):
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)  # QK^T and PV, 2 flop/MAC
    return flops / ms * 1e-9


def triton_kernel():
    """Calls inside go to the Triton kernel as shipped: none is handed to the Gluon kernel (``prefill_sm90``)."""
    return mock.patch.object(prefill_sm90, "sm90_path", lambda *args, **kwargs: False)


def tma_at_every_length():
    """The Triton kernel's candidates at every length: its TMA path's length rule (``TMA_MIN_SEQLEN_Q``) off, and no
    call handed to the Gluon kernel (which has its own table)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(prefill_module, "TMA_MIN_SEQLEN_Q", 1))
    stack.enter_context(triton_kernel())
    return stack


def pointer_path():
    """Calls inside go to the pointer kernel whatever the GPU: no head dim qualifies for the TMA path."""
    return mock.patch.object(prefill_module, "TMA_HEAD_DIMS", ())


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
    gqa = q.shape[2] != k.shape[2]

    def fn():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
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


def tuned_table(head_dim, major, gluon=False, seqlen=0):
    """(the table its calls read, their key in it, the candidates, the label of its rows) for bf16 at ``head_dim`` (and,
    for the Gluon kernel, whose table has a row for long sequences, at ``seqlen``)."""
    if gluon:
        key = (head_dim, seqlen >= prefill_sm90.SM90_LONG_SEQLEN)
        return (prefill_sm90.SM90_CONFIGS, key, [prefill_sm90.Sm90Config(*c) for c in SM90_CANDIDATES[head_dim]],
                "SM90_CONFIGS")
    if major == 9 and head_dim in prefill_module.TMA_HEAD_DIMS:
        return prefill_module.TMA_CONFIGS, head_dim, TMA_CANDIDATES[head_dim], "TMA_CONFIGS"
    bucket = head_dim_bucket(head_dim)
    return prefill_module.CONFIGS, (bucket, False, major), CANDIDATES[bucket], "CONFIGS"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--gqa", type=int, default=1, help="query heads per KV head (default 1: MHA)")
    parser.add_argument("--gluon", action="store_true", help="tune the Gluon kernel's SM90_CONFIGS (sm90 only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    major = torch.cuda.get_device_capability(dev)[0]
    if args.gluon and (major != 9 or not set(args.dims) <= set(SM90_CANDIDATES)):
        parser.error(f"--gluon tunes head dims {sorted(SM90_CANDIDATES)} on an sm90 GPU")
    print(f"{torch.cuda.get_device_name(dev)}  torch {torch.__version__}  triton {triton.__version__}")
    dtype, heads, kv_heads = torch.bfloat16, args.heads, args.heads // args.gqa
    best = {}  # (label of the table, key in it, causal) -> {config: [TFLOP/s per length]}
    shipped_min_seqlen = prefill_module.TMA_MIN_SEQLEN_Q
    for head_dim in args.dims:
        tma = tuned_table(head_dim, major, args.gluon)[0] is prefill_module.TMA_CONFIGS
        # the Triton kernel's candidates at every length, whatever the shipped rule says; the Gluon kernel's as shipped
        with contextlib.nullcontext() if args.gluon else tma_at_every_length():
            for causal in (False, True):
                for seqlen in args.seqlens:
                    table, key, candidates, label = tuned_table(head_dim, major, args.gluon, seqlen)
                    default = table.get(key)
                    batch = max(1, TOKENS // seqlen)
                    q = torch.randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype)
                    k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device=dev, dtype=dtype) for _ in range(2))
                    out = torch.empty_like(q)
                    lse = torch.empty(batch, heads, seqlen, device=dev, dtype=torch.float32)
                    takes = (prefill_sm90.sm90_path(q, k, v, out, causal=causal, window_left=-1, window_right=-1,
                                                    softcap=0.0, softmax_scale=1.0) if args.gluon
                             else prefill_module.tma_path(q, k, v, out, seqlen) == tma)
                    assert takes, "the calls must take the tuned path"
                    rate = functools.partial(tflops, batch, heads, seqlen, head_dim, causal)
                    ref = sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION)()
                    line = [f"D={head_dim:3d} {'causal' if causal else 'full  '} S={seqlen:5d} B={batch:2d}"]
                    line.append(f"sdpa-flash {rate(bench(sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION))):6.1f}")
                    try:
                        line.append(f"cudnn {rate(bench(sdpa(q, k, v, causal, SDPBackend.CUDNN_ATTENTION))):6.1f}")
                    except RuntimeError:
                        line.append("cudnn    n/a")
                    if tma:  # what these calls ran before the TMA path: the pointer kernel's config
                        with pointer_path():
                            line.append(f"pointer {rate(bench(run_prefill(q, k, v, out, lse, causal))):6.1f}")
                    if args.gluon:  # what these calls run without the Gluon kernel
                        with triton_kernel():
                            line.append(f"triton {rate(bench(run_prefill(q, k, v, out, lse, causal))):6.1f}")
                    results = []
                    for cfg in candidates:
                        table[key] = cfg
                        fn = run_prefill(q, k, v, out, lse, causal)
                        try:
                            fn()
                        except (OutOfResources, RuntimeError) as exc:  # too much shared memory for this GPU: skip it
                            print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
                            continue
                        if prefill_sm90.COMPILE_ERROR is not None:  # the call fell back to the Triton kernel
                            print(f"  {cfg}: does not compile: {str(prefill_sm90.COMPILE_ERROR)[-100:]}")
                            prefill_sm90.COMPILE_ERROR = None
                            continue
                        err = (out.float() - ref.transpose(1, 2).float()).abs().max().item()
                        if err > 3e-2:
                            print(f"  {cfg}: WRONG, max abs diff {err:.3g} vs SDPA")
                            continue
                        results.append((rate(bench(fn)), cfg))
                    table[key] = default
                    print("  ".join(line + [f"{cfg}:{r:6.1f}" for r, cfg in results]), flush=True)
                    if results:
                        top = max(results)
                        print(f"    best {top[1]} {top[0]:.1f} TFLOP/s", flush=True)
                        for r, cfg in results:
                            if not tma or seqlen >= shipped_min_seqlen:  # the lengths the shipped rule sends there
                                best.setdefault((label, key, causal), {}).setdefault(cfg, []).append(r)
        # Paged K/V at S=4k, causal (the pointer kernel's default config): the cost of gathering through the block
        # table, beside the same call on dense K/V (whichever path that takes).
        seqlen = 4096 if 4096 in args.seqlens else args.seqlens[0]
        batch = max(1, TOKENS // seqlen)
        q = torch.randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype)
        k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device=dev, dtype=dtype) for _ in range(2))
        out, lse = torch.empty_like(q), torch.empty(batch, heads, seqlen, device=dev, dtype=torch.float32)
        dense = tflops(batch, heads, seqlen, head_dim, True, bench(run_prefill(q, k, v, out, lse, True)))
        line = [f"D={head_dim:3d} causal S={seqlen} paged: dense {dense:6.1f}"]
        k_len = torch.full((batch,), seqlen, dtype=torch.int32, device=dev)
        for page_size in (16, 64, 256):
            k_pool, v_pool, table = paged_copy(k, v, page_size)
            fn = run_prefill(q, k_pool, v_pool, out, lse, True, block_table=table, k_len=k_len)
            gluon = prefill_sm90.sm90_path(q, k_pool, v_pool, out, causal=True, window_left=-1, window_right=-1,
                                           softcap=0.0, softmax_scale=1.0, block_table=table)
            line.append(f"page {page_size} ({'gluon' if gluon else 'triton'}): "
                        f"{tflops(batch, heads, seqlen, head_dim, True, bench(fn)):6.1f}")
        print("  ".join(line), flush=True)
    print(f"\nmean TFLOP/s over sequence lengths per config (TMA rows: over S >= {shipped_min_seqlen}, the lengths "
          f"that take that path; pick per head dim; causal matters most):")
    for (label, key, causal), per_cfg in best.items():
        ranked = sorted(((sum(r) / len(r), cfg) for cfg, r in per_cfg.items()), reverse=True)
        print(f"  {key} {'causal' if causal else 'full'}: " + "  ".join(f"{c}:{r:.1f}" for r, c in ranked))
    print("\nsuggested rows (best mean over causal and full):")
    for label, key in dict.fromkeys((label, key) for label, key, _ in best):
        merged = {}
        for causal in (False, True):
            for cfg, r in best.get((label, key, causal), {}).items():
                merged.setdefault(cfg, []).extend(r)
        print(f"    {label}: {key}: {max(merged, key=lambda c: sum(merged[c]) / len(merged[c]))},")


if __name__ == "__main__":
    main()
