"""(As run on 2026-12-06 at 06:39 UTC, on main as of d60c8b0.)

Where hf_flash.attention's host time goes, layer by layer (D128 H16 causal bf16): per-call host time with no sync
of each layer of the path called directly, the pieces of the launch apart, a bare Triton launch and cuDNN SDPA beside;
then a sync check and cProfile of the whole call."""
import contextlib
import cProfile
import functools
import pstats
import sys
import time

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_flash
from hf_flash import ops
from hf_flash.kernels import prefill_sm90 as ps
from hf_flash.kernels import backend

dev = torch.device("cuda")
print(torch.cuda.get_device_name(dev), torch.__version__, triton.__version__, flush=True)


def host_us(fn, n=400):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
        torch.cuda.synchronize()
    return best


@triton.jit
def _bare(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def rows_for(b, s):
    q = torch.randn(b, s, 16, 128, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out, lse = torch.empty_like(q), q.new_empty((b, 16, s), dtype=torch.float32)
    zeros = torch.zeros(b, dtype=torch.int32, device=dev)
    lens = torch.full_like(zeros, s)
    scale = 128 ** -0.5
    launcher = backend()
    kw = dict(softmax_scale=scale, causal=True, window_left=-1, window_right=-1, softcap=0.0)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    x = torch.zeros(64, device=dev)
    element = ps.gl.bfloat16

    def descriptors():
        return [ps.TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 128, 1, 128],
                                    ps.box_layout(128, 128, element)) for t in (q, k, v)]

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def device_ctx():
        with torch.cuda.device(q.device):
            pass

    def before():  # attention() as of 2cd27cb: three fills and the op through the dispatcher
        q4, k4, v4 = ops._check_qkv(q, k, v, batch_dims=2)
        ops._check_options(None, (-1, -1), 0.0, 128)
        z = torch.zeros(b, dtype=torch.int32, device=dev)
        torch.ops.hf_flash.prefill(q4, k4, v4, torch.empty_like(q4), q4.new_empty((b, 16, s), dtype=torch.float32), z,
                                   torch.full_like(z, s), z, torch.full_like(z, s), None, s, softmax_scale=scale,
                                   causal=True, window_left=-1, window_right=-1, softcap=0.0)

    return {
        "attention()": lambda: hf_flash.attention(q, k, v, causal=True),
        "before (2cd27cb path)": before,
        "_run_prefill": lambda: ops._run_prefill(q, k, v, zeros, lens, zeros, lens, s, softmax_scale=scale,
                                                 causal=True, window=(-1, -1), softcap=0.0),
        "torch.ops.hf_flash.prefill": lambda: torch.ops.hf_flash.prefill(
            q, k, v, out, lse, zeros, lens, zeros, lens, None, s, softmax_scale=scale, causal=True, window_left=-1,
            window_right=-1, softcap=0.0),
        "_prefill_op (eager)": lambda: ops._prefill_op(
            q, k, v, out, lse, zeros, lens, zeros, lens, None, s, softmax_scale=scale, causal=True, window_left=-1,
            window_right=-1, softcap=0.0),
        "launchers.prefill": lambda: launcher.prefill(q, k, v, out, lse, zeros, lens, zeros, lens, s, **kw),
        "prefill_sm90": lambda: ps.prefill_sm90(q, k, v, out, lse, zeros, lens, zeros, lens, s, softmax_scale=scale,
                                                causal=True),
        "sm90_path": lambda: ps.sm90_path(q, k, v, out, causal=True, window_left=-1, window_right=-1, softcap=0.0,
                                          softmax_scale=scale),
        "3 TensorDescriptors": descriptors,
        "cuda.device ctx": device_ctx,
        "get_device_capability": lambda: torch.cuda.get_device_capability(dev),
        "get_device_properties": lambda: torch.cuda.get_device_properties(dev).multi_processor_count,
        "zeros + 2 full_like": lambda: (torch.full_like(zeros, s), torch.full_like(zeros, s), torch.zeros(
            b, dtype=torch.int32, device=dev)),
        "empty_like + new_empty": lambda: (torch.empty_like(q), q.new_empty((b, 16, s), dtype=torch.float32)),
        "bare triton launch": lambda: _bare[(1,)](x, 64, BLOCK=64),
        "cuDNN SDPA": cudnn,
    }


for b, s in ((1, 256), (16, 1024)):
    print(f"--- B{b} S{s}: host us per call (best of 3 x 400, no sync)", flush=True)
    for name, fn in rows_for(b, s).items():
        print(f"{name:28s} {host_us(fn):7.1f}", flush=True)

fns = rows_for(1, 256)
torch.cuda.set_sync_debug_mode("warn")
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fns["attention()"]()
torch.cuda.set_sync_debug_mode(0)
print("syncs in one attention():", [str(w.message)[:120] for w in caught], flush=True)

profile = cProfile.Profile()
fn = fns["attention()"]
profile.enable()
for _ in range(500):
    fn()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(12)
pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(12)
