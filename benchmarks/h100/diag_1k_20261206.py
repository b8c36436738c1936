"""(As run on 2026-12-06 at 04:28 UTC, on main as of b759faa; its per_pair patch predates kernels.device_properties.)

Why D128 H16 1k prefill reads slow in bench_kernels: host time per call vs kernel time (CUDA graph replay),
persistent grid (one program per SM) vs one program per work pair, cuDNN beside."""
import functools
import time

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_flash
from hf_flash.kernels import prefill_sm90

dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)


class ManySMs:
    multi_processor_count, major, minor = 1 << 20, props.major, props.minor


def per_pair(fn):
    real = prefill_sm90.torch.cuda.get_device_properties
    prefill_sm90.torch.cuda.get_device_properties = lambda *_: ManySMs
    try:
        return fn()
    finally:
        prefill_sm90.torch.cuda.get_device_properties = real


def graph_ms(fn, n=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") / n


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def cudnn(q, k, v, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


print(props.name, torch.__version__, flush=True)
for h, hkv, s in ((16, 16, 1024), (16, 16, 2048), (32, 8, 1024)):
    b = 16384 // s
    q = torch.randn(b, s, h, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(b, s, hkv, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for causal in (False, True):
        flops = 4 * b * h * s * s * 128 / (2 if causal else 1)
        ours = functools.partial(hf_flash.attention, q, k, v, causal=causal)
        row = {}
        for rep in range(2):
            row[f"bench{rep}"] = triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median")
        row["graph"] = graph_ms(ours)
        row["pairs_bench"] = per_pair(lambda: triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median"))
        row["pairs_graph"] = per_pair(lambda: graph_ms(ours))
        row["cudnn_bench"] = triton.testing.do_bench(functools.partial(cudnn, qt, kt, vt, causal), warmup=25, rep=100,
                                                     return_mode="median")
        row["cudnn_graph"] = graph_ms(functools.partial(cudnn, qt, kt, vt, causal))
        hus, pus = host_us(ours), per_pair(lambda: host_us(ours))
        print(f"H{h}/{hkv} S{s} {'causal' if causal else 'full  '} "
              + " ".join(f"{n} {flops / ms / 1e9:5.0f}" for n, ms in row.items())
              + f" | host us/call persistent {hus:.0f} pairs {pus:.0f}", flush=True)
